"""One CPU core per serving worker: claim a free core and pin the worker's threads to it.

Why: with one uvicorn worker per core, each worker runs an event loop and a model thread. Left to the scheduler,
both workers' threads migrate between the cores and evict each other's caches; pinned, a worker's loop and model
thread take turns on one core and keep it warm. Measured on 2 cores, 2 workers, 16 clients (6 alternating pairs
of runs on one server, pinned with ``taskset``): 262 vs 232 requests/s (medians), pinned ahead in every pair.

How a worker finds its core without knowing its index: one lock file per core in a directory named for the
group (the app uses one group per machine, so that two servers' workers take different cores), ``flock``-ed by
the worker that holds it. The kernel drops the lock when the process dies, so a restarted worker takes over its
predecessor's core. Containers have their own ``/tmp``: pin there only with a CPU set of the container's own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CoreClaim", "available_cores", "claim_core", "pin_threads", "pins_workers"]

logger = logging.getLogger(__name__)


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask: taskset, cgroups), or ``[]`` where the platform
    does not say (then nothing is pinned)."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def pins_workers(mode: str, workers: int) -> bool:
    """Whether ``workers`` serving processes each get a core (``ptrag serve --pin-cores mode``): ``on``, or
    ``auto`` with 2+ workers and no more workers than :func:`available_cores`; ``off`` never."""
    return mode == "on" or (mode == "auto" and 1 < workers <= len(available_cores()))


def pin_threads(cores: set[int]) -> None:
    """Pin every thread of this process to ``cores``; threads started later inherit it from their creator."""
    tasks = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


@dataclass
class CoreClaim:
    """A core held by this process while ``fd`` (its lock) stays open."""

    core: int
    fd: int
    path: Path

    def release(self) -> None:
        """Give the core back (the threads stay pinned: call before exiting, or pin them elsewhere)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def claim_core(group: str, *, lock_dir: str | os.PathLike[str] | None = None, pin: bool = True) -> CoreClaim | None:
    """The first core of :func:`available_cores` that no other process of ``group`` holds, claimed, and (with
    ``pin``) every thread of this process pinned to it; None when all are taken or the platform cannot pin."""
    cores = available_cores()
    if not cores:
        logger.warning("cannot pin to a core here (no sched_getaffinity); running unpinned")
        return None
    directory = Path(lock_dir or Path(tempfile.gettempdir()) / "ptrag-cores") / group
    directory.mkdir(parents=True, exist_ok=True)
    for core in cores:
        path = directory / f"core{core}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if pin:
            pin_threads({core})
        return CoreClaim(core=core, fd=fd, path=path)
    logger.warning("all %d cores are held by other workers of group %s; running unpinned", len(cores), group)
    return None
