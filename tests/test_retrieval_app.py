"""The HTTP service (one test per outcome, full bodies), the client, and a real uvicorn server."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

import retrieval_service.app as app_mod
from retrieval_service.app import Settings, create_app, get_loaded_store, get_settings
from retrieval_service.client import (
    InvalidQueryError,
    RetrievalClient,
    ServerError,
    ServiceUnavailableError,
    TransportError,
    UnknownGeneError,
)
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.schemas import ArrayPayload, SearchRequest
from retrieval_service.store import Store, build_store

D = 16


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    genes = (*[f"G{i}" for i in range(40)], "TP53", "TP63")
    emb = GeneEmbeddings(genes, rng.standard_normal((len(genes), D)).astype(np.float32), "test-emb")
    labels = [f"G{i}" for i in range(15)] * 2 + ["G1+G2", "TP53"]
    cell_types = ["K562"] * 15 + ["RPE1"] * 15 + ["K562", "RPE1"]
    n = len(labels)
    return build_store(
        tmp_path_factory.mktemp("svc") / "idx",
        cell_types=cell_types,
        labels=labels,
        arrays={
            "delta": rng.standard_normal((n, 5)).astype(np.float32),
            "n_cells": rng.integers(1, 50, n),
        },
        gene_embeddings=emb,
        split_id="split-a",
        forbidden_pairs=[("K562", "TP53")],
        extras={"control_mean": np.arange(10, dtype=np.float32).reshape(2, 5)},
        extras_meta={"control_mean": {"cell_types": ["K562", "RPE1"]}},
        attrs={"feature_names": list("abcde")},
    )


@pytest.fixture(scope="module")
def store(store_dir: Path) -> Store:
    return Store.open(store_dir)


@pytest.fixture
def client(store_dir: Path) -> Iterator[TestClient]:
    app = create_app(Settings(index_dir=store_dir, load_in_background=False, max_batch=4, max_k=8))
    with TestClient(app) as c:
        yield c


def _payload(arr: np.ndarray) -> dict:
    return ArrayPayload.from_array(arr).model_dump()


# --- health ------------------------------------------------------------------------------------------------


def test_healthz_and_readyz_when_loaded(client: TestClient) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready", "detail": None, "n_entries": 32})


def test_readyz_503_until_loaded(store_dir: Path) -> None:
    gate = threading.Event()

    def slow_loader(settings: Settings) -> Store:
        assert gate.wait(10)
        return Store.open(settings.index_dir)

    app = create_app(Settings(index_dir=store_dir), loader=slow_loader)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert (r.status_code, r.json()) == (
            503,
            {"status": "loading", "detail": "the index is loading", "n_entries": None},
        )
        r = c.post("/search", json={"genes": ["G1"], "k": 1})
        assert (r.status_code, r.json()) == (
            503,
            {"error": "not_ready", "detail": "index not loaded: the index is still loading"},
        )
        gate.set()
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "store never became ready"
            time.sleep(0.02)
        assert c.post("/search", json={"genes": ["G1"], "k": 1}).status_code == 200


def test_readyz_reports_load_failure(tmp_path: Path) -> None:
    app = create_app(Settings(index_dir=tmp_path / "missing"))
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while (body := c.get("/readyz").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503
        assert body["status"] == "failed"
        assert body["detail"] == f"FileNotFoundError: index directory {tmp_path / 'missing'} does not exist"


def test_search_threads_limited_while_serving_and_restored(store_dir: Path) -> None:
    # In a fresh interpreter: another test module loads an OpenMP build of OpenBLAS into the pytest process, after
    # which threadpoolctl no longer changes numpy's OpenBLAS there, and this check would fail for that reason alone.
    code = textwrap.dedent(f"""
        import faiss
        from threadpoolctl import threadpool_info
        from fastapi.testclient import TestClient
        from retrieval_service.app import Settings, create_app

        def numpy_blas_threads():
            return [lib["num_threads"] for lib in threadpool_info() if "scipy_openblas" in lib["filepath"]]

        omp_calls = []
        faiss.omp_set_num_threads = omp_calls.append
        before = numpy_blas_threads()
        assert before, "numpy's OpenBLAS not found"
        settings = Settings(index_dir={str(store_dir)!r}, search_threads=1, load_in_background=False)
        with TestClient(create_app(settings)) as c:
            assert set(numpy_blas_threads()) == {{1}}, numpy_blas_threads()  # process-wide
            assert c.post("/search", json={{"genes": ["G1"], "k": 1}}).status_code == 200
            assert omp_calls == [1], omp_calls  # OpenMP is per thread: set in the thread that searched
            assert c.post("/search", json={{"genes": ["G2"], "k": 1}}).status_code == 200
            assert omp_calls == [1], omp_calls  # once per thread, not per request
        assert numpy_blas_threads() == before, (numpy_blas_threads(), before)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_settings_are_app_state_not_a_dependency_override(store_dir: Path) -> None:
    # FastAPI re-inspects an overridden dependency on every request: create_app(settings) must not use one
    app = create_app(Settings(index_dir=store_dir, load_in_background=False, max_batch=2))
    assert app.dependency_overrides == {}
    with TestClient(app) as c:
        r = c.post("/search", json={"genes": ["G1"] * 3, "k": 1})
        assert (r.status_code, r.json()["detail"]) == (413, "3 queries; at most 2 per request")
        # an override still wins, for tests that swap settings after the app is built
        app.dependency_overrides[get_settings] = lambda: Settings(index_dir=store_dir, max_batch=5)
        assert c.post("/search", json={"genes": ["G1"] * 3, "k": 1}).status_code == 200


