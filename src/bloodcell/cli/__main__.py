"""`python -m bloodcell.cli ...` = `bloodcell ...`."""
import sys

from . import main

sys.exit(main())
