"""The prediction service in process (TestClient): each endpoint's full contract, each error, auth, request ids,
the .npy option, warnings, readiness. A tiny model is trained once per session (``trained()``), on a zero-shot
split so that one cell type (rpe1) has no training perturbations in the store."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import SMALL, _config

from api.app import (
    Settings,
    _BatchedLineHandler,
    _new_request_id,
    _top_genes,
    create_app,
    load_predictor,
    resolve_device,
)
from model.pipeline import RunConfig, run_main_job
from model.predict import Predictor
from model.train import train

ZERO_SHOT, SEEN = "rpe1", "k562"


@dataclasses.dataclass(frozen=True)
class Trained:
    run: Path  # the main job's run directory (cells, split, index, embeddings)
    checkpoint: Path
    aliases: Path  # {"OLD<gene>": "<gene>"} for the first two genes of the embedding table
    genes: tuple[str, ...]  # perturbable genes (embedding table symbols)


_TRAINED: list[Trained] = []


def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny model (a few steps), trained once per test session and shared by the test_api_* modules."""
    if not _TRAINED:
        root = tmp_path_factory.mktemp("api_model")
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        # The main job's later stages (its own serving model, the benchmark), where present, are not needed here.
        later = {"stop_after": "index", "benchmark": False, "train_steps": 1}
        quick = {k: v for k, v in later.items() if k in fields}
        run_main_job(RunConfig(out=root / "run", seed=0, simulator=SMALL, n_sample_cells=8,
                               split_kind="zeroshot_celltype", **quick))  # fmt: skip
        train(_config(root / "run", root / "train", max_steps=2, eval_every=2))
        symbols = tuple(Predictor.load(root / "train" / "last.pt").store.index.embeddings.symbols)
        aliases = root / "aliases.json"
        aliases.write_text(json.dumps({f"OLD{g}": g for g in symbols[:2]}))
        _TRAINED.append(Trained(root / "run", root / "train" / "last.pt", aliases, symbols))
    return _TRAINED[0]


