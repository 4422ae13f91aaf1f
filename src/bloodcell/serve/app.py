"""``create_app``: the lab's FastAPI app (routes from routes.py, state in
``app.state.lab``), its middleware, and ``serve``, which runs it with uvicorn."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import signal
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .. import __version__
from ..modelfile import bundled_model_path, check_model_path
from ..predict import Classifier, FallbackMismatch, load_screen
from .config import AUTO, Lab, ServeConfig, default_threads
from .routes import short
from .store import Store, StoreBusy, default_db_path
from .worker import ModelWorker

log = logging.getLogger("bloodcell")

JSON_LIMIT = 64 * 1024  # a correction is ~30 bytes; nothing but uploads needs more


def model_card(clf: Classifier, model_path) -> dict:
    meta = clf.meta
    metrics = meta.metrics
    if metrics is None and model_path is not None:
        p = Path(model_path)
        # metrics.json beside the model (a run folder, or the bundled model's folder)
        cand = (p if p.is_dir() else p.parent) / "metrics.json"
        if cand.exists():
            try:
                metrics = json.loads(cand.read_text())
            except (OSError, ValueError):
                metrics = None
    # the file's content names the model; its schema version does not (an older file = the same model)
    content = {k: v for k, v in meta.to_dict().items() if k != "schema_version"}
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    card = {"architecture": meta.architecture, "classes": clf.classes,
            "image_size": clf.image_size, "version": str(meta.version or digest),
            "model_id": digest, "bloodcell_version": __version__,
            "review_threshold": clf.review_threshold, "review_views": clf.review_views,
            "temperature": clf.temperature, "preprocess": meta.preprocess or None, "metrics": metrics,
            "description": meta.description,
            "data": {k: v for k, v in (meta.data or {}).items() if k != "root"} or None}
    if clf.fallback is not None:  # answers for images unlike the training colours
        card["other_labs_model"] = model_card(clf.fallback, clf.fallback.weights_path)
    return card


def load_classifier(cfg: ServeConfig) -> Classifier:
    """The model, with the app's multi-cell screen (cfg.screen decides, also for a
    Classifier passed in)."""
    if isinstance(cfg.model, Classifier):
        clf = cfg.model
        if cfg.other_labs_model not in (AUTO, None):  # a Classifier as given, unless told
            clf.attach_fallback(cfg.other_labs_model, clf.backend, cfg.threads)
        if cfg.review_views != 1:
            clf.review_views = cfg.review_views
    else:
        try:  # ONNX Runtime: ~2x less CPU per image than torch; Grad-CAM still uses torch
            # (a model that cannot be paired with its other-labs model is refused, not retried)
            clf = Classifier.load(cfg.model, backend=cfg.backend, screen=None, threads=cfg.threads,
                                  fallback=cfg.other_labs_model, review_views=cfg.review_views)
        except FallbackMismatch:
            raise
        except Exception as e:  # e.g. no writable cache for the export: torch still works
            if cfg.backend == "torch":
                raise
            log.warning("ONNX backend unavailable (%s); serving with torch", e)
            clf = Classifier.load(cfg.model, backend="torch", screen=None, fallback=cfg.other_labs_model,
                                  threads=min(cfg.threads or 1, default_threads("torch")),
                                  review_views=cfg.review_views)
    clf.screen = load_screen(cfg.screen)
    return clf


def create_app(config: ServeConfig | None = None, **settings):
    """The FastAPI app, from a ``ServeConfig`` or its fields as keywords."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.staticfiles import StaticFiles

    from .routes import STATIC_DIR, router
    cfg = config or ServeConfig(**settings)
    if not isinstance(cfg.model, Classifier):  # a missing model is the error to report first
        check_model_path(cfg.model, "--model")
    if cfg.other_labs_model not in (AUTO, None) and not isinstance(cfg.other_labs_model, Classifier):
        check_model_path(cfg.other_labs_model, "--other-labs-model")
    store = Store(cfg.db_path if cfg.db_path is not None else default_db_path())  # before the slow load
    try:
        clf = load_classifier(cfg)
    except BaseException:
        store.close()
        raise
    model_path = cfg.model if isinstance(cfg.model, (str, os.PathLike)) else None
    if cfg.model is None:
        model_path = bundled_model_path()
    lab = Lab(cfg, store, clf, ModelWorker(clf), model_card(clf, model_path))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        lab.worker.close()
        lab.store.close()  # after the last request: WAL checkpointed, database free

    extra = {}
    if "max_body_size" in inspect.signature(FastAPI).parameters:  # newer FastAPI: also streamed bodies
        extra["max_body_size"] = cfg.request_limit
    app = FastAPI(title="bloodcell lab", version=__version__,
                  description="Classify peripheral blood cell images, review and correct them.",
                  docs_url=None, redoc_url=None, lifespan=lifespan, **extra)
    app.state.lab = lab
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_docs(app)
    app.add_middleware(Guard, config=cfg)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StoreBusy, _busy)
    return app


# ------------------------------------------------------------------ middleware

