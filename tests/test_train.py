"""Training: learning, determinism, exact resume (also after kill -9), data-parallel equivalence, inference."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.splits import Split
from model.losses import energy_distance
from model.pipeline import RunConfig, run_main_job
from model.predict import Predictor
from model.train import TrainConfig, load_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "n_genes": 120,
    "n_perturbation_pool": 48,
    "n_perturbations": 40,
    "n_doubles": 3,
    "cells_per_perturbation": 24,
    "n_control_cells": 80,
    "embedding_dim": 32,
    "program_size": 12,
    "gene_effect_size": 10,
    "private_effect_size": 10,
    "interaction_size": 5,
    "effect_size": 1.5,
    "cross_line_correlation": 0.9,
    "no_effect_fraction": 0.1,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("main") / "run"
    run_main_job(RunConfig(out=out, seed=0, simulator=SMALL, n_sample_cells=8, stop_after="index"))
    return out


def _config(run_dir: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "run_dir": str(out),
        "data": str(run_dir / "cells.h5ad"),
        "split": str(run_dir / "split.json"),
        "index": str(run_dir / "index"),
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 2,
        "n_candidates": 8,
        "n_select": 3,
        "batch_size": 8,
        "n_ctrl_cells": 24,
        "n_target_cells": 24,
        "max_steps": 6,
        "eval_every": 3,
        "warmup_steps": 2,
        "lr": 3e-3,
        "progress": False,
    }
    return TrainConfig(**{**base, **kw})


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=k)


def test_every_variant_trains_and_predicts(run_dir, tmp_path):
    for variant in ("ptrag", "vanilla_rag", "no_retrieval", "random_retrieval"):
        result = train(_config(run_dir, tmp_path / variant, variant=variant, max_steps=3, eval_every=3))
        assert result["step"] == 3 and np.isfinite(result["best_val"])
        gene = Split.load(run_dir / "split.json").test[0][1]
        pred = Predictor.load(tmp_path / variant / "best.pt").predict("rpe1", [gene], n_cells=5)[0]
        assert pred.cells.shape == (5, 120) and np.isfinite(pred.cells).all()


def test_seeded_runs_are_identical_and_seeds_differ(run_dir, tmp_path):
    train(_config(run_dir, tmp_path / "a", seed=1))
    train(_config(run_dir, tmp_path / "b", seed=1))
    train(_config(run_dir, tmp_path / "c", seed=2))
    _assert_same_params(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    pa, pc = _params(tmp_path / "a" / "last.pt"), _params(tmp_path / "c" / "last.pt")
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_resume_after_kill_9_matches_uninterrupted_run(run_dir, tmp_path):
    steps = 120
    cfg = _config(run_dir, tmp_path / "killed", max_steps=steps, eval_every=2, patience=0)
    cmd = [sys.executable, "-m", "api.cli", "train", "--no-progress"]
    for key in ("run_dir", "data", "split", "index", "d_model", "n_layers", "n_heads", "n_candidates", "n_select",
                "batch_size", "n_ctrl_cells", "n_target_cells", "max_steps", "eval_every", "warmup_steps", "lr",
                "patience"):  # fmt: skip
        cmd += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(last)["train_state"]["step"]
    assert 0 < killed_at < steps, "the kill should land mid-run; make the run longer if this fails"
    resumed = train(cfg)  # picks up last.pt, and clears any temporary the kill left behind
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")], "half-written files left"
    straight = train(_config(run_dir, tmp_path / "straight", max_steps=steps, eval_every=2, patience=0))
    assert resumed["step"] == straight["step"] == steps
    _assert_same_params(tmp_path / "killed" / "last.pt", tmp_path / "straight" / "last.pt")
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"]]


def test_resume_refuses_another_run(run_dir, tmp_path):
    train(_config(run_dir, tmp_path / "r", max_steps=3))
    with pytest.raises(ValueError, match="holds another run"):
        train(_config(run_dir, tmp_path / "r", max_steps=6, d_model=16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(run_dir, tmp_path):
    # On CPU (gloo) wherever it runs: two processes on a one-GPU machine is a user error (tested below).
    cfg = _config(run_dir, tmp_path / "ddp", max_steps=4, eval_every=2, device="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "api.cli", "train", "--no-progress"]  # fmt: skip
    for key in (
        "run_dir",
        "data",
        "split",
        "index",
        "d_model",
        "n_layers",
        "n_heads",
        "n_candidates",
        "n_select",
        "batch_size",
        "n_ctrl_cells",
        "n_target_cells",
        "max_steps",
        "eval_every",
        "warmup_steps",
        "lr",
        "device",
    ):
        cmd += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single = train(_config(run_dir, tmp_path / "one", max_steps=4, eval_every=2, device="cpu"))
    ddp_hist = load_checkpoint(tmp_path / "ddp" / "last.pt")["train_state"]["history"]
    np.testing.assert_allclose([r["loss"] for r in ddp_hist], [r["loss"] for r in single["history"]], rtol=1e-4)
    # Parameters: all-reduced gradients sum in another order, and Adam turns a float-rounding difference in a
    # near-zero gradient into a full-size step for that one element, so compare the whole parameter vector.
    pa, pb = _params(tmp_path / "ddp" / "last.pt"), _params(tmp_path / "one" / "last.pt")
    a = torch.cat([pa[k].flatten().float() for k in sorted(pa)])
    b = torch.cat([pb[k].flatten().float() for k in sorted(pb)])
    assert float((a - b).norm() / b.norm()) < 1e-3


def test_ptrag_learns_and_beats_control_on_held_out_sets(run_dir, tmp_path):
    result = train(_config(run_dir, tmp_path / "learn", max_steps=150, eval_every=50, patience=0))
    losses = [r["loss"] for r in result["history"]]
    assert np.mean(losses[-20:]) < 0.97 * np.mean(losses[:10])
    predictor = Predictor.load(tmp_path / "learn" / "best.pt")
    import anndata as ad

    cells = ad.read_h5ad(run_dir / "cells.h5ad")
    split = Split.load(run_dir / "split.json")
    model_ed, ctrl_ed = [], []
    for ct, pert in split.test:
        obs = cells[(cells.obs["cell_line"] == ct).to_numpy() & (cells.obs["gene"] == pert).to_numpy()].X.toarray()
        pred = predictor.predict(ct, [pert], n_cells=64, seed=0)[0]
        target = torch.from_numpy(obs)[None]
        model_ed.append(float(energy_distance(torch.from_numpy(pred.cells)[None], target)))
        ctrl_ed.append(float(energy_distance(torch.from_numpy(pred.ctrl)[None], target)))
    assert np.mean(model_ed) < 0.9 * np.mean(ctrl_ed), (np.mean(model_ed), np.mean(ctrl_ed))


def test_inference_is_deterministic_and_explained(run_dir, tmp_path):
    train(_config(run_dir, tmp_path / "inf", max_steps=3))
    predictor = Predictor.load(tmp_path / "inf" / "last.pt")
    genes = [p for _, p in Split.load(run_dir / "split.json").test[:2]]
    a = predictor.predict("rpe1", genes, n_cells=16, seed=5)
    b = predictor.predict("rpe1", genes, n_cells=16, seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.cells, y.cells)
        assert x.candidates.equals(y.candidates)
    cand = a[0].candidates
    assert int(cand["selected"].sum()) == 3
    assert cand.loc[cand["selected"], "weight"].sum() == pytest.approx(1.0, abs=1e-5)
    adata = predictor.predict_anndata("rpe1", genes[:1], n_cells=4)
    assert list(adata.obs["gene"].unique()) == genes[:1] and adata.shape == (4, 120)
    assert set(adata.uns["ptrag_candidates"][genes[0]]) >= {"id", "weight", "selected", "cell_type"}
    with pytest.raises(KeyError, match="unknown cell type 'liver'"):
        predictor.predict("liver", genes)
    with pytest.raises(KeyError, match="NOTAGENE"):
        predictor.predict("rpe1", ["NOTAGENE"])


def test_serving_shortcuts_equal_the_plain_forward(run_dir, tmp_path):
    # Predictor precomputes control-cell tokens and candidate codes, and predicts only the mean when cells are not
    # asked for; each shortcut must give what the model computes from scratch.
    import dataclasses

    train(_config(run_dir, tmp_path / "fast", max_steps=3))
    predictor = Predictor.load(tmp_path / "fast" / "last.pt")
    with torch.no_grad():  # a visible shift through both output paths (a 3-step model predicts ~control)
        predictor.model.generator.head.weight.normal_(0, 0.2)
        predictor.model.copy_gain.fill_(0.7)
    genes = [p for _, p in Split.load(run_dir / "split.json").test[:3]]
    items = predictor.make_items("rpe1", genes, n_cells=12, seed=4)
    assert all(it.ctrl_rows is not None for it in items)
    np.testing.assert_array_equal(items[0].ctrl, predictor.controls["rpe1"][items[0].ctrl_rows])
    fast = predictor.predict_items(items)
    codes, predictor.cand_codes = predictor.cand_codes, None
    plain = predictor.predict_items([dataclasses.replace(it, ctrl_rows=None) for it in items])
    predictor.cand_codes = codes
    pooled = predictor.predict_items([dataclasses.replace(it, cells=False) for it in items])
    mixed = predictor.predict_items([items[0], dataclasses.replace(items[1], cells=False), items[2]])
    for f, p, m, x in zip(fast, plain, pooled, mixed, strict=True):
        assert np.abs(f.delta).max() > 0.05
        np.testing.assert_allclose(f.cells, p.cells, rtol=1e-5, atol=1e-5)
        assert m.cells is None
        np.testing.assert_allclose(m.mean, f.cells.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.delta, f.delta, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x.mean, f.mean, rtol=1e-5, atol=1e-5)
        assert f.candidates.equals(p.candidates) and m.candidates["id"].equals(f.candidates["id"])
    assert mixed[1].cells is None and mixed[0].cells is not None
    # the caller's own control cells go through the encoder
    own = predictor.predict("rpe1", genes[:1], ctrl=items[0].ctrl)[0]
    np.testing.assert_allclose(own.cells, fast[0].cells, rtol=1e-5, atol=1e-5)


def test_no_held_out_pair_is_ever_a_candidate(run_dir, tmp_path):
    from model.examples import retrieve_candidates
    from retrieval_service.store import Store

    split = Split.load(run_dir / "split.json")
    store = Store.open(run_dir / "index")
    cell_types = sorted({c for c, _ in split.train} | {c for c, _ in split.test})
    for random in (False, True):
        for pairs in (split.train, split.val, split.test):
            qs = retrieve_candidates(store, pairs, cell_types=cell_types, k=len(store), random_candidates=random)
            cts, labels = store.entries(qs.cand_ids[qs.cand_ids >= 0])
            assert not set(zip(cts, labels, strict=True)) & split.held_out
            # The query's own entry is never among its candidates.
            own = store.ids_for(qs.pairs)
            assert not (qs.cand_ids == own[:, None]).any()


def test_a_pair_asked_twice_is_searched_once(run_dir, monkeypatch):
    from model.examples import retrieve_candidates
    from retrieval_service.store import Store

    split = Split.load(run_dir / "split.json")
    store = Store.open(run_dir / "index")
    cell_types = sorted({c for c, _ in split.train} | {c for c, _ in split.test})
    a, b, c = split.test[:3]
    pairs = [a, b, a, c, b, a, ("rpe1", "NOT_A_GENE"), a]
    searched = []
    search = store.search
    monkeypatch.setattr(
        store, "search", lambda keys, *args, **kw: searched.append(len(keys)) or search(keys, *args, **kw)
    )
    with pytest.warns(UserWarning, match="NOT_A_GENE"):
        qs = retrieve_candidates(store, pairs, cell_types=cell_types, k=8)
    assert searched == [3]  # a, b, c once each
    assert qs.pairs == [a, b, a, c, b, a, a]  # the unknown gene left out, the order kept
    alone = {p: retrieve_candidates(store, [p], cell_types=cell_types, k=8) for p in (a, b, c)}
    for r, p in enumerate(qs.pairs):
        np.testing.assert_array_equal(qs.cand_ids[r], alone[p].cand_ids[0])
        np.testing.assert_array_equal(qs.query[r], alone[p].query[0])
        assert qs.cell_type[r] == alone[p].cell_type[0]


def test_optional_batch_input(run_dir, tmp_path):
    import anndata as ad

    from model.examples import cell_pool, set_rows

    cells = ad.read_h5ad(run_dir / "cells.h5ad")
    pool = cell_pool(cells, batch_col="gem_group")
    split = Split.load(run_dir / "split.json")
    rng = np.random.default_rng(0)
    ids = []
    for pair in split.train[:30]:
        ctrl, target, b = set_rows(pool, pair, rng)
        assert b >= 0
        assert set(pool.batch_codes[ctrl]) == {b} and set(pool.batch_codes[target]) == {b}
        ids.append(b)
    assert len(set(ids)) > 1  # sets are spread over batches
    dropped = [set_rows(pool, pair, rng, batch_dropout=1.0)[2] for pair in split.train[:5]]
    assert dropped == [-1] * 5

    train(_config(run_dir, tmp_path / "b", max_steps=3, batch_col="gem_group"))
    predictor = Predictor.load(tmp_path / "b" / "last.pt")
    assert predictor.batches == pool.batches and predictor.model.config.n_batches == len(pool.batches)
    gene = split.test[0][1]
    batch = pool.batches[0]
    with_batch = predictor.predict("rpe1", [gene], n_cells=8, batch=batch)[0]
    again = predictor.predict("rpe1", [gene], n_cells=8, batch=batch)[0]
    np.testing.assert_array_equal(with_batch.cells, again.cells)
    # Control cells come from that batch: each is one of the cached controls of that batch.
    cached = predictor.controls["rpe1"][predictor.control_batches["rpe1"] == 0]
    assert all(np.isclose(cached, c).all(axis=1).any() for c in with_batch.ctrl)
    # The batch embedding reaches the output: same controls, known vs unknown batch, different prediction.
    unknown = predictor.predict("rpe1", [gene], ctrl=with_batch.ctrl)[0]
    known = predictor.predict("rpe1", [gene], ctrl=with_batch.ctrl, batch=batch)[0]
    assert not np.allclose(unknown.cells, known.cells)
    with pytest.raises(KeyError, match="unknown batch 'nope'"):
        predictor.predict("rpe1", [gene], batch="nope")


def test_more_processes_than_gpus_is_refused_with_the_fix(monkeypatch):
    # Found on a one-GPU machine: the second process asked for GPU 1 and died in CUDA with no hint.
    from model import train as train_module

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"2 processes on this node but 1 GPU.*--nproc-per-node 1.*--device cpu"):
        train_module._init_distributed(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines, not in CI)")
def test_cuda_training_and_prediction_match_cpu(run_dir, tmp_path):
    steps = {"max_steps": 4, "eval_every": 2}
    on_cpu = train(_config(run_dir, tmp_path / "cpu", device="cpu", **steps))
    on_gpu = train(_config(run_dir, tmp_path / "gpu", device="cuda", **steps))
    # Same seeds and noise (drawn with numpy): only float rounding of the kernels differs.
    np.testing.assert_allclose([r["loss"] for r in on_gpu["history"]], [r["loss"] for r in on_cpu["history"]],
                               rtol=1e-3)  # fmt: skip
    # A checkpoint written on the GPU serves on either device, with the same answer.
    gene = Split.load(run_dir / "split.json").test[0][1]
    ckpt = tmp_path / "gpu" / "last.pt"
    served = {dev: Predictor.load(ckpt, device=dev) for dev in ("cpu", "cuda")}
    assert next(served["cuda"].model.parameters()).device.type == "cuda"
    a, b = (served[dev].predict("rpe1", [gene], n_cells=16, seed=3)[0] for dev in ("cpu", "cuda"))
    np.testing.assert_array_equal(a.columns["id"], b.columns["id"])
    np.testing.assert_allclose(b.columns["weight"], a.columns["weight"], atol=1e-4)
    np.testing.assert_allclose(b.cells, a.cells, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(b.delta, a.delta, atol=1e-4, rtol=1e-4)