@contextmanager
def serve(app) -> Iterator[str]:
    """A real uvicorn server for ``app`` on 127.0.0.1 (a free port); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


def settings_for(model: Trained, **kw) -> Settings:
    return Settings(**{"checkpoint": model.checkpoint, "load_in_background": False, "model_threads": 1, **kw})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Trained:
    return trained(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    # On the device the app picks (auto: CUDA on a GPU machine), so that answers can be compared bit for bit.
    return Predictor.load(model.checkpoint, device=resolve_device("auto"))


@pytest.fixture(scope="module")
def client(model) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(model, aliases=model.aliases, max_perturbations=4, max_cells=100))) as c:
        yield c


def _rid(r) -> str:
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    return rid


ZERO_SHOT_WARNING = (
    "cell type 'rpe1' has no training perturbations in the retrieval store (zero-shot): every candidate comes "
    "from another cell type"
)


# --- health, readiness, info --------------------------------------------------------------------------------


def test_healthz_readyz_and_info(client, model, predictor) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready", "detail": None})
    r = client.get("/info")
    assert r.status_code == 200
    body = r.json()
    stats = body.pop("batcher")
    assert set(stats) == {"calls", "items", "jobs", "multi_job_calls", "largest_call"}
    assert body.pop("worker") == {"pid": os.getpid(), "cpu_core": None}  # not pinned unless asked
    from model.train import load_checkpoint

    state = load_checkpoint(model.checkpoint)["train_state"]
    assert body == {
        "model_variant": "ptrag",
        "cell_types": ["hepg2", "jurkat", "k562", "rpe1"],
        "zero_shot_cell_types": ["rpe1"],
        "n_known_genes": len(model.genes),
        "embedding_source": "simulated-genept",
        "n_genes": 120,
        "genes": predictor.genes,
        "batches": [],
        "split_id": predictor.split_id,
        "split_kind": "zeroshot_celltype",
        "checkpoint_step": 2,
        "validation_metric": "val_energy_distance",
        "validation_value": pytest.approx(state["best_val"]),
        "retrieval": str(model.run / "index"),
        "device": resolve_device("auto"),
        "limits": {
            "max_perturbations": 4,
            "max_cells": 100,
            "batch_wait_ms": 10.0,
            "batch_grace_ms": 2.0,
            "batch_max_items": 64,
        },
    }
    assert client.get("/openapi.json").json()["paths"].keys() == {"/healthz", "/readyz", "/info", "/predict"}
    assert client.get("/docs").status_code == 200


def test_readyz_503_until_loaded_and_predict_503(model) -> None:
    gate = threading.Event()

    def slow_loader(settings: Settings) -> Predictor:
        assert gate.wait(20)
        return load_predictor(settings)

    app = create_app(settings_for(model, load_in_background=True), loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert (r.status_code, r.json()) == (503, {"status": "loading", "detail": "the model is loading"})
        r = c.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[0]]})
        assert (r.status_code, r.json()) == (503, {
            "error": "not_ready", "detail": "model not loaded: the model is still loading", "request_id": _rid(r),
        })  # fmt: skip
        assert c.get("/healthz").status_code == 200
        gate.set()
        deadline = time.monotonic() + 20
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.02)
        assert c.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[0]]}).status_code == 200


def test_readyz_reports_load_failure_and_unconfigured(tmp_path) -> None:
    missing = tmp_path / "missing.pt"
    with TestClient(create_app(Settings(checkpoint=missing))) as c:
        deadline = time.monotonic() + 20
        while (r := c.get("/readyz")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (r.status_code, r.json()) == (503, {"status": "failed", "detail": f"FileNotFoundError: no checkpoint "
                                                                                 f"at {missing}"})  # fmt: skip
        assert c.get("/info").status_code == 503
    with TestClient(create_app(Settings(checkpoint=None))) as c:
        r = c.get("/readyz")
        assert (r.status_code, r.json()) == (503, {
            "status": "unconfigured", "detail": "no checkpoint configured: set PTRAG_CHECKPOINT",
        })  # fmt: skip


# --- predict: the contract ----------------------------------------------------------------------------------


def _assert_matches(pred: dict, expected, genes: list[str], top_n: int) -> None:
    """One JSON prediction against the Predictor's own output for the same request."""
    delta = np.asarray(expected.delta)
    assert pred["perturbation"] == expected.perturbation
    np.testing.assert_allclose(pred["delta"], delta, atol=1e-5)
    np.testing.assert_allclose(pred["profile"], expected.cells.mean(0), atol=1e-5)
    order = np.argsort(delta)
    assert [t["gene"] for t in pred["top_up"]] == [genes[j] for j in order[::-1][:top_n] if delta[j] > 0]
    assert [t["gene"] for t in pred["top_down"]] == [genes[j] for j in order[:top_n] if delta[j] < 0]
    assert all(t["delta"] == pytest.approx(delta[genes.index(t["gene"])], abs=1e-6) for t in pred["top_up"])
    cand = expected.candidates
    assert [c["id"] for c in pred["candidates"]] == cand["id"].tolist()
    assert [c["selected"] for c in pred["candidates"]] == cand["selected"].tolist()
    np.testing.assert_allclose([c["weight"] for c in pred["candidates"]], cand["weight"], atol=1e-6)
    assert pred["warnings"] == expected.warnings


def test_predict_full_contract(client, model, predictor) -> None:
    genes = [model.genes[0], f"{model.genes[1]}+{model.genes[2]}"]
    r = client.post("/predict", json={"cell_type": ZERO_SHOT, "perturbations": genes, "n_cells": 16, "seed": 3,
                                      "top_n": 5})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    preds = body.pop("predictions")
    assert body == {
        "request_id": _rid(r),
        "cell_type": ZERO_SHOT,
        "model_variant": "ptrag",
        "genes": predictor.genes,
        "n_cells": 16,
        "control_cells": None,
        "warnings": [],
    }
    expected = predictor.predict(ZERO_SHOT, genes, n_cells=16, seed=3)
    assert len(preds) == 2
    for pred, exp in zip(preds, expected, strict=True):
        assert set(pred) == {"perturbation", "delta", "profile", "cells", "top_up", "top_down", "candidates",
                             "warnings"}  # fmt: skip
        assert pred["cells"] is None and len(pred["delta"]) == len(pred["profile"]) == 120
        assert len(pred["top_up"]) <= 5 and len(pred["top_down"]) <= 5 and pred["top_up"] and pred["top_down"]
        assert set(pred["candidates"][0]) == {"id", "cell_type", "perturbation", "cosine", "score", "weight",
                                              "selected"}  # fmt: skip
        assert {c["cell_type"] for c in pred["candidates"]} <= {"hepg2", "jurkat", "k562"}
        assert pred["warnings"] == [ZERO_SHOT_WARNING]
        _assert_matches(pred, exp, predictor.genes, 5)
    # Without return_cells the server predicts only the mean; its JSON numbers read back as the same float32.
    for pred, exp in zip(preds, predictor.predict(ZERO_SHOT, genes, n_cells=16, seed=3, cells=False), strict=True):
        assert exp.cells is None
        np.testing.assert_array_equal(np.asarray(pred["delta"], np.float32), exp.delta.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(pred["profile"], np.float32), exp.mean)
        top = pred["top_up"][0]
        assert np.float32(top["delta"]) == exp.delta.astype(np.float32)[predictor.genes.index(top["gene"])]


