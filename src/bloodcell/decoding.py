"""What runs ahead of the model: decode and preprocess an input (``transforms.prepare``,
the one preprocessing definition), and score it with the multi-cell screen (on the
framing's own segmentation when there is one), in threads or in worker processes.

Why processes too: decoding releases the GIL, the screen's segmentation (many small
numpy and scipy calls) mostly does not, so two decode threads on two cores spend a
fifth of their CPU taking turns for the GIL (measured: 7.4 vs 6.0 CPU ms per image,
screen on). Worker processes have a GIL each; they get the ``Decoder`` (picklable)
once and send back the model's uint8 array, the input's size and the screen's verdict.
They start as fresh interpreters ("spawn": no fork of a process that already runs ONNX
Runtime's threads), which costs about half a second, so only big jobs use them.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .inputcheck import InputCheck
from .locate import Framing
from .segment import DEFAULT_PARAMS
from .transforms import ImageError, prepare, preprocess

log = logging.getLogger("bloodcell")

DECODE_MODES = ("auto", "threads", "processes")
# "auto" uses processes from this many inputs on (their start-up is ~0.5 s), and sends
# them this many inputs per task (one array back per input; fewer round trips)
PROCESS_MIN_INPUTS = 400
PROCESS_CHUNK = 16


@dataclass
class Route:
    """Where images unlike the model's training colours go instead: ``check`` (the main
    model's input check) picks them; they are prepared again for the other model
    (its size and framing)."""
    check: InputCheck
    image_size: int
    framing: Framing | None = None


@dataclass
class Decoder:
    """An input -> ``({"model": uint8 array, "source": SourceInfo, "cell": CellBox | None,
    "screen": dict | None}, None)``, or ``(None, reason)`` for an input that is no usable
    image. ``screen``: a multi-cell ``Screen`` or None. With a ``route``, an image its
    check calls unlike the training images also gets ``"alt"`` and ``"alt_cell"``: its
    preparation for the other model."""
    image_size: int
    framing: Framing | None = None
    screen: Any = None
    route: Route | None = None

    def decode_safe(self, src) -> tuple[dict | None, str | None]:
        try:
            arrays = self._decode(src)
        except ImageError as e:
            return None, e.reason
        self._route_one(src, arrays)
        arrays["screen"] = self._screen_one(arrays)
        arrays.pop("regions", None)  # the segmentation is not sent back from a worker process
        arrays.pop("screen_input", None)
        return arrays, None

    def decode_many(self, srcs: Sequence) -> list[tuple[dict | None, str | None]]:
        return [self.decode_safe(s) for s in srcs]

    def _decode(self, src) -> dict:
        """src -> {"model", "source", "cell", and "regions" (the framing's stain segmentation,
        reused by the screen) or "screen_input"}."""
        screen_size = int(self.screen.image_size) if self.screen is not None else None
        if self.framing is None and screen_size not in (None, self.image_size) \
                and isinstance(src, (str, os.PathLike)):
            p = Path(src)  # read the file once; decode per size exactly as preprocess(path) would
            if p.is_file() and p.stat().st_size > 0:
                src = p.read_bytes()
        try:
            prep = prepare(src, self.image_size, self.framing)
            out = {"model": prep.image, "source": prep.source, "cell": prep.cell}
            if screen_size is None:
                return out
            if prep.regions is not None and screen_size == self.framing.work_size \
                    and self.screen.params == DEFAULT_PARAMS:
                out["regions"] = prep.regions  # one segmentation serves framing and screen
            else:
                out["screen_input"] = (prep.image if self.framing is None and screen_size == self.image_size
                                       else preprocess(src, screen_size))
            return out
        except ImageError:
            raise
        except Exception as e:  # one odd file must never end a batch job
            raise ImageError(str(src), f"could not decode ({type(e).__name__}: {e})") from None

    def _route_one(self, src, arrays: dict) -> None:
        if self.route is None or not self.route.check.unlike(arrays["model"][None])[0]:
            return
        try:
            alt = prepare(src, self.route.image_size, self.route.framing)
            arrays["alt"], arrays["alt_cell"] = alt.image, alt.cell
        except Exception as e:  # the main model's answer stands
            log.warning("%s: not prepared for the other-labs model (%s: %s)", src if isinstance(
                src, (str, os.PathLike)) else "an input", type(e).__name__, e)

    def _screen_one(self, arrays: dict):
        if self.screen is None:
            return None
        try:
            if "regions" in arrays:
                return self.screen.score_regions(arrays["regions"])
            return self.screen.score_arrays([arrays["screen_input"]])[0]
        except Exception as e:  # an add-on failing must not lose the classification
            log.warning("multi-cell screen failed (%s: %s); image not screened", type(e).__name__, e)
            return None


# ----------------------------------------------------------------------------- worker processes

_worker_decoder: Decoder | None = None


def _start_worker(decoder: Decoder, parent: int) -> None:
    global _worker_decoder
    _worker_decoder = decoder
    # Ctrl-C reaches the whole process group: the main process stops the job and the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a main process killed outright (SIGKILL, the OOM killer) cannot stop its pool: the
    # workers notice they were orphaned and leave instead of idling on forever
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _decode_in_worker(srcs: Sequence) -> list:
    return _worker_decoder.decode_many(srcs)


class DecodePool:
    """Decoding ahead of the model: ``submit(srcs)`` -> a future of ``decode_many(srcs)``;
    ``workers == 0`` decodes inline (the result itself). A worker process that dies (a
    decoder crashing on some file) does not end the job: its inputs are decoded again
    in this process."""

    def __init__(self, decoder: Decoder, workers: int, processes: bool = False):
        self.decoder = decoder
        self.processes = bool(processes and workers > 0)
        self.chunk = PROCESS_CHUNK if self.processes else 1
        self.ex: Executor | None = None
        self.broken = False
        if self.processes:
            import multiprocessing as mp
            self.ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                          initializer=_start_worker, initargs=(decoder, os.getpid()))
            self._start_quietly(workers)
        elif workers > 0:
            self.ex = ThreadPoolExecutor(workers, thread_name_prefix="decode")

    def _start_quietly(self, workers: int) -> None:
        """Start every worker now, with SIGINT ignored: a spawned interpreter inherits that
        through exec, so a Ctrl-C while the workers import is the main process's alone
        (not a traceback from each of them)."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for _ in range(workers):  # the pool starts a process per task while none is idle
                self.ex.submit(int)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)

    def submit(self, srcs: Sequence):
        """A future of ``decode_many(srcs)``, or the list itself where it was decoded here."""
        if self.ex is None or self.broken:
            return self.decoder.decode_many(srcs)
        if not self.processes:
            return self.ex.submit(self.decoder.decode_many, list(srcs))
        try:
            return self.ex.submit(_decode_in_worker, list(srcs))
        except BrokenExecutor as e:  # a worker died: the pool takes no more work
            self._broke(e)
            return self.decoder.decode_many(srcs)

    def result(self, job, srcs: Sequence) -> list:
        if isinstance(job, list):
            return job
        try:
            return job.result()
        except Exception as e:  # BrokenProcessPool, or a result that could not be sent back
            if not self.processes:
                raise
            self._broke(e)
            return self.decoder.decode_many(srcs)

    def _broke(self, e: Exception) -> None:
        if not self.broken:
            log.warning("a decode worker process failed (%s: %s); decoding the rest in this process",
                        type(e).__name__, e)
        self.broken = isinstance(e, BrokenExecutor) or self.broken

    def close(self, pending=()) -> None:
        if self.ex is not None:
            for job in pending:
                job.cancel()
            self.ex.shutdown(wait=True, cancel_futures=True)


def use_processes(mode: str, n_inputs: int | None, workers: int) -> bool:
    """Whether ``mode`` ("auto", "threads", "processes") decodes in worker processes."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}: use one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return workers > 1 and n_inputs is not None and n_inputs >= PROCESS_MIN_INPUTS
    return mode == "processes" and workers > 0
