"""The server's settings (``ServeConfig``) and what its routes share at run time (``Lab``,
kept in ``app.state.lab``)."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..predict import Classifier
from .store import Store
from .worker import ModelWorker

AUTO = "auto"  # screen=AUTO: the bundled multi-cell screen when there is one


def default_threads(backend: str = "onnx") -> int:
    """Inference threads. ONNX Runtime (spinning off) uses every core and yields them
    to decoding and HTTP between batches: on 2 cores, 50 clients got p95 400 ms with
    two threads vs 480-570 ms with one (benchmarks/serve_load.py). PyTorch's OpenMP
    threads wait for a core on a busy box (a tiny batch-1 forward ran 200x slower
    with two threads on 2 cores), so torch gets half the cores."""
    cores = os.cpu_count() or 2
    return max(1, min(4, cores if backend != "torch" else cores // 2))


@dataclass
class ServeConfig:
    """``model``: a ``predict.Classifier``, a model path, or None for the bundled model.
    ``screen``: a multi-cell ``Screen``, a screen file, None for none, or AUTO."""
    model: Any = None
    db_path: str | os.PathLike | None = None  # None: default_db_path()
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20                 # per file
    max_request_mb: float | None = None       # whole upload request; None: max(200, 2 x per file)
    max_files: int = 1000                     # per request
    screen: Any = AUTO
    other_labs_model: Any = AUTO              # Classifier.load's fallback: AUTO, None or a path
    review_views: int = 1                     # Classifier's review_views (4: the flag looks at 4 views)
    backend: str = "auto"                     # see predict.auto_int8
    threads: int | None = None                # None: default_threads(backend)
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()       # Host names answered besides loopback and `host`

    @property
    def host_names(self) -> frozenset[str]:
        """The Host header names this server answers to: loopback, ``host`` and
        ``allowed_hosts``; any other name (a DNS-rebinding page's) is refused."""
        return frozenset(h.lower().strip("[]") for h in
                         ("127.0.0.1", "localhost", "::1", self.host, *self.allowed_hosts))

    @property
    def any_ip_host(self) -> bool:
        """Bound to every interface: other machines call it by an IP address, which a
        rebinding page cannot use as its own origin, so any IP literal is answered."""
        return self.host in ("0.0.0.0", "::", "")

    @property
    def upload_limit(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def request_limit(self) -> int:
        return int((self.max_request_mb or max(200.0, 2 * self.max_upload_mb)) * 2**20)


@dataclass
class Lab:
    """What the routes use, built once by ``create_app``."""
    config: ServeConfig
    store: Store
    clf: Classifier       # its .screen: the multi-cell screen, or None
    worker: ModelWorker
    card: dict            # the model card (/api/model)
    saliency_cache: OrderedDict = field(default_factory=OrderedDict)