def test_predict_defaults_and_return_cells(client, model, predictor) -> None:
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[3]], "return_cells": True})
    assert r.status_code == 200
    body = r.json()
    (exp,) = predictor.predict(SEEN, [model.genes[3]])  # n_cells 64, seed 0
    assert body["n_cells"] == 64 and body["warnings"] == []
    np.testing.assert_array_equal(np.asarray(body["control_cells"], dtype=np.float32), exp.ctrl)
    (pred,) = body["predictions"]
    np.testing.assert_allclose(pred["cells"], exp.cells, atol=1e-5)
    assert pred["warnings"] == []  # a cell type with training entries: no zero-shot warning
    _assert_matches(pred, exp, predictor.genes, 20)


def test_own_control_cells_fill_and_ignore(client, model, predictor) -> None:
    rng = np.random.default_rng(0)
    given = predictor.genes[5:]  # the first five model genes are missing
    values = rng.uniform(0, 3, size=(7, len(given) + 1))
    r = client.post("/predict", json={
        "cell_type": SEEN, "perturbations": [model.genes[0]], "n_cells": 99, "return_cells": True,
        "control_cells": {"genes": [*given, "NOT_A_MODEL_GENE"], "values": values.tolist()},
    })  # fmt: skip
    assert r.status_code == 200
    body = r.json()
    assert body["n_cells"] == 7  # n_cells is ignored with control_cells
    assert body["warnings"] == [
        "1 control_cells genes are not model genes and were ignored: NOT_A_MODEL_GENE",
        f"5 model genes missing from control_cells were filled with the cached control mean of 'k562': "
        f"{', '.join(predictor.genes[:5])}",
    ]
    ctrl = np.empty((7, 120), dtype=np.float32)
    ctrl[:, 5:] = values[:, :-1]
    ctrl[:, :5] = predictor.controls[SEEN].mean(0)[:5]
    np.testing.assert_allclose(body["control_cells"], ctrl, atol=1e-6)
    (exp,) = predictor.predict(SEEN, [model.genes[0]], ctrl=ctrl)
    _assert_matches(body["predictions"][0], exp, predictor.genes, 20)


def test_alias_resolution_is_reported_and_predicts_as_the_symbol(client, model) -> None:
    gene = model.genes[0]
    via_alias = client.post("/predict", json={"cell_type": SEEN, "perturbations": [f"OLD{gene}"]}).json()
    direct = client.post("/predict", json={"cell_type": SEEN, "perturbations": [gene]}).json()
    (a,), (d,) = via_alias["predictions"], direct["predictions"]
    assert a["perturbation"] == f"OLD{gene}" and a["warnings"] == [
        f"gene 'OLD{gene}' resolved through an alias to '{gene}'"
    ]
    assert a["delta"] == d["delta"] and a["candidates"] == d["candidates"]


