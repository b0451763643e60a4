"""A micro-batcher: concurrent requests' work items, grouped into one call on one worker thread.

Each request submits its items (for ``POST /predict``: one :class:`~model.predict.PredictItem` per perturbation)
and gets a future. The worker takes the first waiting job, then keeps collecting jobs until ``max_wait_s`` has
passed since it took that first one or ``max_items`` items are gathered, and calls ``fn`` once on all of their
items: one forward pass instead of one per request. A job that would overflow ``max_items`` waits for the next
call (a single job larger than ``max_items`` runs alone). When a grouped call raises, each of its jobs is run
again on its own, so that one request's failure is never another's.

One thread owns the model: torch runs with its own intra-op threads there, off the event loop, and nothing else
touches the model concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BatcherClosedError", "MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(RuntimeError):
    """The batcher was closed before the job ran."""


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    future: Future[list[R]] = field(default_factory=Future)


_STOP = object()
_POLL_S = 0.0005  # how often a waiting worker looks at ``expected`` again


class MicroBatcher(Generic[T, R]):
    """Run ``fn(items) -> results`` (one result per item, in order) on batches of concurrently submitted jobs.

    Parameters
    ----------
    fn
        Called on the worker thread with the items of one or more jobs, concatenated in arrival order.
    max_items
        Most items per call (unless a single job is larger).
    max_wait_s
        How long the worker waits for more jobs after taking the first one of a call.
    init
        Called once on the worker thread before the first call (e.g. to set torch's thread count there).
    expected
        How many more jobs may be on their way (e.g. requests in the server that have not submitted, or whose
        results are being sent back). The worker waits for company only while it says more than 0 (looking again
        every 0.5 ms), and never past ``max_wait_s``: a lone request pays no wait, and a call starts as soon as
        the last request that could join it has. None: always wait ``max_wait_s``.
    grace_s
        With ``expected``: once it says 0, how much longer to wait while the call holds fewer jobs than the one
        before it (never past ``max_wait_s``). Clients that send their next request as soon as they have their
        answer (a batch client with bounded concurrency, a load test) are out of the server for a moment between
        two requests, where no count sees them; the previous call's size says how many usually come back. A lone
        client's calls hold one job each, so it never waits.

    Counters (``stats``): ``calls`` made, ``items`` processed, ``jobs`` completed, ``multi_job_calls`` (calls that
    served more than one job), ``largest_call`` (most items in one call).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_items: int = 64,
        max_wait_s: float = 0.002,
        init: Callable[[], None] | None = None,
        expected: Callable[[], int] | None = None,
        grace_s: float = 0.0,
        name: str = "micro-batcher",
    ) -> None:
        if max_items < 1 or max_wait_s < 0 or grace_s < 0:
            msg = f"need max_items >= 1, max_wait_s >= 0 and grace_s >= 0, got {max_items}, {max_wait_s}, {grace_s}"
            raise ValueError(msg)
        self.fn, self.max_items, self.max_wait_s, self._init, self._expected = fn, max_items, max_wait_s, init, expected
        self.grace_s = grace_s
        self._last_jobs = 0  # jobs in the previous call: how many the grace waits for
        self._queue: queue.SimpleQueue[_Job[T, R] | object] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._outstanding = 0  # jobs submitted and not finished
        self.stats = {"calls": 0, "items": 0, "jobs": 0, "multi_job_calls": 0, "largest_call": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- submitting ----------------------------------------------------------------------------------------

    def submit(self, items: Sequence[T]) -> Future[list[R]]:
        """Queue ``items`` as one job; the future gives their results in order (or ``fn``'s exception)."""
        if self._closed:
            msg = "the batcher is closed"
            raise BatcherClosedError(msg)
        job: _Job[T, R] = _Job(list(items))
        with self._lock:
            self._outstanding += 1
        job.future.add_done_callback(self._done)
        self._queue.put(job)
        return job.future

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not finished (queued or running)."""
        return self._outstanding

    def _done(self, _: Future) -> None:
        with self._lock:
            self._outstanding -= 1

    def __call__(self, items: Sequence[T], timeout: float | None = None) -> list[R]:
        """Submit and wait (from a worker thread, e.g. a FastAPI ``def`` endpoint)."""
        return self.submit(items).result(timeout)

    async def run(self, items: Sequence[T]) -> list[R]:
        """Submit and await (from the event loop)."""
        return await asyncio.wrap_future(self.submit(items))

    def close(self, timeout: float = 10.0) -> None:
        """Finish the calls already gathered, fail the jobs still queued, stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # --- the worker ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self._init is not None:
            self._init()
        carry: _Job[T, R] | object | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP or self._closed:  # closed: what is still queued fails below, this job included
                if isinstance(first, _Job):
                    self._queue.put(first)
                break
            jobs: list[_Job[T, R]] = [first]  # type: ignore[list-item]
            n = len(jobs[0].items)
            deadline = time.monotonic() + self.max_wait_s
            grace_end = None  # set when nothing more is expected
            while n < self.max_items:
                remaining = deadline - time.monotonic()
                if remaining > 0 and self._expected is not None and self._expected() <= 0:
                    if len(jobs) >= self._last_jobs:
                        remaining = 0  # no other job on its way: take the ones already waiting and run
                    else:  # fewer than last time: the missing clients may be about to send again
                        grace_end = time.monotonic() + self.grace_s if grace_end is None else grace_end
                        remaining = min(remaining, grace_end - time.monotonic())
                try:  # past the deadline, still take the jobs that are already waiting
                    if remaining <= 0:
                        nxt = self._queue.get_nowait()
                    else:  # in short steps when there is an ``expected`` to watch fall
                        step = remaining if self._expected is None else min(remaining, _POLL_S)
                        nxt = self._queue.get(timeout=step)
                except queue.Empty:
                    if remaining > 0:
                        continue
                    break
                if nxt is _STOP or n + len(nxt.items) > self.max_items:  # type: ignore[union-attr]
                    carry = nxt
                    break
                jobs.append(nxt)  # type: ignore[arg-type]
                n += len(nxt.items)  # type: ignore[union-attr]
            self._last_jobs = len(jobs)
            self._run([j for j in jobs if j.future.set_running_or_notify_cancel()])
        self._fail_queued()

    def _run(self, jobs: list[_Job[T, R]]) -> None:
        if not jobs:
            return
        items = [it for j in jobs for it in j.items]
        try:
            results = self.fn(items)
            if len(results) != len(items):
                msg = f"batched function returned {len(results)} results for {len(items)} items"
                raise RuntimeError(msg)
        except Exception as err:
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
                return
            logger.info("a batch of %d jobs failed (%s: %s); running them one by one", len(jobs), type(err).__name__,
                        err)  # fmt: skip
            for j in jobs:
                self._run([j])
            return
        self.stats["calls"] += 1
        self.stats["items"] += len(items)
        self.stats["jobs"] += len(jobs)
        self.stats["multi_job_calls"] += len(jobs) > 1
        self.stats["largest_call"] = max(self.stats["largest_call"], len(items))
        start = 0
        for j in jobs:
            j.future.set_result(results[start : start + len(j.items)])
            start += len(j.items)

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job) and job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherClosedError("the batcher was closed before this job ran"))
