"""The micro-batcher on its own: grouping, limits, order, failure isolation, shutdown (no model)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.batching import BatcherClosedError, MicroBatcher


class Recorder:
    """fn for the batcher: records each call's items, squares them; fails on a negative item."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(i < 0 for i in items):
            msg = f"negative item in {items}"
            raise ValueError(msg)
        return [i * i for i in items]


def test_concurrent_jobs_share_one_call_in_order() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_items=64, max_wait_s=0.2, name="model-thread")
    try:
        futures = [batcher.submit([i, i + 100]) for i in range(5)]  # all within the wait window
        assert [f.result(5) for f in futures] == [[i * i, (i + 100) ** 2] for i in range(5)]
    finally:
        batcher.close()
    assert fn.calls == [[0, 100, 1, 101, 2, 102, 3, 103, 4, 104]]
    assert fn.threads == {"model-thread"}
    assert batcher.stats == {"calls": 1, "items": 10, "jobs": 5, "multi_job_calls": 1, "largest_call": 10}


def test_max_items_splits_calls_and_keeps_jobs_whole() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_items=4, max_wait_s=0.05)
    try:
        blocker = batcher.submit([0])  # occupies the worker until the gate opens, so the rest queue up
        time.sleep(0.1)
        futures = [batcher.submit(job) for job in ([1, 2], [3], [4, 5], [6, 7, 8, 9, 10], [11])]
        gate.set()
        assert blocker.result(5) == [0]
        assert [f.result(5) for f in futures] == [[1, 4], [9], [16, 25], [36, 49, 64, 81, 100], [121]]
    finally:
        batcher.close()
    # [4, 5] would overflow 4 items: it waits for the next call; the 5-item job runs alone.
    assert fn.calls == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]


def test_wait_window_bounds_latency_of_a_lone_job() -> None:
    batcher = MicroBatcher(Recorder(), max_items=64, max_wait_s=0.3)
    try:
        start = time.perf_counter()
        assert batcher([3], timeout=5) == [9]
        waited = time.perf_counter() - start
    finally:
        batcher.close()
    assert 0.25 < waited < 2.0  # it waited for company, then ran alone
    quick = MicroBatcher(Recorder(), max_items=1, max_wait_s=5.0)  # full at once: no waiting
    try:
        start = time.perf_counter()
        assert quick([2], timeout=5) == [4]
        assert time.perf_counter() - start < 1.0
    finally:
        quick.close()


def test_no_wait_when_no_other_job_is_expected() -> None:
    on_their_way = [0]
    batcher = MicroBatcher(Recorder(), max_items=64, max_wait_s=0.5, expected=lambda: on_their_way[0])
    try:
        start = time.perf_counter()
        assert batcher([2], timeout=5) == [4]
        assert time.perf_counter() - start < 0.4  # nobody else coming: ran at once
        assert batcher.outstanding == 0
        on_their_way[0] = 1  # a request is being read: worth waiting for
        start = time.perf_counter()
        assert batcher([3], timeout=5) == [9]
        assert time.perf_counter() - start > 0.45
    finally:
        batcher.close()


def test_wait_ends_when_the_last_expected_job_is_no_longer_on_its_way() -> None:
    # One request in the pipeline (say, its response being sent): the worker waits for company while it is,
    # then runs at once instead of sitting out max_wait_s.
    on_their_way = [1]
    batcher = MicroBatcher(Recorder(), max_items=64, max_wait_s=5.0, expected=lambda: on_their_way[0])
    try:
        release = threading.Timer(0.3, lambda: on_their_way.__setitem__(0, 0))
        release.start()
        start = time.perf_counter()
        assert batcher([3], timeout=10) == [9]
        waited = time.perf_counter() - start
        release.join()
    finally:
        batcher.close()
    assert 0.25 < waited < 2.0  # waited while one was on its way, not the 5 s window


def _a_call_of_three(batcher: MicroBatcher, on_their_way: list[int]) -> None:
    """Three jobs gathered while one more is announced, then run together: the call sizes the next grace."""
    on_their_way[0] = 1
    futures = [batcher.submit([i]) for i in (1, 2, 3)]
    on_their_way[0] = 0
    assert [f.result(5) for f in futures] == [[1], [4], [9]]