def test_npy_round_trip(client, model) -> None:
    perts = [model.genes[0], model.genes[4]]
    body = {"cell_type": ZERO_SHOT, "perturbations": perts, "n_cells": 8}
    as_json = client.post("/predict", json=body).json()
    r = client.post("/predict", json=body, headers={"Accept": "application/x-npy", "X-Request-ID": "npy-1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    assert r.headers["x-request-id"] == "npy-1" and r.headers["x-array"] == "delta"
    assert json.loads(r.headers["x-perturbations"]) == perts
    assert json.loads(r.headers["x-warnings"]) == [ZERO_SHOT_WARNING]
    deltas = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert deltas.dtype == np.float32 and deltas.shape == (2, 120)
    np.testing.assert_array_equal(deltas, np.asarray([p["delta"] for p in as_json["predictions"]], np.float32))
    r = client.post("/predict", json={**body, "return_cells": True}, headers={"Accept": "application/x-npy"})
    cells = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert r.headers["x-array"] == "cells" and cells.shape == (2, 8, 120) and cells.dtype == np.float32
    np.testing.assert_allclose(cells.mean(1), np.asarray([p["profile"] for p in as_json["predictions"]]), atol=1e-5)


# --- predict: errors ----------------------------------------------------------------------------------------


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body.pop("request_id") == r.headers["x-request-id"]
    return body


def test_unknown_gene_is_422_with_suggestions(client, model) -> None:
    typo = model.genes[0].lower()
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [f"{typo}+{model.genes[1]}"]})
    body = _error(r, 422)
    suggestions = body["suggestions"][typo]
    assert suggestions[0] == model.genes[0] and len(suggestions) == 3  # the same name in another case first
    assert body == {
        "error": "unknown_gene",
        "detail": "unknown gene(s), not in the gene embedding table: "
        f"{typo!r} (did you mean {', '.join(map(repr, suggestions))}?)",
        "unknown": [typo],
        "suggestions": {typo: suggestions},
    }


def test_the_batcher_counts_requests_until_their_answer_is_handed_over(model) -> None:
    # What the micro-batcher reads: /predict requests in the server and not in its queue. A request counts from
    # arrival until the last part of its response is handed to the server (not after: a lone client's next request
    # would find its last one still counted and wait for it), and requests that fail count until their error is sent.
    seen: list[int] = []
    with TestClient(create_app(settings_for(model, batch_wait_ms=2000, batch_grace_ms=2000))) as c:
        gauge = c.app.state.predict_requests
        batcher = c.app.state.service.batcher
        fn = batcher.fn
        batcher.fn = lambda items: seen.append((gauge.count(), batcher._expected())) or fn(items)
        start = time.perf_counter()
        for seed in range(3):
            r = c.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[0]], "seed": seed})
            assert r.status_code == 200
        elapsed = time.perf_counter() - start
        assert _error(c.post("/predict", json={"cell_type": "nope", "perturbations": [model.genes[0]]}), 422)
        assert _error(c.post("/predict", json={"cell_type": SEEN, "perturbations": ["NOPE1"]}), 422)
        assert c.get("/healthz").status_code == 200
        assert gauge.count() == 0
    assert seen == [(1, 0)] * 3  # each call: its own request in the server, nothing else expected
    assert elapsed < 3.0  # no request sat out the 2 s window


def test_unknown_cell_type_and_batch_are_422(client, model) -> None:
    r = client.post("/predict", json={"cell_type": "K562", "perturbations": [model.genes[0]]})
    assert _error(r, 422) == {
        "error": "unknown_cell_type",
        "detail": "unknown cell type 'K562' (did you mean 'k562'?); the model knows "
        "['hepg2', 'jurkat', 'k562', 'rpe1']",
        "unknown": ["K562"],
        "suggestions": {"K562": ["k562"]},
    }
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[0]], "batch": "gem1"})
    assert _error(r, 422) == {
        "error": "unknown_batch", "detail": "unknown batch 'gem1'; the model knows none", "unknown": ["gem1"],
        "suggestions": {"gem1": []},
    }  # fmt: skip


def test_limits_are_413(client, model) -> None:
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": list(model.genes[:5])})
    assert _error(r, 413) == {"error": "too_large", "detail": "5 perturbations; at most 4 per request"}
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[0]], "n_cells": 101})
    assert _error(r, 413) == {"error": "too_large", "detail": "101 cells; at most 100 per request"}
    control = {"genes": ["GENE0001"], "values": [[1.0]] * 101}
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [model.genes[0]], "control_cells": control})
    assert _error(r, 413) == {"error": "too_large", "detail": "101 cells; at most 100 per request"}
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": list(model.genes[:4]), "n_cells": 100})
    assert r.status_code == 200  # at the limits


