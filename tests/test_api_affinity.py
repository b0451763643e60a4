"""Pinning serving workers to cores: claims between processes, the pinning itself, and the app's use of it.

The pinning runs in child processes only: pinning the test process would slow every later test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_app import settings_for, trained

import api.app
from api.affinity import available_cores, claim_core
from api.app import create_app

CORES = available_cores()
needs_affinity = pytest.mark.skipif(not CORES, reason="no sched_getaffinity on this platform")


@needs_affinity
def test_claims_are_exclusive_per_group_and_released(tmp_path: Path) -> None:
    claims = [claim_core("g", lock_dir=tmp_path, pin=False) for _ in CORES]
    assert sorted(c.core for c in claims) == CORES  # each core once
    assert claim_core("g", lock_dir=tmp_path, pin=False) is None  # all taken
    other = claim_core("other-group", lock_dir=tmp_path, pin=False)  # groups are independent claim spaces
    assert other is not None and other.core == CORES[0]
    claims[-1].release()
    again = claim_core("g", lock_dir=tmp_path, pin=False)
    assert again is not None and again.core == claims[-1].core
    for c in [*claims, other, again]:
        c.release()


CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    from api.affinity import claim_core
    stop = threading.Event()
    before = threading.Thread(target=stop.wait, daemon=True)
    before.start()  # a thread that exists before the claim is pinned too
    claim = claim_core("g", lock_dir=sys.argv[1])
    after = threading.Thread(target=stop.wait, daemon=True)
    after.start()  # and one started after it inherits
    masks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
    print(json.dumps({"core": claim.core, "masks": masks}), flush=True)
    sys.stdin.readline()  # hold the claim until the parent says
""")


@needs_affinity
def test_a_process_pins_every_thread_and_its_claim_ends_with_it(tmp_path: Path) -> None:
    argv, root = [sys.executable, "-c", CHILD, str(tmp_path)], Path(__file__).resolve().parents[1]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root) as proc:
        try:
            report = json.loads(proc.stdout.readline())
            assert report["core"] == CORES[0]
            assert len(report["masks"]) >= 3 and all(m == [CORES[0]] for m in report["masks"].values())
            if len(CORES) > 1:  # the child holds its core: the next claim gets another
                second = claim_core("g", lock_dir=tmp_path, pin=False)
                assert second is not None and second.core == CORES[1]
                second.release()
        finally:
            proc.stdin.close()
            proc.wait(20)
    first = claim_core("g", lock_dir=tmp_path, pin=False)  # the child exited: its core is free again
    assert first is not None and first.core == CORES[0]
    first.release()


@needs_affinity
def test_app_claims_a_core_when_asked_and_reports_it(tmp_path_factory, tmp_path: Path, monkeypatch) -> None:
    model = trained(tmp_path_factory)
    calls = []

    def claim_unpinned(group: str):  # the real claim, minus pinning this (the test) process
        calls.append(group)
        return claim_core(group, lock_dir=tmp_path, pin=False)

    monkeypatch.setattr(api.app, "claim_core", claim_unpinned)
    with TestClient(create_app(settings_for(model, pin_cores=True))) as c:
        worker = c.get("/info").json()["worker"]
        assert worker["cpu_core"] == CORES[0]
        assert calls == ["workers"]  # one claim space per machine
        held = claim_core(calls[0], lock_dir=tmp_path, pin=False)  # the app holds CORES[0] while it runs
        assert held is None or held.core != CORES[0]
        if held is not None:
            held.release()
    after = claim_core(calls[0], lock_dir=tmp_path, pin=False)  # released at shutdown
    assert after is not None and after.core == CORES[0]
    after.release()
    with TestClient(create_app(settings_for(model))) as c:
        assert c.get("/info").json()["worker"]["cpu_core"] is None and len(calls) == 1
