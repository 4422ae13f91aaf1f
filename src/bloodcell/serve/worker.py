"""The one thread that runs the model for the server."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class _Predict:
    items: list[dict]  # decoded inputs (Classifier.decode_safe): "model" uint8 [S, S, 3], maybe "alt"
    future: Future = field(default_factory=Future)


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)


class ModelWorker:
    """Every model call runs on this thread: concurrent predictions waiting in the
    queue are run as one batch (micro-batching: cheaper per image, and no lock
    contention around the model); ``call`` runs anything else that touches the model
    (Grad-CAM) in the same order."""

    def __init__(self, clf, max_batch: int = 32):
        self.clf, self.max_batch = clf, max_batch
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="bloodcell-model", daemon=True)
        self.thread.start()

    def close(self):
        self.q.put(None)

    def predict(self, items: list[dict]) -> Future:
        """-> Future of (the calibrated probabilities [len(items), C], ``clf.predict_proba_decoded``;
        the review probabilities [len(items)] or None, ``clf.review_scores``)."""
        job = _Predict(list(items))
        self.q.put(job)
        return job.future

    def call(self, fn: Callable[..., Any], *args) -> Future:
        """-> Future of ``fn(*args)``, run on the model thread."""
        job = _Call(fn, args)
        self.q.put(job)
        return job.future

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            if isinstance(job, _Call):
                self._call(job)
                continue
            batch, calls = self._gather(job)
            self._predict(batch)
            for c in calls:
                self._call(c)

    def _gather(self, first: _Predict) -> tuple[list[_Predict], list[_Call]]:
        """The predictions already waiting, up to max_batch images; calls met on the way
        run after the batch."""
        batch, calls, n = [first], [], len(first.items)
        while n < self.max_batch:
            try:
                nxt = self.q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self.q.put(None)
                break
            if isinstance(nxt, _Call):
                calls.append(nxt)
            else:
                batch.append(nxt)
                n += len(nxt.items)
        return batch, calls

    @staticmethod
    def _call(job: _Call):
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(e)

    def _predict(self, jobs: list[_Predict]):
        try:
            items = [it for j in jobs for it in j.items]
            probs = self.clf.predict_proba_decoded(items)
            review = self.clf.review_scores(items, probs)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            for j in jobs:
                j.future.set_exception(e)
            return
        i = 0
        for j in jobs:
            j.future.set_result((probs[i:i + len(j.items)],
                                 None if review is None else review[i:i + len(j.items)]))
            i += len(j.items)