def test_unconfigured_service_and_store_override(store: Store) -> None:
    app = create_app(Settings(index_dir=None))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "unconfigured"
        assert c.get("/info").json() == {
            "error": "not_ready",
            "detail": "index not loaded: no index configured: set PTRAG_INDEX_DIR",
        }
        app.dependency_overrides[get_loaded_store] = lambda: store  # an already opened store, swapped in
        assert c.get("/readyz").json() == {"status": "ready", "detail": None, "n_entries": 32}
        assert c.get("/info").json() == store.info()


# --- search: success ---------------------------------------------------------------------------------------


def test_search_genes_full_body(client: TestClient, store: Store) -> None:
    r = client.post(
        "/search",
        json={"genes": ["G3", "G2+G1"], "k": 3, "cell_types": ["K562"], "return_profiles": ["delta", "n_cells"]},
    )
    assert r.status_code == 200
    res = store.query(genes=["G3", "G2+G1"], k=3, cell_types=["K562"], return_profiles=["delta", "n_cells"])
    assert res.ids[:, 0].tolist() == [3, 30]  # each label finds its own entry first
    expected = {
        "k": 3,
        "results": [
            {
                "query": q,
                "ids": res.ids[i].tolist(),
                "scores": res.scores[i].tolist(),
                "cell_types": ["K562"] * 3,
                "labels": res.labels[i].tolist(),
                "profiles": {
                    "delta": _payload(res.profiles["delta"][i]),
                    "n_cells": _payload(res.profiles["n_cells"][i]),
                },
            }
            for i, q in enumerate(["G3", "G2+G1"])
        ],
    }
    assert r.json() == expected


