"""The batch client: input parsing, retries, failed rows and resume against a scripted API (httpx.MockTransport),
then end to end against the real predict API under uvicorn, killed mid-run and restarted."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pytest

from api.batch_client import (
    InputError,
    ResumeError,
    Row,
    read_rows,
    run_batch,
)
from api.cli import main

REPO = Path(__file__).resolve().parents[1]
GENES = ["A", "B", "C", "D", "E"]
ROWS = [
    Row(0, "k562", "G1", 3),
    Row(1, "k562", "G2", 3),
    Row(2, "rpe1", "G1+G2", 2),
    Row(3, "rpe1", "G3", 4),
    Row(4, "k562", "G4", 3),
    Row(5, "rpe1", "G5", 2),
]


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def fake_body(payload: dict) -> dict:
    """What the predict API answers, deterministic in the request (as the real one is)."""
    ct, (pert,), n, seed = payload["cell_type"], payload["perturbations"], payload["n_cells"], payload["seed"]
    ctrl = _rng(ct, n, seed).normal(size=(n, len(GENES))).round(4)
    cells = (ctrl + _rng(ct, pert).normal(size=len(GENES))).round(4)
    delta = cells.mean(0) - ctrl.mean(0)
    order = np.argsort(-delta)
    top = [{"gene": GENES[i], "delta": float(delta[i])} for i in order]
    return {
        "request_id": f"req-{ct}-{pert}",
        "cell_type": ct,
        "model_variant": "ptrag",
        "genes": GENES,
        "n_cells": n,
        "control_cells": ctrl.tolist(),
        "predictions": [
            {
                "perturbation": pert,
                "delta": delta.tolist(),
                "profile": cells.mean(0).tolist(),
                "cells": cells.tolist(),
                "top_up": top[:2],
                "top_down": top[::-1][:2],
                "candidates": [
                    {
                        "id": 7,
                        "cell_type": "hepg2",
                        "perturbation": pert,
                        "cosine": 0.9,
                        "score": 1.2,
                        "weight": 1.0,
                        "selected": True,
                    }
                ],
                "warnings": [],
            }
        ],
        "warnings": [],
    }


class FakeAPI:
    """A scripted ``POST /predict``: ``script[perturbation]`` lists what its successive calls get (a status, or
    'connect' / 'timeout' for a transport error); then 200 with :func:`fake_body`."""

    def __init__(self, script: dict[str, list] | None = None, *, api_key: str | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.api_key = api_key
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/predict")
        payload = json.loads(request.content)
        pert = payload["perturbations"][0]
        self.calls.append(pert)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": "unauthorized", "detail": "missing or wrong API key"})
        steps = self.script.get(pert)
        step = steps.pop(0) if steps else 200
        if step == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if step == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if step != 200:
            return httpx.Response(step, json={"error": "scripted", "detail": f"scripted {step} for {pert}"})
        return httpx.Response(200, json=fake_body(payload))


def _run(out: Path, api, rows=ROWS, **kw):
    kw = {"concurrency": 3, "retries": 3, "backoff": 0.001, "progress": False, **kw}
    return run_batch(rows, out, url="http://api", transport=httpx.MockTransport(api), **kw)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- input -------------------------------------------------------------------------------------------------


def test_read_rows_csv_tsv_and_custom_columns(tmp_path: Path) -> None:
    rows = read_rows(_write(tmp_path / "a.csv", "cell_type,perturbation,n_cells\nk562,G1,3\n\nrpe1, G1+G2 ,\n"))
    assert rows == [Row(0, "k562", "G1", 3), Row(1, "rpe1", "G1+G2", 64)]
    tsv = _write(tmp_path / "b.txt", "line\tgene\tcells\nk562\tG1\t5\nhepg2\tG2\t\n")
    rows = read_rows(tsv, cell_type_col="line", perturbation_col="gene", n_cells_col="cells", n_cells=7)
    assert rows == [Row(0, "k562", "G1", 5), Row(1, "hepg2", "G2", 7)]
    # no cell type column: the given cell type fills every row
    rows = read_rows(_write(tmp_path / "c.csv", "perturbation,note\nG1,x\nG2,y\n"), cell_type="jurkat")
    assert rows == [Row(0, "jurkat", "G1", 64), Row(1, "jurkat", "G2", 64)]


def test_read_rows_gene_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "genes.txt", "# knockdowns\nG1\n\n  G2+G3  \nG4\n")
    assert read_rows(path, cell_type="rpe1", n_cells=8) == [
        Row(0, "rpe1", "G1", 8),
        Row(1, "rpe1", "G2+G3", 8),
        Row(2, "rpe1", "G4", 8),
    ]


@pytest.mark.parametrize(
    ("text", "kw", "message"),
    [
        ("", {}, "is empty: expected a CSV/TSV table with a header, or one perturbation per line"),
        ("\n  \n", {}, "is empty"),
        ("cell_type,perturbation\n", {}, "the CSV has a header but no rows"),
        ("cell_type,gene\nk562,G1\n", {}, "CSV header has no column 'perturbation'; columns: ['cell_type', 'gene']"),
        ("line\tperturbation\nk562\tG1\n", {}, "TSV header has no column 'cell_type' (or give one cell type"),
        ("G1\nG2\n", {}, "is a list of perturbations (no comma or tab in its first line): give the cell type"),
        ("cell_type,perturbation,n_cells\nk562,G1,3\nk562,G2,many\n", {}, "line 3: n_cells must be a positive"),
        ("cell_type,perturbation,n_cells\nk562,G1,0\n", {}, "line 2: n_cells must be a positive integer, got '0'"),
        ("cell_type,perturbation\nk562,\n", {}, "line 2: empty 'perturbation' value"),
        ("cell_type,perturbation\n,G1\n", {}, "line 2: empty 'cell_type' value"),
        ("cell_type,perturbation\nk562,G1,extra\n", {}, "line 2: more fields than the 2 columns of the header"),
    ],
)
def test_read_rows_errors_name_the_problem(tmp_path: Path, text: str, kw: dict, message: str) -> None:
    path = _write(tmp_path / "in.csv", text)
    with pytest.raises(InputError) as err:
        read_rows(path, **kw)
    assert message in str(err.value) and str(path) in str(err.value)


def test_cli_reports_input_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "in.csv", "")
    assert main(["batch", str(path), "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"ptrag batch: error: {path} is empty: expected a CSV/TSV table with a header, or one perturbation per line\n"
    )
    assert not (tmp_path / "o").exists()


# --- outputs -----------------------------------------------------------------------------------------------


def test_outputs_h5ad_summary_and_no_failed_file(tmp_path: Path) -> None:
    api = FakeAPI()
    result = _run(tmp_path, api)
    assert (result.n_rows, result.n_done, result.n_skipped, result.n_failed) == (6, 6, 0, 0)
    assert sorted(api.calls) == sorted(r.perturbation for r in ROWS)
    assert result.failed is None and not (tmp_path / "failed.csv").exists()
    adata = ad.read_h5ad(result.h5ad)
    assert list(adata.var_names) == GENES
    # predicted cells in input order, then each cell type's controls (of its first row: k562 n=3, rpe1 n=2)
    expect_obs = [(r.perturbation, r.cell_type, r.row, False) for r in ROWS for _ in range(r.n_cells)]
    expect_obs += [("non-targeting", "k562", -1, True)] * 3 + [("non-targeting", "rpe1", -1, True)] * 2
    got = list(zip(adata.obs["gene"], adata.obs["cell_line"], adata.obs["row"], adata.obs["is_control"], strict=True))
    assert got == expect_obs
    assert adata.obs_names.is_unique
    blocks = []
    for r in ROWS:
        payload = {"cell_type": r.cell_type, "perturbations": [r.perturbation], "n_cells": r.n_cells, "seed": 0}
        blocks.append(fake_body(payload)["predictions"][0]["cells"])
    for ct, n in (("k562", 3), ("rpe1", 2)):
        blocks.append(fake_body({"cell_type": ct, "perturbations": ["x"], "n_cells": n, "seed": 0})["control_cells"])
    np.testing.assert_array_equal(adata.X, np.concatenate([np.asarray(b, dtype=np.float32) for b in blocks]))
    assert adata.uns["ptrag_batch"]["control_label"] == "non-targeting"
    summary = _csv(result.summary)
    assert [s["status"] for s in summary] == ["ok"] * 6
    first = fake_body({"cell_type": "k562", "perturbations": ["G1"], "n_cells": 3, "seed": 0})["predictions"][0]
    assert summary[0] == {
        "row": "0",
        "cell_type": "k562",
        "perturbation": "G1",
        "n_cells": "3",
        "status": "ok",
        "top_up": ";".join(f"{g['gene']}:{g['delta']:+.3f}" for g in first["top_up"]),
        "top_down": ";".join(f"{g['gene']}:{g['delta']:+.3f}" for g in first["top_down"]),
        "request_id": "req-k562-G1",
        "error": "",
    }


def test_obs_columns_and_control_label_are_parameters(tmp_path: Path) -> None:
    result = _run(tmp_path, FakeAPI(), rows=ROWS[:2], pert_col="target_gene", cell_type_col="celltype",
                  control_label="ctrl")  # fmt: skip
    obs = ad.read_h5ad(result.h5ad).obs
    assert list(obs["target_gene"].unique()) == ["G1", "G2", "ctrl"]
    assert set(obs["celltype"]) == {"k562"}


# --- retries -----------------------------------------------------------------------------------------------


def test_retries_5xx_429_and_transport_errors(tmp_path: Path) -> None:
    api = FakeAPI({"G1": [503, 503], "G2": ["connect", "timeout"], "G3": [429, 500, 502]})
    result = _run(tmp_path, api)
    assert (result.n_done, result.n_failed) == (6, 0)
    counts = {p: api.calls.count(p) for p in set(api.calls)}
    assert counts == {"G1": 3, "G2": 3, "G3": 4, "G1+G2": 1, "G4": 1, "G5": 1}


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_no_retry_on_4xx(tmp_path: Path, status: int) -> None:
    api = FakeAPI({"G3": [status, 200]})
    result = _run(tmp_path, api)
    assert api.calls.count("G3") == 1
    assert (result.n_done, result.n_failed) == (5, 1)
    assert _csv(tmp_path / "failed.csv") == [
        {
            "row": "3",
            "cell_type": "rpe1",
            "perturbation": "G3",
            "n_cells": "4",
            "status_code": str(status),
            "attempts": "1",
            "error": f"HTTP {status}: scripted {status} for G3",
        }
    ]
    summary = _csv(tmp_path / "summary.csv")
    assert [s["status"] for s in summary] == ["ok", "ok", "ok", "failed", "ok", "ok"]
    assert summary[3]["error"] == f"HTTP {status}: scripted {status} for G3"
    assert 3 not in set(ad.read_h5ad(tmp_path / "predictions.h5ad").obs["row"])


def test_gives_up_after_the_last_retry(tmp_path: Path) -> None:
    api = FakeAPI({"G1": [503] * 10, "G2": ["connect"] * 10})
    result = _run(tmp_path, api, retries=2)
    assert api.calls.count("G1") == api.calls.count("G2") == 3
    assert result.n_failed == 2 and result.failed == tmp_path / "failed.csv"
    failed = {f["perturbation"]: f for f in _csv(result.failed)}
    assert failed["G1"]["status_code"] == "503" and failed["G1"]["attempts"] == "3"
    assert failed["G1"]["error"] == "HTTP 503 after 3 attempt(s): scripted 503 for G1"
    assert failed["G2"]["status_code"] == "" and failed["G2"]["attempts"] == "3"
    assert failed["G2"]["error"] == "no answer from http://api after 3 attempt(s): ConnectError: connection refused"


def test_api_key_is_sent(tmp_path: Path) -> None:
    api = FakeAPI(api_key="s3cret")
    assert _run(tmp_path / "with", api, api_key="s3cret").n_done == 6
    api = FakeAPI(api_key="s3cret")
    result = _run(tmp_path / "without", api)
    assert result.n_failed == 6 and len(api.calls) == 6  # a 401 is not retried
    assert {f["error"] for f in _csv(result.failed)} == {"HTTP 401: missing or wrong API key"}


def test_unusable_200_fails_its_row(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = fake_body(json.loads(request.content))
        if body["predictions"][0]["perturbation"] == "G2":
            body["predictions"][0]["cells"] = body["predictions"][0]["cells"][:1]
        return httpx.Response(200, json=body)

    result = _run(tmp_path, handler)
    (failed,) = _csv(result.failed)
    assert failed["perturbation"] == "G2" and failed["status_code"] == "200"
    assert failed["error"] == "expected cells and control_cells of shape (3, 5), got (1, 5) and (3, 5)"


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    state = {"now": 0, "max": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return httpx.Response(200, json=fake_body(json.loads(request.content)))

    rows = [Row(i, "k562", f"G{i}", 2) for i in range(12)]
    assert _run(tmp_path, handler, rows=rows, concurrency=3).n_done == 12
    assert state["max"] == 3


# --- resume ------------------------------------------------------------------------------------------------


def _same_output(a: Path, b: Path) -> None:
    x, y = ad.read_h5ad(a / "predictions.h5ad"), ad.read_h5ad(b / "predictions.h5ad")
    assert list(x.obs_names) == list(y.obs_names)
    assert x.obs.astype(str).equals(y.obs.astype(str))
    assert list(x.var_names) == list(y.var_names)
    np.testing.assert_array_equal(x.X, y.X)
    assert _csv(a / "summary.csv") == _csv(b / "summary.csv")


def test_rerun_sends_only_the_rows_not_done(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _run(out, FakeAPI({"G2": [503] * 10, "G5": [422]}), retries=1)
    assert (first.n_done, first.n_failed) == (4, 2)
    api = FakeAPI()
    second = _run(out, api)
    assert sorted(api.calls) == ["G2", "G5"]
    assert (second.n_done, second.n_skipped, second.n_failed) == (6, 4, 0)
    assert not (out / "failed.csv").exists()
    _run(tmp_path / "straight", FakeAPI())
    _same_output(out, tmp_path / "straight")
    api = FakeAPI()
    assert _run(out, api).n_skipped == 6 and api.calls == []  # nothing left to do


def test_crash_mid_run_then_resume_gives_each_row_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = []

    class Crash(RuntimeError):
        pass

    def crash_after_three(row: Row) -> None:
        finished.append(row.row)
        if len(finished) == 3:
            raise Crash  # the process dies here: no outputs written

    with pytest.raises(Crash):
        _run(out, FakeAPI(), concurrency=1, on_row_done=crash_after_three)
    assert sorted(p.name for p in (out / "parts").glob("row-*.npz")) == [f"row-00000{i}.npz" for i in finished]
    assert not (out / "predictions.h5ad").exists()
    # what a kill -9 in the middle of writing a part leaves behind
    _write(out / "parts" / ".row-000004.npz.abc123.tmp.npz", "half")
    api = FakeAPI()
    result = _run(out, api)
    assert sorted(api.calls) == sorted(r.perturbation for r in ROWS if r.row not in finished)
    assert (result.n_done, result.n_skipped) == (6, 3)
    assert not list((out / "parts").glob(".*"))
    rows = ad.read_h5ad(result.h5ad).obs["row"]
    assert rows[rows >= 0].value_counts().sort_index().to_dict() == {r.row: r.n_cells for r in ROWS}
    _run(tmp_path / "straight", FakeAPI())
    _same_output(out, tmp_path / "straight")


def test_resume_refuses_another_input(tmp_path: Path) -> None:
    _run(tmp_path, FakeAPI(), rows=ROWS[:3])
    other = [ROWS[0], Row(1, "k562", "G9", 3), ROWS[2]]
    with pytest.raises(ResumeError, match=r"row-000001.npz holds the result of another request"):
        _run(tmp_path, FakeAPI(), rows=other)
    with pytest.raises(ResumeError, match="use a new output directory"):
        _run(tmp_path, FakeAPI(), rows=ROWS[:3], seed=1)


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    _run(tmp_path, FakeAPI(), rows=ROWS[:2])

    def other_genes(request: httpx.Request) -> httpx.Response:
        body = fake_body(json.loads(request.content))
        body["genes"] = body["genes"][::-1]
        return httpx.Response(200, json=body)

    with pytest.raises(ResumeError, match="was the server's model changed"):
        _run(tmp_path, other_genes, rows=ROWS)


# --- end to end: the real predict API under uvicorn ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    from test_train import SMALL, _config

    from model.data.splits import Split
    from model.pipeline import RunConfig, run_main_job
    from model.train import train

    root = tmp_path_factory.mktemp("batch_e2e")
    run = root / "run"
    run_main_job(RunConfig(out=run, seed=0, simulator=SMALL, n_sample_cells=8, stop_after="index"))
    train(_config(run, root / "model", max_steps=2, eval_every=2))
    split = Split.load(run / "split.json")
    other = [p for p in split.train if p[0] != "rpe1"]
    pairs = [*split.test[:8], other[0], other[len(other) // 2], other[-1], split.test[0]]  # a repeated pair too
    return root / "model" / "best.pt", run / "index", pairs


class Server:
    """``uvicorn api.app:app`` in a subprocess, configured by environment as in the container."""

    def __init__(self, checkpoint: Path, index: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PTRAG_")}
        env |= {"PTRAG_CHECKPOINT": str(checkpoint), "PTRAG_INDEX_DIR": str(index), "PTRAG_TORCH_THREADS": "1"}
        cmd = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)]
        with log.open("a") as sink:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=sink)
        self.log = log
        deadline = time.monotonic() + 45
        while True:
            assert self.proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"not ready in 45 s: {log.read_text()}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=15)


def test_server_killed_mid_run_then_rerun_equals_uninterrupted(served_model, tmp_path: Path) -> None:
    checkpoint, index, pairs = served_model
    table = tmp_path / "input.csv"
    _write(table, "cell_type,perturbation,n_cells\n" + "".join(f"{ct},{p},6\n" for ct, p in pairs))
    rows = read_rows(table)
    assert len(rows) == 12
    port, log = _free_port(), tmp_path / "server.log"
    server = Server(checkpoint, index, port, log)
    try:
        done_before_kill = []

        def kill_after_four(row: Row) -> None:
            done_before_kill.append(row.row)
            if len(done_before_kill) == 4:
                server.kill()  # SIGKILL: in-flight requests are cut, later ones are refused

        out = tmp_path / "out"
        first = run_batch(rows, out, url=server.url, concurrency=2, retries=1, backoff=0.05, progress=False,
                          on_row_done=kill_after_four)  # fmt: skip
        assert server.proc.returncode == -signal.SIGKILL
        assert 4 <= first.n_done < 12 and first.n_done + first.n_failed == 12
        errors = {f["error"].split(": ")[0] for f in _csv(out / "failed.csv")}
        assert errors == {"no answer from " + server.url + " after 2 attempt(s)"}
        ids_before = {s["row"]: s["request_id"] for s in _csv(out / "summary.csv") if s["status"] == "ok"}

        server = Server(checkpoint, index, port, log)  # restarted on the same address
        cmd = [sys.executable, "-m", "api.cli", "batch", str(table), "--url", server.url, "--out", str(out),
               "--concurrency", "2", "--no-progress"]  # fmt: skip
        rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert rerun.returncode == 0, rerun.stderr
        assert f"12/12 rows done ({first.n_done} by an earlier run), 0 failed" in rerun.stdout
        assert not (out / "failed.csv").exists()
        summary = _csv(out / "summary.csv")
        assert {s["row"]: s["request_id"] for s in summary if s["row"] in ids_before} == ids_before  # not redone

        straight = run_batch(rows, tmp_path / "straight", url=server.url, concurrency=2, progress=False)
        assert (straight.n_done, straight.n_failed) == (12, 0)
    finally:
        server.kill()
    got, want = ad.read_h5ad(out / "predictions.h5ad"), ad.read_h5ad(tmp_path / "straight" / "predictions.h5ad")
    obs_cols = ["gene", "cell_line", "row", "is_control"]
    assert got.obs[obs_cols].astype(str).equals(want.obs[obs_cols].astype(str))
    assert list(got.obs_names) == list(want.obs_names) and list(got.var_names) == list(want.var_names)
    rows_seen = got.obs.loc[~got.obs["is_control"], "row"].value_counts().sort_index()
    assert rows_seen.to_dict() == {r: 6 for r in range(12)}  # every row, exactly once
    assert set(got.obs.loc[got.obs["is_control"], "cell_line"]) == {ct for ct, _ in pairs}
    # the server batches concurrent requests together, so allow float32 round-off between the two runs
    np.testing.assert_allclose(got.X, want.X, rtol=1e-5, atol=1e-5)