def _validation(r, loc: list, type_: str) -> str:
    body = _error(r, 422)
    (err,) = body.pop("detail")
    assert body == {} and (err["loc"], err["type"]) == (loc, type_), err
    return err["msg"]


def test_malformed_bodies_are_422(client, model) -> None:
    gene = model.genes[0]
    raw = {"content-type": "application/json"}
    r = client.post("/predict", content=b'{"cell_type": "k562", "perturbations": [', headers=raw)
    assert _validation(r, ["body", 40], "json_invalid") == "JSON decode error"
    r = client.post("/predict", content=b"\xff\xfea\x80v", headers=raw)  # not UTF-8: FastAPI's own 400, made a 422
    detail = "There was an error parsing the body: send a JSON PredictRequest body"
    assert _error(r, 422) == {"error": "invalid_request", "detail": detail}
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": []})
    _validation(r, ["body", "perturbations"], "too_short")
    r = client.post("/predict", json={"cell_type": SEEN})
    _validation(r, ["body", "perturbations"], "missing")
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": gene})
    _validation(r, ["body", "perturbations"], "list_type")
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [gene], "n_cells": "many"})
    _validation(r, ["body", "n_cells"], "int_parsing")
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [gene], "n_cells": 0})
    _validation(r, ["body", "n_cells"], "greater_than_equal")
    r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [gene], "ncells": 8})
    _validation(r, ["body", "ncells"], "extra_forbidden")
    r = client.post("/predict", json=[1, 2])
    _validation(r, ["body"], "model_attributes_type")
    for label, detail in [
        ("A++B", "malformed perturbation label 'A++B': empty gene name around '+'"),
        ("non-targeting", "'non-targeting' is the control label: it names no gene to perturb"),
    ]:
        r = client.post("/predict", json={"cell_type": SEEN, "perturbations": [label]})
        assert _error(r, 422) == {"error": "invalid_request", "detail": detail}


def test_bad_control_cells_are_422(client, model, predictor) -> None:
    base = {"cell_type": SEEN, "perturbations": [model.genes[0]]}
    genes = predictor.genes[:2]
    raw = {"content-type": "application/json"}
    for token in (b"NaN", b"Infinity", b"-Infinity"):  # Python's JSON parser accepts these; the schema must not
        body = {**base, "control_cells": {"genes": genes, "values": [[1.0, 0.0]]}}
        content = json.dumps(body).replace("0.0]]", f"{token.decode()}]]").encode()
        r = client.post("/predict", content=content, headers=raw)
        assert _validation(r, ["body", "control_cells", "values", 0, 1], "finite_number") == (
            "Input should be a finite number"
        )
    r = client.post("/predict", json={**base, "control_cells": {"genes": genes, "values": [[1.0, 2.0], [1.0]]}})
    assert _validation(r, ["body", "control_cells"], "value_error") == (
        "Value error, every row of 'values' must have 2 entries (one per gene), got lengths [1, 2]"
    )
    r = client.post("/predict", json={**base, "control_cells": {"genes": [genes[0], genes[0]], "values": [[1, 2]]}})
    assert _validation(r, ["body", "control_cells"], "value_error") == (
        f"Value error, 'genes' names a gene more than once: ['{genes[0]}']"
    )
    r = client.post("/predict", json={**base, "control_cells": {"genes": genes, "values": []}})
    _validation(r, ["body", "control_cells", "values"], "too_short")
    r = client.post("/predict", json={**base, "control_cells": {"genes": ["x", "y"], "values": [[1, 2]]}})
    assert _error(r, 422) == {
        "error": "invalid_request",
        "detail": "none of the 2 control_cells genes is a model gene (e.g. ['x', 'y']); the model's genes are "
        "listed by GET /info",
    }
    r = client.post("/predict", json={**base, "control_cells": {"genes": genes, "values": [[1.0, 1e300]]}})
    assert _error(r, 422) == {
        "error": "invalid_request", "detail": "control_cells values overflow float32 (log-normalised data?)",
    }  # fmt: skip


# --- auth, request ids, logs --------------------------------------------------------------------------------