def test_search_vectors_with_padding_and_exclusions(client: TestClient, store: Store) -> None:
    q = store.index.keys[[0]]
    body = {"vectors": q.tolist(), "k": 8, "cell_types": ["RPE1"], "exclude_ids": [[15, 16]]}
    r = client.post("/search", json=body)
    assert r.status_code == 200
    (result,) = r.json()["results"]
    # RPE1 has 16 entries; excluding 2 leaves 14 >= 8: no padding, no excluded id
    assert len(result["ids"]) == 8 and -1 not in result["ids"] and not {15, 16} & set(result["ids"])
    assert result["query"] is None and set(result["cell_types"]) == {"RPE1"}
    # restricted to a cell type the store lacks: all padding, with nulls (JSON has no -inf)
    r = client.post("/search", json={"vectors": q.tolist(), "k": 2, "cell_types": ["HepG2"]})
    assert r.json()["results"][0] == {
        "query": None,
        "ids": [-1, -1],
        "scores": [None, None],
        "cell_types": [None, None],
        "labels": [None, None],
        "profiles": {},
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4"])
def test_search_vectors_as_array_payload_equals_list(client: TestClient, store: Store, dtype: str) -> None:
    rng = np.random.default_rng(11)
    q = rng.standard_normal((3, D)).astype(np.float32)
    common = {"k": 5, "exclude_ids": [[0], [], [1, 2]], "exclude_cell_types": ["RPE1"], "return_profiles": ["delta"]}
    by_list = client.post("/search", json={"vectors": q.tolist(), **common})
    by_array = client.post("/search", json={"vectors": _payload(q.astype(dtype)), **common})
    assert by_list.status_code == by_array.status_code == 200
    assert by_array.json() == by_list.json()
    res = store.query(vectors=q, **{k.replace("_ids", ""): v for k, v in common.items()})
    assert [r["ids"] for r in by_array.json()["results"]] == res.ids.tolist()
    assert [r["scores"] for r in by_array.json()["results"]] == res.scores.tolist()


@pytest.mark.parametrize(
    ("vectors", "loc", "message"),
    [
        ({"dtype": "<i4", "shape": [1, D], "data": ""}, "array", "must have a float dtype such as '<f4', got '<i4'"),
        ({"dtype": "nope", "shape": [1, D], "data": ""}, "array", "must have a float dtype such as '<f4', got 'nope'"),
        ({"dtype": "<f4", "shape": [D], "data": ""}, "array", f"must have shape [n, d] with n, d >= 1, got [{D}]"),
        (
            {"dtype": "<f4", "shape": [0, D], "data": ""},
            "array",
            f"must have shape [n, d] with n, d >= 1, got [0, {D}]",
        ),
        ({"dtype": "<f4", "shape": [1, D], "data": "AAAA"}, "array", f"and shape [1, {D}] is {4 * D} bytes, got 3"),
        ({"dtype": "<f4", "shape": [1, 1], "data": "AA A"}, "array", "data is not valid base64"),
        ({"dtype": "<f4", "shape": [1, D]}, "array.data", "Field required"),
        ([], "list", "List should have at least 1 item after validation, not 0"),
        ("abc", "list", "Input should be a valid list"),
    ],
)
def test_search_bad_vector_payloads(client: TestClient, vectors: object, loc: str, message: str) -> None:
    r = client.post("/search", json={"vectors": vectors, "k": 1})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "vectors", *loc.split(".")]
    assert message in error["msg"]


def test_search_array_payload_errors_from_the_index(client: TestClient) -> None:
    q = np.zeros((2, D), np.float32)
    q[1, 3] = np.nan  # an array payload carries NaN: the index refuses it, naming the row
    r = client.post("/search", json={"vectors": _payload(q), "k": 1})
    assert (r.status_code, r.json()) == (
        422,
        {"error": "invalid_query", "detail": "1 query vector(s) contain NaN or inf (rows [1])"},
    )
    r = client.post("/search", json={"vectors": _payload(np.zeros((1, 3), np.float32)), "k": 1})
    assert r.json()["detail"] == "queries have dimension 3 but the index keys have dimension 16"
    r = client.post("/search", json={"vectors": _payload(np.zeros((5, D), np.float32)), "k": 1})
    assert (r.status_code, r.json()["detail"]) == (413, "5 queries; at most 4 per request")


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-16"),  # json.loads detects UTF-16/32; pydantic-core's parser does not
        lambda text: b"\xef\xbb\xbf" + text.encode(),  # a UTF-8 byte order mark, likewise
        lambda text: text.replace('"G3"', '"G\\u0033"').encode(),  # escapes, parsed by pydantic-core
    ],
)
def test_search_json_body_parsed_as_json_loads_does(client: TestClient, encode) -> None:
    text = json.dumps({"genes": ["G3"], "k": 3, "cell_types": ["K562"]})
    plain = client.post("/search", content=text.encode(), headers={"content-type": "application/json"})
    other = client.post("/search", content=encode(text), headers={"content-type": "application/json"})
    assert plain.status_code == other.status_code == 200
    assert other.json() == plain.json()