class Guard:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware under load), in this order:
    - the Host header must name this server (loopback, ``--host``, ``--allow-host``): a
      DNS-rebinding page calls it by the attacker's name and is refused, so it cannot read;
    - a state-changing request (POST, PUT, PATCH, DELETE) whose Origin or Referer is not
      this very origin (scheme, host and port) is refused: another page open in the
      browser, even one on another local port, cannot upload or correct. Requests with
      neither header (curl, scripts) are not from a web page and pass;
    - a body over its limit (uploads: the request limit; any other body, JSON: 64 KiB) is
      refused from its declared size before reading it, or while reading it;
    - every response is marked nosniff (uploaded bytes are served back as images)."""

    def __init__(self, app, config: ServeConfig, json_limit: int = JSON_LIMIT):
        self.app, self.cfg, self.json_limit = app, config, json_limit
        self.names = config.host_names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self._host_ok(host):
            return await _refuse(scope, receive, send, 400, f"Host {short(host)} is not a name this server "
                                 "answers to (open it as http://127.0.0.1:PORT/, or start it with --allow-host NAME)")
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            source = headers.get(b"origin") or headers.get(b"referer")
            if source is not None and not _same_origin(source.decode("latin-1"), scope["scheme"], host):
                return await _refuse(scope, receive, send, 403, "cross-origin request refused: Origin "
                                     f"{short(source.decode('latin-1'))} is not this lab page")
            upload = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
            limit = self.cfg.request_limit if upload else self.json_limit
            size = headers.get(b"content-length", b"")
            if size.isdigit() and int(size) > limit:
                return await _too_large(scope, receive, send, int(size), limit)
            if not upload:  # small by definition: read it here, counting, and hand it on
                body = await _read_body(receive, limit)
                if body is None:
                    return await _too_large(scope, receive, send, None, limit)
                receive = _replay(body)

        async def send_nosniff(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(msg)
        await self.app(scope, receive, send_nosniff)

    def _host_ok(self, host: str) -> bool:
        try:
            name = urlsplit("//" + host).hostname
        except ValueError:
            return False
        if not name:
            return False
        if name in self.names:
            return True
        if self.cfg.any_ip_host:
            with contextlib.suppress(ValueError):
                return bool(ipaddress.ip_address(name))
        return False


def _same_origin(source: str, scheme: str, host: str) -> bool:
    try:
        u = urlsplit(source)
    except ValueError:
        return False
    return u.scheme == scheme and u.netloc.lower() == host.lower()


async def _refuse(scope, receive, send, status: int, detail: str):
    from fastapi.responses import JSONResponse
    await JSONResponse({"detail": detail}, status)(scope, receive, send)


async def _too_large(scope, receive, send, size: int | None, limit: int):
    what = f"request of {size / 2**20:.1f} MB" if size is not None else "request body"
    lim = f"{limit / 2**20:g} MB" if limit >= 2**20 else f"{limit // 1024} KB"
    await _refuse(scope, receive, send, 413, f"{what} is over the {lim} limit")


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes ``limit`` bytes."""
    chunks, n = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":  # the client went away
            return b"".join(chunks)
        chunks.append(msg.get("body", b""))
        n += len(chunks[-1])
        if n > limit:
            return None
        if not msg.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}
    return receive


async def _busy(request, exc):
    """The write lock stayed taken (another program writing): 503, nothing stored, so
    the client knows to retry; never a 200 for a write that did not happen."""
    from fastapi.responses import JSONResponse
    log.warning("%s", exc)
    return JSONResponse({"detail": f"{exc}"}, 503, headers={"Retry-After": "5"})


async def _validation_error(request, exc):
    """FastAPI's 422, with each offending input cut short instead of echoed whole."""
    from fastapi.responses import JSONResponse
    errors = [{k: (short(v) if k == "input" else v) for k, v in e.items() if k != "ctx"}
              for e in exc.errors()]
    return JSONResponse({"detail": errors}, 422)


def _add_docs(app):
    """OpenAPI docs at /docs: offline from the swagger-ui-bundle package when it is
    installed, else FastAPI's default page (which loads Swagger UI from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    try:
        import swagger_ui_bundle
        from fastapi.staticfiles import StaticFiles
        app.mount("/_docs", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static")
        urls = dict(swagger_js_url="/_docs/swagger-ui-bundle.js", swagger_css_url="/_docs/swagger-ui.css",
                    swagger_favicon_url="/_docs/favicon-32x32.png")
    except ImportError:
        urls = {}

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="bloodcell lab API", **urls)


# ------------------------------------------------------------------ run

def serve(cfg: ServeConfig) -> None:
    """Run the lab page with uvicorn until Ctrl-C or SIGTERM; both stop it the same way:
    requests in flight finish, the database is checkpointed and closed, exit status 0
    (uvicorn re-raises the signal after its shutdown, and SIGTERM's default ended the
    process with status 143 before the database was closed)."""
    import torch
    import uvicorn
    if cfg.threads is None:
        cfg.threads = default_threads(cfg.backend)
    torch.set_num_threads(cfg.threads if cfg.backend == "torch" else default_threads("torch"))
    app = create_app(cfg)
    db = cfg.db_path or default_db_path()
    print(f"bloodcell lab page on http://{cfg.host}:{cfg.port}/  (API docs /docs, database {db})", flush=True)
    stops: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stops.append(s))
                for sig in (signal.SIGINT, signal.SIGTERM)
                if threading.current_thread() is threading.main_thread()}
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops:
        print(f"stopped ({signal.Signals(stops[0]).name}); database {db} saved and closed", flush=True)