def test_api_key(model) -> None:
    body = {"cell_type": SEEN, "perturbations": [model.genes[0]]}
    with TestClient(create_app(settings_for(model, api_key="s3cret"))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for r in (c.get("/info", headers=headers), c.post("/predict", json=body, headers=headers)):
                assert _error(r, 401) == {
                    "error": "unauthorized",
                    "detail": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                }
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/info", headers=ok).status_code == 200
        assert c.post("/predict", json=body, headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # always open
    with TestClient(create_app(settings_for(model))) as c:  # no key configured: open
        assert c.get("/info").status_code == 200
        assert c.post("/predict", json=body, headers={"Authorization": "Bearer anything"}).status_code == 200


def test_request_ids_and_access_log(client, model, caplog) -> None:
    access = logging.getLogger("api.access")
    access.addHandler(caplog.handler)
    try:
        body = {"cell_type": SEEN, "perturbations": [model.genes[0], model.genes[1]]}
        r = client.post("/predict", json=body, headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
        r = client.post("/predict", json={**body, "cell_type": "liver"}, headers={"X-Request-ID": "err-1"})
        assert r.status_code == 422 and r.headers["x-request-id"] == "err-1" and r.json()["request_id"] == "err-1"
        r = client.post("/predict", json=body, headers={"X-Request-ID": "has space"})  # not echoed: replaced
        assert r.headers["x-request-id"] != "has space" and r.json()["request_id"] == _rid(r)
        assert client.get("/healthz").headers["x-request-id"] != r.headers["x-request-id"]
    finally:
        access.removeHandler(caplog.handler)
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "api.access"]
    assert [(x["request_id"], x["path"], x["status"], x["n_perturbations"]) for x in lines[:2]] == [
        ("abc-123", "/predict", 200, 2), ("err-1", "/predict", 422, 2),
    ]  # fmt: skip
    assert lines[-1]["path"] == "/healthz" and lines[-1]["n_perturbations"] is None
    assert all(x["method"] in ("GET", "POST") and x["duration_ms"] > 0 for x in lines)


def test_access_log_handler_writes_every_line_in_order_and_flushes_at_close() -> None:
    stream = io.StringIO()
    handler = _BatchedLineHandler(stream, interval=0.02)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda rec: "skip" not in rec.getMessage())
    log = logging.getLogger("test.batched_lines")
    log.propagate, log.level = False, logging.INFO
    log.addHandler(handler)
    try:
        for i in range(50):
            log.info("line %d", i)
        log.info("skip me")
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\n") < 50 and time.monotonic() < deadline:  # the writer thread, unprompted
            time.sleep(0.01)
        assert stream.getvalue().splitlines() == [f"line {i}" for i in range(50)]
        for i in range(50, 60):
            log.info("line %d", i)
    finally:
        log.removeHandler(handler)
        handler.close()  # what is still queued is written, not lost
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(60)]
    assert not handler._writer.is_alive()


def test_access_log_writer_survives_a_failing_stream(capsys) -> None:
    class Flaky(io.StringIO):
        fail = True

        def write(self, text: str) -> int:
            if self.fail:
                self.fail = False
                raise OSError("disk full")
            return super().write(text)

    stream = Flaky()
    handler = _BatchedLineHandler(stream, interval=0.02)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "first", None, None)
    handler.handle(record)
    handler.flush()  # the write fails: reported, not raised
    assert "disk full" in capsys.readouterr().err
    handler.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "second", None, None))
    handler.close()
    assert stream.getvalue() == "second\n"


def test_generated_request_ids_are_unique_32_hex() -> None:
    ids = [_new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# --- the batcher in process: batched items equal unbatched ---------------------------------------------------


def test_predict_items_batched_equals_one_by_one(predictor, model) -> None:
    """Items of different cell types, control sets and sizes in one call give what each gives alone.

    Not bit-exact: a batched forward multiplies larger matrices, whose kernels may sum in another order, so
    results agree to float32 rounding (observed < 1e-6), hence the 1e-5 tolerance."""
    g = model.genes
    items = (predictor.make_items(ZERO_SHOT, [g[0], f"{g[1]}+{g[2]}"], n_cells=16, seed=1)
             + predictor.make_items(SEEN, [g[0]], n_cells=8, seed=2)
             + predictor.make_items("hepg2", [g[3], g[0]], n_cells=16, seed=3))  # fmt: skip
    together = predictor.predict_items(items)
    alone = [predictor.predict_items([it])[0] for it in items]
    assert [p.perturbation for p in together] == [g[0], f"{g[1]}+{g[2]}", g[0], g[3], g[0]]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.cells, b.cells, atol=1e-5, rtol=0)
        assert a.candidates["id"].tolist() == b.candidates["id"].tolist()
        assert a.warnings == b.warnings
    # Items really differ: same perturbation, other cell type or control set, other prediction.
    assert not np.allclose(together[0].cells.mean(0), together[4].cells.mean(0))