def test_search_json_body_parsed_by_pydantic_core(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = []
    from_json = app_mod.pydantic_core.from_json
    monkeypatch.setattr(app_mod.pydantic_core, "from_json", lambda b, **kw: parsed.append(b) or from_json(b, **kw))
    body = json.dumps({"vectors": [[0.25] * D], "k": 1}).encode()
    assert client.post("/search", content=body, headers={"content-type": "application/json"}).status_code == 200
    assert parsed == [body]


def test_query_vectors_are_float32_in_either_form() -> None:
    q = np.random.default_rng(12).standard_normal((2, 3))  # float64: both forms give float32(q)
    for vectors in (q.tolist(), _payload(q), _payload(q.astype(np.float32))):
        got = SearchRequest.model_validate({"vectors": vectors}).query_vectors()
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, q.astype(np.float32))
    assert SearchRequest.model_validate({"genes": ["G1"]}).query_vectors() is None


def test_search_invalid_json_is_422(client: TestClient) -> None:
    r = client.post("/search", content=b'{"genes": ["G1"],', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json() == {
        "detail": [
            {
                "type": "json_invalid",
                "loc": ["body", 17],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": "Expecting property name enclosed in double quotes"},
            }
        ]
    }


@pytest.mark.parametrize(
    ("body", "inline_max", "inline"),
    [
        ({"genes": ["G3", "G1+G2"], "k": 4}, float("inf"), True),
        ({"genes": ["G3", "G1+G2"], "k": 4}, 0, False),
        ({"genes": ["G3", "G1+G2"], "k": 4}, 2 * 32 * D, True),  # 2 queries x 32 keys x 16 dims
        ({"genes": ["G3", "G1+G2"], "k": 4}, 2 * 32 * D - 1, False),
        ({"genes": ["G3", "TP5"], "k": 4}, float("inf"), False),  # unknown gene: a fuzzy match, off the loop
        ({"vectors": [[0.5] * D], "k": 4, "exclude_ids": [3]}, float("inf"), True),
    ],
)
def test_search_inline_or_threadpool_same_answer(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, body: dict, inline_max: float, inline: bool
) -> None:
    # cheap searches run on the event loop, others in the threadpool; the answer is the same either way
    threads = []
    search = app_mod._search
    monkeypatch.setattr(app_mod, "_search", lambda *a: threads.append(threading.get_ident()) or search(*a))
    for name in ("INLINE_MAX_WORK", "INLINE_ALL_CORES_MAX_WORK"):
        monkeypatch.setattr(app_mod, name, inline_max)
    got = client.post("/search", json=body)
    for name in ("INLINE_MAX_WORK", "INLINE_ALL_CORES_MAX_WORK"):
        monkeypatch.setattr(app_mod, name, 0)  # the reference: always in the threadpool
    reference = client.post("/search", json=body)
    assert (got.status_code, got.json()) == (reference.status_code, reference.json())
    loop_thread = client.portal.call(threading.get_ident)
    assert (threads[0] == loop_thread) is inline
    assert threads[1] != loop_thread


def test_runs_inline_needs_an_index_estimate(store: Store) -> None:
    body = SearchRequest.model_validate({"genes": ["G3"], "k": 1})
    settings = Settings()
    assert app_mod._runs_inline(body, store, settings)  # 32 keys x 16 dims: cheap
    assert not app_mod._runs_inline(body, types.SimpleNamespace(query=store.query), settings)  # no estimate


def test_searches_on_every_core_get_the_larger_inline_budget(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # 32 keys x 16 dims = 512 multiply-adds: between the two limits, so the thread setting decides.
    monkeypatch.setattr(app_mod, "INLINE_MAX_WORK", 100)
    monkeypatch.setattr(app_mod, "INLINE_ALL_CORES_MAX_WORK", 1000)
    monkeypatch.setattr(app_mod.os, "cpu_count", lambda: 4)
    body = SearchRequest.model_validate({"genes": ["G3"], "k": 1})
    assert app_mod._runs_inline(body, store, Settings())  # libraries' default: every core
    assert app_mod._runs_inline(body, store, Settings(search_threads=4))
    assert not app_mod._runs_inline(body, store, Settings(search_threads=2))  # searches overlap in the pool


def test_search_exclude_self_cell_type(client: TestClient) -> None:
    r = client.post("/search", json={"genes": ["G3"], "k": 1, "exclude_self_cell_type": "K562"})
    assert r.status_code == 200
    assert r.json()["results"][0]["ids"] != [3]
    r = client.post("/search", json={"genes": ["G3"], "k": 1, "exclude_self_cell_type": "K562", "cell_types": ["K562"]})
    assert 3 not in r.json()["results"][0]["ids"]


# --- search: errors ----------------------------------------------------------------------------------------


def test_unknown_gene_is_422_naming_it(client: TestClient) -> None:
    r = client.post("/search", json={"genes": ["TP53", "TP5+G1", "tp63"], "k": 1})
    assert r.status_code == 422
    assert r.json() == {
        "error": "unknown_gene",
        "detail": "unknown gene(s), not in the gene embedding table: "
        "'TP5' (did you mean 'TP53'?); 'tp63' (did you mean 'TP63', 'TP53'?)",
        "unknown": ["TP5", "tp63"],
        "suggestions": {"TP5": ["TP53"], "tp63": ["TP63", "TP53"]},
    }


def test_k_out_of_range(client: TestClient) -> None:
    r = client.post("/search", json={"genes": ["G1"], "k": 9})
    assert (r.status_code, r.json()) == (
        422,
        {"error": "invalid_query", "detail": "k=9 is above this service's limit of 8"},
    )
    r = client.post("/search", json={"genes": ["G1"], "k": 0})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "k"]
    assert r.json()["detail"][0]["msg"] == "Input should be greater than or equal to 1"


def test_wrong_vector_dimension(client: TestClient) -> None:
    r = client.post("/search", json={"vectors": [[0.1, 0.2, 0.3]], "k": 1})
    assert (r.status_code, r.json()) == (
        422,
        {"error": "invalid_query", "detail": "queries have dimension 3 but the index keys have dimension 16"},
    )
    r = client.post("/search", json={"vectors": [[0.1] * 16, [0.1] * 15], "k": 1})
    assert r.status_code == 422
    assert "all query vectors must have the same length, got lengths [15, 16]" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "give exactly one of 'genes' (perturbation labels) and 'vectors'"),
        ({"k": 1}, "give exactly one of 'genes' (perturbation labels) and 'vectors'"),
        ({"genes": ["G1"], "vectors": [[0.0] * 16]}, "give exactly one of 'genes' (perturbation labels) and 'vectors'"),
        ({"genes": []}, "List should have at least 1 item after validation, not 0"),
        ({"genes": ["G1"], "unknown_field": 1}, "Extra inputs are not permitted"),
    ],
)
def test_empty_or_malformed_request(client: TestClient, body: dict, message: str) -> None:
    r = client.post("/search", json=body)
    assert r.status_code == 422
    assert message in r.json()["detail"][0]["msg"]


