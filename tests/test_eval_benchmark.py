"""The benchmark runner: held-out control halves, same inputs for every model, seeded, resumable, a report."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_train import SMALL

from model.eval.benchmark import CEILING, BenchmarkConfig, run_benchmark, write_benchmark_report
from model.pipeline import RunConfig, run_main_job
from model.train import TrainConfig, train

TINY_TRAIN = {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_candidates": 6, "n_select": 2, "batch_size": 4,
              "n_ctrl_cells": 12, "n_target_cells": 12, "warmup_steps": 1, "lr": 3e-3}  # fmt: skip
MODELS = ("ptrag", "control", "train_mean", "knn")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "run"
    run_main_job(RunConfig(out=out, seed=0, simulator=SMALL, n_sample_cells=8, stop_after="index"))
    return out


def _config(data_dir: Path, out: Path, **kw) -> BenchmarkConfig:
    base = {"out": out, "data": data_dir / "cells.h5ad", "embeddings": data_dir / "simulated.embeddings.npz",
            "target_cell_type": "rpe1", "seeds": (0, 1), "models": MODELS, "steps": 3, "train": TINY_TRAIN,
            "max_pred_cells": 32, "n_pcs": 10, "progress": False}  # fmt: skip
    return BenchmarkConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench(data_dir, tmp_path_factory) -> tuple[BenchmarkConfig, pd.DataFrame]:
    config = _config(data_dir, tmp_path_factory.mktemp("b1") / "bench")
    return config, run_benchmark(config)


def test_every_model_and_the_ceiling_scored_on_the_same_test_pairs(bench):
    config, scores = bench
    assert set(scores["model"]) == {*MODELS, CEILING}
    for seed in config.seeds:
        pairs = {m: set(zip(g["cell_type"], g["perturbation"], strict=True))
                 for m, g in scores[scores["seed"] == seed].groupby("model")}  # fmt: skip
        test = {tuple(p) for p in pd.read_json(config.out / f"seed{seed}" / "split.json", typ="series")["test"]}
        assert all(p == test for p in pairs.values())
    assert (scores["cell_type"] == "rpe1").all()
    # the seeds are different splits
    s0, s1 = (set(scores[scores["seed"] == s]["perturbation"]) for s in config.seeds)
    assert s0 != s1


def test_evaluation_half_of_controls_is_never_seen_by_a_model(bench):
    config, _ = bench
    cells = ad.read_h5ad(config.data)
    is_control = (cells.obs["gene"] == "non-targeting").to_numpy()
    for seed in config.seeds:
        held = np.load(config.out / f"seed{seed}" / "exclude_cells.npy")
        assert is_control[held].all()
        for ct in cells.obs["cell_line"].unique():
            ct_controls = np.flatnonzero(is_control & (cells.obs["cell_line"] == ct).to_numpy())
            share = np.isin(ct_controls, held).mean()
            assert 0.4 <= share <= 0.6, (ct, share)
        # the training profiles' control reference is the mean of the model half only
        profiles = ad.read_h5ad(config.out / f"seed{seed}" / "profiles.h5ad")
        ctrl_row = np.flatnonzero(((profiles.obs["gene"] == "non-targeting") & (profiles.obs["cell_line"] == "rpe1"))
                                  .to_numpy())[0]  # fmt: skip
        rows = np.flatnonzero(is_control & (cells.obs["cell_line"] == "rpe1").to_numpy())
        model_half = np.setdiff1d(rows, held)
        expected = np.asarray(cells.X[model_half].mean(0)).ravel()
        np.testing.assert_allclose(np.asarray(profiles.X[ctrl_row]).ravel(), expected, rtol=1e-4, atol=1e-5)
        # the trained model's cached control cells (its default inputs) come from the model half too
        from model.train import CONTROLS, load_checkpoint

        cached = load_checkpoint(config.out / f"seed{seed}" / "train" / "ptrag" / "best.pt")[CONTROLS]["rpe1"].numpy()
        held_cells = np.asarray(cells.X[np.intersect1d(held, rows)].toarray())
        for cell in cached[:10]:
            assert not (np.abs(held_cells - cell).sum(1) < 1e-6).any()


def test_scores_reflect_signal_ceiling_beats_control(bench):
    _, scores = bench
    mean = scores.groupby("model")[["pearson_delta", "energy_pca", "pred_shift_l2"]].mean()
    assert mean.loc[CEILING, "pearson_delta"] > mean.loc["control", "pearson_delta"] + 0.2
    assert mean.loc[CEILING, "energy_pca"] < mean.loc["control", "energy_pca"]
    # zero predicted shift: exactly what the control baseline predicts
    assert np.allclose(scores.loc[scores["model"] == "control", "pred_shift_l2"], 0.0, atol=1e-5)
    assert mean.loc["train_mean", "pred_shift_l2"] > 0


def test_resume_reuses_finished_runs_and_rerun_reproduces(bench, data_dir, tmp_path):
    config, scores = bench
    stamps = {p: p.stat().st_mtime_ns for p in config.out.glob("seed*/scores/*.csv")}
    again = run_benchmark(config)  # everything finished: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in config.out.glob("seed*/scores/*.csv")} == stamps
    pd.testing.assert_frame_equal(again, scores)
    # a fresh directory with the same seeds gives the same numbers (times aside)
    fresh = run_benchmark(_config(data_dir, tmp_path / "fresh", models=("control", "knn"), seeds=(1,)))
    cols = [c for c in fresh.columns if c != "seconds"]
    mine = scores[(scores["seed"] == 1) & scores["model"].isin(["control", "knn", CEILING])][cols]
    pd.testing.assert_frame_equal(fresh[cols].reset_index(drop=True), mine.reset_index(drop=True))


def test_interrupted_model_is_redone_alone(bench, data_dir, tmp_path):
    config = _config(data_dir, tmp_path / "b", models=("control", "train_mean"), seeds=(0,))
    run_benchmark(config)
    victim = config.out / "seed0" / "scores" / "train_mean.csv"
    keep = config.out / "seed0" / "scores" / "control.csv"
    stamp = keep.stat().st_mtime_ns
    victim.unlink()
    scores = run_benchmark(config)
    assert victim.exists() and keep.stat().st_mtime_ns == stamp
    assert set(scores["model"]) == {"control", "train_mean", CEILING}


def test_report_has_table_plots_and_setup(bench):
    config, scores = bench
    report = write_benchmark_report(config, scores)
    text = report.read_text()
    for model in (*MODELS, CEILING):
        assert f"| {model} |" in text
    assert "held-out half" in text and "pearson_delta" in text
    for split in config.seeds:
        assert pd.read_json(config.out / f"seed{split}" / "split.json", typ="series")["split_id"] in text
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert {"metrics.png", "delta_scatter.png", "refiner_weights.png", "training_curves.png"} <= set(pngs)
    for name in pngs:
        assert (report.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text


def test_bad_configs_say_what_is_wrong(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        _config(data_dir, tmp_path, models=("ptrag", "gears"))
    with pytest.raises(ValueError, match="seeds repeat"):
        _config(data_dir, tmp_path, seeds=(0, 0))
    with pytest.raises(ValueError, match="does not exist"):
        _config(data_dir, tmp_path, embeddings=tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="TrainConfig"):
        _config(data_dir, tmp_path, train={"max_steps": 5})
    with pytest.raises(ValueError, match=r"cell type\(s\) \['hela'\]"):
        run_benchmark(_config(data_dir, tmp_path / "x", cell_types=("hela",), models=("control",)))


def test_train_exclude_cells_drops_rows_and_rejects_bad_files(data_dir, tmp_path):
    base = {"run_dir": str(tmp_path / "t"), "data": str(data_dir / "cells.h5ad"),
            "split": str(data_dir / "split.json"), "index": str(data_dir / "index"), "max_steps": 1,
            "eval_every": 1, "progress": False, **TINY_TRAIN}  # fmt: skip
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="integer"):
        train(TrainConfig(**base, exclude_cells=str(bad)))
    np.save(bad, np.array([10**9]))
    with pytest.raises(ValueError, match="outside"):
        train(TrainConfig(**base, exclude_cells=str(bad)))
    cells = ad.read_h5ad(data_dir / "cells.h5ad")
    ctrl = np.flatnonzero((cells.obs["gene"] == "non-targeting").to_numpy())
    good = tmp_path / "good.npy"
    np.save(good, ctrl[::2])
    train(TrainConfig(**base, exclude_cells=str(good)))
    from model.train import CONTROLS, load_checkpoint

    cached = load_checkpoint(tmp_path / "t" / "last.pt")[CONTROLS]
    excluded = np.asarray(cells.X[ctrl[::2]].toarray())
    for cells_ct in cached.values():
        for cell in cells_ct.numpy()[:20]:
            assert not (np.abs(excluded - cell).sum(1) < 1e-6).any()


def test_ceiling_reference_row_is_replaced_not_shared():
    from model.eval.benchmark import _replace_row
    from model.eval.metrics import cell_type_reference

    ref = cell_type_reference(np.array(["g1", "g2"]), np.array(["A", "B", "C"]), np.arange(6.0).reshape(3, 2))
    new = _replace_row(ref, "B", np.array([10.0, 20.0]))
    np.testing.assert_array_equal(new.means, [[0, 1], [10, 20], [4, 5]])
    np.testing.assert_allclose(new.perturbed_centroid, [14 / 3, 26 / 3])
    np.testing.assert_array_equal(ref.means, np.arange(6.0).reshape(3, 2))  # the shared reference is untouched
    with pytest.raises(ValueError, match="'Z'"):
        _replace_row(ref, "Z", np.zeros(2))


def test_config_files_read_as_mappings_for_train_and_benchmark(tmp_path):
    from model.config import read_config_file

    (tmp_path / "a.yaml").write_text("d_model: 16\nlr: 0.01\n")
    (tmp_path / "a.toml").write_text("d_model = 16\nlr = 0.01\n")
    (tmp_path / "a.json").write_text("{}")
    assert read_config_file(tmp_path / "a.yaml") == read_config_file(tmp_path / "a.toml") == {"d_model": 16, "lr": 0.01}
    assert TrainConfig.from_file(tmp_path / "a.toml", lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match=r"must be \.yaml, \.yml or \.toml"):
        read_config_file(tmp_path / "a.json")
    (tmp_path / "b.yaml").write_text("d_modle: 16\n")
    with pytest.raises(ValueError, match="d_modle"):
        TrainConfig.from_file(tmp_path / "b.yaml")
