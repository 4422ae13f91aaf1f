"""``python -m bloodcell ...`` -- the same as the ``bloodcell`` command; what
``torchrun ... -m bloodcell train ...`` starts on every rank."""
import sys

from .cli import main

sys.exit(main())