def test_nan_vector_is_422(client: TestClient) -> None:
    content = '{"vectors": [[NaN' + ", 0.0" * 15 + ']], "k": 1}'  # Python's JSON parser accepts NaN
    r = client.post("/search", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "Input should be a finite number"


def test_oversized_batch_is_413(client: TestClient) -> None:
    r = client.post("/search", json={"genes": ["G1"] * 5, "k": 1})
    assert (r.status_code, r.json()) == (413, {"error": "too_large", "detail": "5 queries; at most 4 per request"})


def test_bad_exclusions_and_profile_names(client: TestClient) -> None:
    r = client.post("/search", json={"genes": ["G1"], "k": 1, "exclude_ids": [99]})
    assert r.status_code == 422
    assert r.json() == {"error": "invalid_query", "detail": "exclude ids must be in [0, 32) (or -1 for none); got [99]"}
    r = client.post("/search", json={"genes": ["G1"], "k": 1, "return_profiles": ["cells"]})
    assert r.json() == {
        "error": "invalid_query",
        "detail": "unknown profile array(s) ['cells']; the store has ['delta', 'n_cells']",
    }
    r = client.post("/search", json={"vectors": [[0.0] * 16], "k": 1, "exclude_self_cell_type": "K562"})
    assert r.json()["detail"] == "exclude_self_cell_type needs queries by gene (labels), not vectors"


def test_other_endpoints(client: TestClient, store: Store) -> None:
    assert client.get("/info").json() == store.info()
    assert client.get("/attrs").json() == {"feature_names": list("abcde")}
    r = client.post("/profiles", json={"ids": [[0, -1]], "names": ["delta"]})
    arr = ArrayPayload.model_validate(r.json()["arrays"]["delta"]).to_array()
    np.testing.assert_array_equal(arr[0, 0], store.get([0], ["delta"])["delta"][0])
    assert arr.shape == (1, 2, 5) and np.isnan(arr[0, 1]).all()
    assert client.post("/entries", json={"ids": [31, -1]}).json() == {
        "cell_types": ["RPE1", None],
        "labels": ["TP53", None],
    }
    assert client.post("/ids", json={"pairs": [["K562", "G2+G1"], ["K562", "TP53"]]}).json() == {"ids": [30, -1]}
    r = client.get("/extras/control_mean")
    assert r.json()["meta"] == {"cell_types": ["K562", "RPE1"]}
    assert client.get("/extras/nope").status_code == 422
    assert "/search" in client.get("/openapi.json").json()["paths"]


# --- the client --------------------------------------------------------------------------------------------


def _assert_parity(remote: RetrievalClient, store: Store) -> None:
    rng = np.random.default_rng(7)
    q = rng.standard_normal((3, D)).astype(np.float32)
    for kw in ({}, {"exclude": [{0, 1}, set(), {5}], "cell_types": "K562"}, {"exclude_cell_types": ["RPE1"]}):
        s_local, i_local = store.search(q, 4, **kw)
        s_remote, i_remote = remote.search(q, 4, **kw)
        np.testing.assert_array_equal(i_remote, i_local)
        np.testing.assert_array_equal(s_remote, s_local)
        assert s_remote.dtype == np.float32 and i_remote.dtype == np.int64
    kw = {"exclude_self_cell_type": "K562", "exclude": [2]}
    np.testing.assert_array_equal(
        remote.search_labels(["G3", "G1+G2"], 5, **kw)[1], store.search_labels(["G3", "G1+G2"], 5, **kw)[1]
    )
    local = store.query(genes=["G4"], k=3, cell_types=["HepG2", "RPE1"], return_profiles=["delta", "n_cells"])
    got = remote.query(genes=["G4"], k=3, cell_types=["HepG2", "RPE1"], return_profiles=["delta", "n_cells"])
    for field in ("scores", "ids", "cell_types", "labels"):
        np.testing.assert_array_equal(getattr(got, field), getattr(local, field))
    for name in ("delta", "n_cells"):
        np.testing.assert_array_equal(got.profiles[name], local.profiles[name])
        assert got.profiles[name].dtype == local.profiles[name].dtype
    pad = remote.search(q[:1], 40)  # 32 entries: 8 padding slots
    assert (pad[1][0, 32:] == -1).all() and np.isneginf(pad[0][0, 32:]).all()
    ids = np.array([[3, -1], [0, 31]])
    for name, arr in remote.get(ids).items():
        np.testing.assert_array_equal(arr, store.get(ids)[name])
    assert [a.tolist() for a in remote.entries(ids)] == [a.tolist() for a in store.entries(ids)]
    assert (
        remote.ids_for([("RPE1", "TP53"), ("X", "G1")]).tolist()
        == store.ids_for([("RPE1", "TP53"), ("X", "G1")]).tolist()
        == [31, -1]
    )
    np.testing.assert_array_equal(remote.extra("control_mean"), store.extra("control_mean"))
    assert remote.extra_meta("control_mean") == store.extra_meta("control_mean")
    assert remote.info() == store.info()
    assert remote.attrs == store.attrs


@pytest.mark.parametrize("vector_encoding", ["base64", "json"])
def test_client_parity_in_process(store_dir: Path, store: Store, vector_encoding: str) -> None:
    app = create_app(Settings(index_dir=store_dir, load_in_background=False))
    with TestClient(app) as tc, RetrievalClient(http_client=tc, vector_encoding=vector_encoding) as remote:
        assert remote.healthy() and remote.ready()
        _assert_parity(remote, store)


def test_client_vector_encoding_on_the_wire() -> None:
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["vectors"])
        hit = {"query": None, "ids": [0], "scores": [0.5], "cell_types": ["A"], "labels": ["G1"], "profiles": {}}
        return httpx.Response(200, json={"k": 1, "results": [hit]})

    q = np.array([[0.1, -2.5, 3.0]], np.float64)  # sent as float32 either way
    for encoding in ("base64", "json"):
        with RetrievalClient("http://svc", transport=httpx.MockTransport(handler), vector_encoding=encoding) as c:
            scores, ids = c.search(q, 1)
            assert (scores.tolist(), ids.tolist()) == ([[0.5]], [[0]])
    assert sent[0] == _payload(q.astype(np.float32))
    assert sent[1] == q.astype(np.float32).tolist()
    with pytest.raises(ValueError, match=r"vector_encoding 'npy' is not one of \('base64', 'json'\)"):
        RetrievalClient("http://svc", vector_encoding="npy")


