"""The prediction service on real uvicorn servers (127.0.0.1): concurrent requests are micro-batched and give
what sequential ones give; retrieval over HTTP gives what the in-process store gives; ``ptrag serve``."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from test_api_app import SEEN, ZERO_SHOT, serve, settings_for, trained

from api import affinity
from api.app import Settings, create_app
from api.cli import main
from retrieval_service.app import Settings as RetrievalSettings
from retrieval_service.app import create_app as create_retrieval_app


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return trained(tmp_path_factory)


def _requests(genes: tuple[str, ...]) -> list[dict]:
    """Twelve different requests: cell types, perturbation counts, cell counts and seeds vary."""
    out = []
    for i in range(12):
        cell_type = ("hepg2", SEEN, ZERO_SHOT)[i % 3]
        perts = [genes[i]] if i % 4 else [genes[i], f"{genes[i + 1]}+{genes[i + 2]}"]
        out.append({"cell_type": cell_type, "perturbations": perts, "n_cells": (32, 16)[i % 2], "seed": i})
    return out


def _deltas(body: dict) -> np.ndarray:
    return np.asarray([p["delta"] for p in body["predictions"]])


def test_concurrent_requests_are_batched_and_equal_sequential(model) -> None:
    """Not bit-exact: a batched forward multiplies larger matrices, whose kernels may sum in another order;
    predictions agree to float32 rounding, hence atol 1e-5."""
    app = create_app(settings_for(model, batch_wait_ms=100, batch_max_items=64))
    requests = _requests(model.genes)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        sequential = [client.post("/predict", json=body).json() for body in requests]
        before = client.get("/info").json()["batcher"]
        assert before["multi_job_calls"] == 0 and before["jobs"] == len(requests)
        barrier = threading.Barrier(len(requests))

        def one(body: dict) -> dict:
            with httpx.Client(base_url=url, timeout=30) as own:
                barrier.wait(10)
                r = own.post("/predict", json=body)
                assert r.status_code == 200, r.text
                return r.json()

        with ThreadPoolExecutor(len(requests)) as pool:
            concurrent = list(pool.map(one, requests))
        after = client.get("/info").json()["batcher"]
    assert after["multi_job_calls"] > 0 and after["largest_call"] > 2  # batches of several requests formed
    assert after["calls"] - before["calls"] < len(requests)
    for seq, con in zip(sequential, concurrent, strict=True):
        assert [p["perturbation"] for p in con["predictions"]] == [p["perturbation"] for p in seq["predictions"]]
        np.testing.assert_allclose(_deltas(con), _deltas(seq), atol=1e-5, rtol=0)
        for a, b in zip(con["predictions"], seq["predictions"], strict=True):
            assert [c["id"] for c in a["candidates"]] == [c["id"] for c in b["candidates"]]
            assert a["warnings"] == b["warnings"]
        assert con["request_id"] != seq["request_id"]


def test_retrieval_over_http_matches_in_process(model) -> None:
    retrieval = create_retrieval_app(RetrievalSettings(index_dir=model.run / "index", load_in_background=False))
    requests = _requests(model.genes)[:4]
    with TestClient(create_app(settings_for(model))) as local:
        expected = [local.post("/predict", json=body).json() for body in requests]
    with serve(retrieval) as url:
        remote_settings = settings_for(model, retrieval_url=url, embeddings=model.run / "simulated.embeddings.npz")
        with TestClient(create_app(remote_settings)) as remote:
            info = remote.get("/info").json()
            assert (info["retrieval"], info["split_kind"]) == (url, "zeroshot_celltype")
            got = [remote.post("/predict", json=body).json() for body in requests]
            r = remote.post("/predict", json={"cell_type": SEEN, "perturbations": ["NOPE1"]})
            assert r.status_code == 422 and r.json()["unknown"] == ["NOPE1"]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(_deltas(a), _deltas(b), atol=1e-5, rtol=0)
        for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
            assert [(c["id"], c["cell_type"], c["perturbation"]) for c in pa["candidates"]] == [
                (c["id"], c["cell_type"], c["perturbation"]) for c in pb["candidates"]
            ]


def test_ptrag_serve_passes_flags_as_settings(model, monkeypatch, capsys) -> None:
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("PTRAG_MAX_PERTURBATIONS", "3")
    monkeypatch.setenv("PTRAG_API_KEY", "k3y")
    monkeypatch.setenv("PTRAG_INDEX_DIR", "/ignored/the/flag/wins")
    monkeypatch.setenv("PTRAG_EMBEDDINGS", "")  # empty is unset
    argv = ["serve", "--checkpoint", str(model.checkpoint), "--index", str(model.run / "index"), "--port", "8123",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (served["host"], served["port"], served["access_log"]) == ("127.0.0.1", 8123, False)
    settings: Settings = served["app"].state.fixed_settings
    assert (settings.checkpoint, settings.index_dir, settings.device) == (model.checkpoint, model.run / "index", "cpu")
    assert settings.max_perturbations == 3 and settings.api_key.get_secret_value() == "k3y"
    assert settings.retrieval_url is None and settings.embeddings is None
    assert (settings.max_cells, settings.batch_max_items) == (4096, 64)
    assert (settings.batch_wait_ms, settings.batch_grace_ms) == (10.0, 2.0)
    with serve(served["app"]) as url, httpx.Client(base_url=url, timeout=30) as client:
        ready = client.get("/readyz")
        while ready.json()["status"] == "loading":
            ready = client.get("/readyz")
        assert ready.status_code == 200
        body = {"cell_type": SEEN, "perturbations": [model.genes[0]]}
        assert client.post("/predict", json=body).status_code == 401
        r = client.post("/predict", json=body, headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.json()["predictions"][0]["perturbation"] == model.genes[0]
        r = client.post("/predict", json={**body, "perturbations": list(model.genes[:4])},
                        headers={"Authorization": "Bearer k3y"})  # fmt: skip
        assert r.status_code == 413
    assert main(["serve", "--checkpoint", str(model.run / "missing.pt")]) == 2
    assert "ptrag serve: error: no checkpoint at" in capsys.readouterr().err


def test_ptrag_serve_workers_hand_the_flags_to_every_process(model, monkeypatch) -> None:
    import os

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    for name in ("PTRAG_CHECKPOINT", "PTRAG_INDEX_DIR", "PTRAG_DEVICE", "PTRAG_MODEL_THREADS", "PTRAG_PIN_CORES"):
        monkeypatch.setenv(name, "placeholder")  # restored after the test: serve writes these
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(affinity, "available_cores", lambda: list(range(8)))
    argv = ["serve", "--checkpoint", str(model.checkpoint), "--index", str(model.run / "index"), "--workers", "2",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert served["app"] == "api.app:app" and served["workers"] == 2  # an import string: each worker builds it
    assert os.environ["PTRAG_CHECKPOINT"] == str(model.checkpoint)
    assert os.environ["PTRAG_INDEX_DIR"] == str(model.run / "index") and os.environ["PTRAG_DEVICE"] == "cpu"
    assert os.environ["PTRAG_MODEL_THREADS"] == "4"  # 8 cores / 2 workers
    worker = Settings()  # what each worker process reads back
    assert (worker.checkpoint, worker.index_dir, worker.model_threads) == (model.checkpoint, model.run / "index", 4)
    assert worker.pin_cores is True  # auto: 2 workers on 8 cores, a core each
    monkeypatch.delenv("PTRAG_PIN_CORES")
    assert main([*argv, "--pin-cores", "off"]) == 0 and Settings().pin_cores is False
    monkeypatch.setattr(affinity, "available_cores", lambda: [3])  # more workers than cores: auto leaves it off
    assert main(argv) == 0 and Settings().pin_cores is False
    assert main([*argv, "--pin-cores", "on"]) == 0 and Settings().pin_cores is True
    assert main(["serve", "--checkpoint", str(model.checkpoint), "--workers", "0"]) == 2