@pytest.mark.parametrize("cells", [True, False])
def test_prediction_delta_is_mean_minus_its_own_control_mean(predictor, model, cells: bool) -> None:
    # The control means come from the forward pass, per item, in a batch of items with different control sets.
    g = model.genes
    items = predictor.make_items(SEEN, [g[0], g[1]], n_cells=16, seed=4, cells=cells) + predictor.make_items(
        "hepg2", [g[0]], n_cells=8, seed=5, cells=cells)  # fmt: skip
    preds = predictor.predict_items(items)
    for p, it in zip(preds, items, strict=True):
        assert p.ctrl_mean is not None and p.ctrl_mean.shape == (len(predictor.genes),)
        np.testing.assert_allclose(p.ctrl_mean, it.ctrl.mean(0), atol=1e-5, rtol=0)
        np.testing.assert_allclose(p.delta, p.mean - it.ctrl.mean(0), atol=1e-5, rtol=0)
    assert not np.allclose(preds[0].ctrl_mean, preds[2].ctrl_mean)  # other cell type: other controls


def test_checkpoint_with_non_finite_cached_controls_is_refused(predictor, model) -> None:
    # Draws from the cache are not re-checked per request, so the cache itself is checked when a model loads.
    from model.train import CONTROLS, load_checkpoint

    ckpt = load_checkpoint(model.checkpoint)
    ckpt[CONTROLS][SEEN][3, 1] = float("nan")
    with pytest.raises(ValueError, match=f"cached control cells of '{SEEN}' in the checkpoint .* contains NaN or inf"):
        Predictor(predictor.model, predictor.store, ckpt, device=predictor.device)
    ckpt = load_checkpoint(model.checkpoint)
    ckpt[CONTROLS][SEEN] = ckpt[CONTROLS][SEEN][:, :-1]  # a gene short
    with pytest.raises(ValueError, match=r"must be \(n, \d+\) cells x genes, got shape"):
        Predictor(predictor.model, predictor.store, ckpt, device=predictor.device)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=60), st.integers(0, 70), st.booleans())
def test_top_genes_equal_a_full_stable_sort(values: list[int], top_n: int, ties: bool) -> None:
    # The response's top_up/top_down come from a partial sort; they must be what sorting all genes gave.
    delta = np.asarray(values, np.float32) if ties else np.random.default_rng(len(values)).standard_normal(
        len(values)).astype(np.float32)  # fmt: skip
    order = np.argsort(delta, kind="stable")
    n = min(top_n, delta.size)
    want_up = [int(j) for j in order[::-1][:n] if delta[j] > 0]
    want_down = [int(j) for j in order[:n] if delta[j] < 0]
    assert _top_genes(delta, top_n) == (want_up, want_down)


def test_only_requests_with_known_names_run_on_the_event_loop(model, predictor) -> None:
    # Fuzzy matching an unknown name scans the gene table: such requests go to the threadpool, not the loop.
    gene = model.genes[0]
    assert predictor.knows(SEEN, [gene, f"{model.genes[1]}+{model.genes[2]}"])
    for body in (
        {"cell_type": SEEN, "perturbations": [gene + "X"]},  # a typo
        {"cell_type": SEEN, "perturbations": [f"OLD{model.genes[0]}"]},  # an alias
        {"cell_type": "liver", "perturbations": [gene]},
        {"cell_type": SEEN, "perturbations": [gene], "batch": "nope"},
    ):
        assert not predictor.knows(body["cell_type"], body["perturbations"], body.get("batch")), body
    assert not predictor.knows(SEEN, ["A++B"])  # malformed: the threadpool path raises the 422