def test_client_maps_errors_to_in_process_types(client: TestClient) -> None:
    remote = RetrievalClient(http_client=client)
    with pytest.raises(UnknownGeneError) as info:
        remote.search_labels(["TP5"], 1)
    assert info.value.genes == ["TP5"] and info.value.suggestions == {"TP5": ["TP53"]}
    with pytest.raises(InvalidQueryError, match="k=9 is above this service's limit of 8"):
        remote.search_labels(["G1"], 9)
    with pytest.raises(InvalidQueryError, match="queries have dimension 2 but the index keys have dimension 16"):
        remote.search(np.zeros((1, 2)), 1)
    with pytest.raises(InvalidQueryError, match=r"body.k: Input should be greater than or equal to 1"):
        remote.search_labels(["G1"], 0)
    with pytest.raises(InvalidQueryError, match="5 queries; at most 4 per request"):
        remote.search_labels(["G1"] * 5, 1)


def test_client_transport_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            return httpx.Response(500, json={"detail": "boom"})
        if request.url.path == "/attrs":
            return httpx.Response(200, text="not json")
        if request.url.path == "/readyz":
            return httpx.Response(503, json={"status": "loading", "detail": "the index is loading"})
        raise httpx.ConnectError("connection refused", request=request)

    with RetrievalClient("http://svc", transport=httpx.MockTransport(handler)) as remote:
        with pytest.raises(ServerError, match="GET /info: boom") as info:
            remote.info()
        assert info.value.status_code == 500
        with pytest.raises(ServerError, match="HTTP 200: 'not json'"):
            _ = remote.attrs
        with pytest.raises(TransportError, match="ConnectError: connection refused"):
            remote.search_labels(["G1"], 1)
        assert remote.ready() is False and remote.healthy() is False
        with pytest.raises(ServiceUnavailableError, match=r"not ready after 0\.1s"):
            remote.wait_ready(0.1, interval=0.02)


# --- a real server -----------------------------------------------------------------------------------------


def test_real_uvicorn_server(store_dir: Path, store: Store) -> None:
    app = create_app(Settings(index_dir=store_dir))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with RetrievalClient(f"http://127.0.0.1:{port}", timeout=5.0) as remote:
            deadline = time.monotonic() + 20
            while not remote.healthy():
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
            remote.wait_ready(20)
            _assert_parity(remote, store)
            scores, ids = remote.search_labels(["G3"], 1, cell_types=["K562"])
            assert ids.tolist() == [[3]] and math.isclose(float(scores[0, 0]), 1.0, abs_tol=1e-5)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


def test_search_response_is_plain_json(client: TestClient) -> None:
    r = client.post("/search", json={"genes": ["G1"], "k": 2})
    json.loads(r.text)  # strict JSON: no NaN/Infinity tokens
    assert "Infinity" not in r.text and "NaN" not in r.text
