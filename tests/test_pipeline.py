"""The main job on a small simulated dataset: every artifact, resumption, and argument checks."""

from __future__ import annotations

import json

import anndata as ad
import pytest

from api.cli import main
from model.data.splits import Split
from model.pipeline import RunConfig, run_main_job
from retrieval_service.store import Store

SMALL = {
    "n_genes": 200,
    "n_perturbation_pool": 40,
    "n_perturbations": 34,
    "n_doubles": 3,
    "cells_per_perturbation": 15,
    "n_control_cells": 60,
    "embedding_dim": 32,
    "program_size": 15,
}


def test_main_job_writes_every_artifact_and_resumes(tmp_path):
    config = RunConfig(out=tmp_path / "run", seed=1, simulator=SMALL, stop_after="index")
    summary = run_main_job(config)
    run = tmp_path / "run"
    for name in (
        "simulated.h5ad",
        "simulated.embeddings.npz",
        "cells.h5ad",
        "profiles.h5ad",
        "split.json",
        "summary.json",
        "config.json",
        "index/manifest.json",
    ):
        assert (run / name).exists(), name
    assert summary["n_genes"] == 200
    assert summary["cell_types"] == ["hepg2", "jurkat", "k562", "rpe1"]
    split = Split.load(run / "split.json")
    assert split.seed == 1 and summary["split"]["id"] == split.split_id
    assert {c for c, _ in split.test} == {"rpe1"}
    store = Store.open(run / "index")
    assert len(store) == len(split.train)
    assert "100.0%" in summary["embeddings"]["coverage"]
    assert json.loads((run / "summary.json").read_text())["split"] == summary["split"]

    # A second run reuses the artifacts: same split, same profiles file untouched.
    mtime = (run / "profiles.h5ad").stat().st_mtime_ns
    again = run_main_job(config)
    assert again["split"] == summary["split"]
    assert (run / "profiles.h5ad").stat().st_mtime_ns == mtime
    cells = ad.read_h5ad(run / "cells.h5ad")
    assert cells.uns["ptrag_preprocess"]["detected_scale"] == "log"


def test_run_config_checks():
    with pytest.raises(ValueError, match="also pass --embeddings"):
        RunConfig(data="x.h5ad")
    with pytest.raises(ValueError, match="unknown split kind"):
        RunConfig(split_kind="nope")
    assert RunConfig().target_cell_type == "rpe1"


def test_cli_run_reports_missing_embeddings(tmp_path, capsys):
    assert main(["run", "--data", str(tmp_path / "x.h5ad"), "--out", str(tmp_path / "r")]) == 2
    assert "--embeddings" in capsys.readouterr().err
