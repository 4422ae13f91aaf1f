"""``bloodcell serve``: a local review page and HTTP API for the classifier.

A lab technician drops images on the page, sees each cell pre-classified,
and corrects what the model got wrong; corrections live in SQLite (with
timestamp and previous prediction) and export as CSV or as a class-folder
ZIP that ``bloodcell train`` reads. Predictions use ``predict.Classifier``
(the same decoding, checks and model code as ``bloodcell predict``).

Uploaded bytes are kept in the database under generated ids: a client's file
name is only ever displayed, never used as a path.

Modules: ``store`` (SQLite), ``worker`` (the model thread), ``cells`` (upload ->
stored cell), ``exports`` (CSV, ZIP), ``routes`` (the API), ``app`` (create_app,
middleware, serve), ``config`` (ServeConfig). FastAPI is imported only by
``routes`` and ``app``, and those only when an app is made: ``bloodcell predict``
starts without it.
"""
from .cells import clean_name, differential
from .config import AUTO, ServeConfig, default_threads
from .exports import export_path
from .store import SCHEMA, Store, default_db_path
from .worker import ModelWorker

__all__ = ["AUTO", "EXAMPLES_SAMPLE", "SCHEMA", "ModelWorker", "ServeConfig", "Store", "clean_name", "create_app",
           "default_db_path", "default_threads", "differential", "export_path", "serve"]


EXAMPLES_SAMPLE = "Example cells (PBC dataset)"  # the sample POST /api/examples fills (routes.py)


def create_app(config: ServeConfig | None = None, **settings):
    """The lab's FastAPI app (see ``app.create_app``)."""
    from .app import create_app as make
    return make(config, **settings)


def serve(config: ServeConfig) -> None:
    """Run the lab page with uvicorn (see ``app.serve``)."""
    from .app import serve as run
    run(config)