@pytest.mark.parametrize("grace_s", [0.0, 0.6])
def test_grace_waits_for_as_many_jobs_as_the_previous_call_held(grace_s: float) -> None:
    on_their_way = [0]
    fn = Recorder()
    batcher = MicroBatcher(fn, max_items=64, max_wait_s=5.0, expected=lambda: on_their_way[0], grace_s=grace_s)
    try:
        _a_call_of_three(batcher, on_their_way)
        start = time.perf_counter()
        first = batcher.submit([5])
        time.sleep(0.2)  # a client between two requests: in no count
        second = batcher.submit([6])
        assert first.result(5) == [25] and second.result(5) == [36]
        took = time.perf_counter() - start
    finally:
        batcher.close()
    assert fn.calls[0] == [1, 2, 3]
    if grace_s:  # two of the three came back within the grace: one call, run when the grace ended (not 5 s)
        assert fn.calls[1:] == [[5, 6]] and 0.5 < took < 2.0
    else:
        assert fn.calls[1:] == [[5], [6]]


def test_grace_never_delays_a_lone_client_nor_passes_max_wait() -> None:
    on_their_way = [0]
    fn = Recorder()
    batcher = MicroBatcher(fn, max_items=64, max_wait_s=0.3, expected=lambda: on_their_way[0], grace_s=5.0)
    try:
        for i in range(3):  # one job per call: the grace waits for one, which is there
            start = time.perf_counter()
            assert batcher([i], timeout=5) == [i * i]
            assert time.perf_counter() - start < 0.25
        _a_call_of_three(batcher, on_their_way)
        start = time.perf_counter()
        assert batcher([4], timeout=5) == [16]  # fewer than last time: waits, but max_wait_s, not the 5 s grace
        assert 0.25 < time.perf_counter() - start < 2.0
    finally:
        batcher.close()
    assert fn.calls == [[0], [1], [2], [1, 2, 3], [4]]


def test_a_failing_job_does_not_fail_the_others() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_items=64, max_wait_s=0.2)
    try:
        good, bad, other = batcher.submit([1]), batcher.submit([-1]), batcher.submit([2])
        assert good.result(5) == [1] and other.result(5) == [4]
        with pytest.raises(ValueError, match=r"negative item in \[-1\]"):
            bad.result(5)
    finally:
        batcher.close()
    assert fn.calls == [[1, -1, 2], [1], [-1], [2]]  # the grouped call, then one by one
    assert batcher.stats["jobs"] == 2 and batcher.stats["multi_job_calls"] == 0


def test_wrong_result_count_is_an_error() -> None:
    batcher = MicroBatcher(lambda items: items[:-1], max_items=8, max_wait_s=0)
    try:
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            batcher([1, 2], timeout=5)
    finally:
        batcher.close()


def test_close_fails_queued_jobs_and_refuses_new_ones() -> None:
    gate = threading.Event()
    batcher = MicroBatcher(Recorder(gate), max_items=1, max_wait_s=0)
    running = batcher.submit([1])
    time.sleep(0.05)
    queued = batcher.submit([2])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    gate.set()
    closer.join(10)
    assert running.result(5) == [1]
    with pytest.raises(BatcherClosedError):
        queued.result(5)
    with pytest.raises(BatcherClosedError, match="closed"):
        batcher.submit([3])


def test_cancelled_jobs_are_skipped_and_asyncio_callers_await() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_items=1, max_wait_s=0)
    try:
        first = batcher.submit([1])
        time.sleep(0.05)
        cancelled = batcher.submit([2])
        assert cancelled.cancel()
        gate.set()
        assert first.result(5) == [1]

        async def many() -> list[list[int]]:
            return await asyncio.gather(*(batcher.run([i]) for i in range(3, 6)))

        assert asyncio.run(many()) == [[9], [16], [25]]
    finally:
        batcher.close()
    assert [2] not in fn.calls


def test_threads_submitting_at_once_are_batched() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_items=64, max_wait_s=0.05)
    barrier = threading.Barrier(8)

    def one(i: int) -> list[int]:
        barrier.wait(5)
        return batcher([i], timeout=10)

    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == [[i * i] for i in range(8)]
    finally:
        batcher.close()
    assert sorted(i for call in fn.calls for i in call) == list(range(8))
    assert batcher.stats["largest_call"] > 1 and len(fn.calls) < 8


def test_invalid_limits() -> None:
    with pytest.raises(ValueError, match="max_items >= 1"):
        MicroBatcher(lambda x: x, max_items=0)
