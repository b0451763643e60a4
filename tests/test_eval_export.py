"""cell-eval export: the two files in the layout ``cell-eval run`` reads, the command, and the optional run."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from model.eval import export as E
from model.eval.export import cell_eval_command, export_cell_eval, run_cell_eval


def make(perts, genes, *, cell_types=None, sparse=False, seed=0, obs_prefix="c"):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 4, size=(len(perts), len(genes))).astype(np.float64)
    obs = pd.DataFrame({"target": perts, "extra": 1}, index=[f"{obs_prefix}{i}" for i in range(len(perts))])
    if cell_types is not None:
        obs["ct"] = cell_types
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs, var=pd.DataFrame(index=genes))


GENES = ["G0", "G1", "G2", "G3"]
PERTS = ["ctrl", "A", "A", "B", "ctrl", "B"]


def test_files_written_reread_and_aligned(tmp_path):
    real = make(PERTS, GENES, sparse=True, seed=1)
    pred = make(["A", "ctrl", "B", "B"], ["G2", "G0", "G3", "G1", "EXTRA"], seed=2, obs_prefix="p")
    with pytest.warns(UserWarning, match="dropping 1 pred genes not in real"):
        pred_path, real_path = export_cell_eval(pred, real, tmp_path / "ce", pert_col="target", control_label="ctrl")
    assert (pred_path, real_path) == (tmp_path / "ce" / "pred.h5ad", tmp_path / "ce" / "real.h5ad")
    assert sorted(p.name for p in (tmp_path / "ce").iterdir()) == ["pred.h5ad", "real.h5ad"]  # no temporaries

    p, r = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
    assert list(p.var_names) == list(r.var_names) == GENES
    assert list(p.obs.columns) == list(r.obs.columns) == ["target"]
    assert isinstance(p.obs["target"].dtype, pd.CategoricalDtype)
    assert list(r.obs["target"]) == PERTS and list(r.obs_names) == [f"c{i}" for i in range(6)]
    assert list(p.obs["target"]) == ["A", "ctrl", "B", "B"]
    assert (p.obs["target"] == "ctrl").sum() == 1 and (r.obs["target"] == "ctrl").sum() == 2
    assert sp.issparse(r.X) and not sp.issparse(p.X)
    assert r.X.dtype == np.float32 and p.X.dtype == np.float32
    np.testing.assert_allclose(r.X.toarray(), real.X.toarray(), rtol=1e-6)
    np.testing.assert_allclose(p.X, pred[:, GENES].X, rtol=1e-6)  # pred columns reordered to real's genes


def test_cell_type_column_and_negative_predictions(tmp_path):
    cts = ["K", "K", "K", "R", "R", "R"]
    real = make(["ctrl", "A", "B", "ctrl", "A", "A"], GENES, cell_types=cts)
    pred = make(["ctrl", "A", "B", "ctrl", "A", "A"], GENES, cell_types=cts, obs_prefix="p")
    pred.X[0, 0] = -0.25
    pred.obs_names = ["dup"] * 6
    with pytest.warns(UserWarning, match="clipping 1 negative"):
        pred_path, _ = export_cell_eval(pred, real, tmp_path, pert_col="target", control_label="ctrl",
                                        celltype_col="ct")  # fmt: skip
    p = ad.read_h5ad(pred_path)
    assert list(p.obs.columns) == ["target", "ct"] and list(p.obs["ct"]) == cts
    assert p.X[0, 0] == 0.0 and p.X.min() >= 0.0
    assert pred.X[0, 0] == -0.25  # the caller's object is untouched
    assert list(p.obs_names) == [f"cell{i}" for i in range(6)]  # duplicate names replaced


@pytest.mark.parametrize(
    ("pred_perts", "kwargs", "match"),
    [
        (["A", "A", "B", "B", "B", "B"], {}, "pred has no control cells labelled 'ctrl'"),
        (["ctrl", "A", "A", "A", "ctrl", "C"], {}, r"only in pred: \['C'\], only in real: \['B'\]"),
        (PERTS, {"pert_col": "missing"}, "column 'missing' not in pred.obs"),
    ],
)
def test_layout_problems_raise(tmp_path, pred_perts, kwargs, match):
    real, pred = make(PERTS, GENES), make(pred_perts, GENES)
    with pytest.raises(ValueError, match=match):
        export_cell_eval(pred, real, tmp_path, **{"pert_col": "target", "control_label": "ctrl", **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_per_cell_type_labels_and_genes_and_scale_are_checked(tmp_path):
    real = make(["ctrl", "A", "ctrl", "B"], GENES, cell_types=["K", "K", "R", "R"])
    pred = make(["ctrl", "A", "ctrl", "A"], GENES, cell_types=["K", "K", "R", "R"])
    with pytest.raises(ValueError, match="cell type 'R'"):
        export_cell_eval(pred, real, tmp_path, pert_col="target", control_label="ctrl", celltype_col="ct")
    with pytest.raises(ValueError, match=r"1 genes of real are missing from pred, e.g. \['G3'\]"):
        export_cell_eval(make(PERTS, GENES[:3]), make(PERTS, GENES), tmp_path, pert_col="target", control_label="ctrl")
    counts = make(PERTS, GENES)
    counts.X = counts.X * 100
    with pytest.raises(ValueError, match="cell-eval expects log1p data"):
        export_cell_eval(make(PERTS, GENES), counts, tmp_path, pert_col="target", control_label="ctrl")
    assert list(tmp_path.iterdir()) == []


def test_cell_eval_command(tmp_path):
    cmd = cell_eval_command(tmp_path, pert_col="target", control_label="ctrl", celltype_col="ct", num_threads=4)
    assert cmd == [
        "cell-eval", "run", "-ap", str(tmp_path / "pred.h5ad"), "-ar", str(tmp_path / "real.h5ad"),
        "--pert-col", "target", "--control-pert", "ctrl", "-o", str(tmp_path / "cell_eval"),
        "--num-threads", "4", "--profile", "full", "--celltype-col", "ct",
    ]  # fmt: skip
    assert "--celltype-col" not in cell_eval_command(tmp_path, pert_col="t", control_label="c")


def test_run_cell_eval_without_cell_eval_returns_none(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "_cell_eval_available", lambda: False)

    def boom(*args, **kwargs):
        raise AssertionError("must not run")

    monkeypatch.setattr(subprocess, "run", boom)
    assert run_cell_eval(tmp_path, pert_col="target", control_label="ctrl") is None


def test_run_cell_eval_reads_results_per_cell_type(tmp_path, monkeypatch):
    cts = ["K/1", "K/1", "R", "R"]
    real = make(["ctrl", "A", "ctrl", "A"], GENES, cell_types=cts)
    export_cell_eval(real.copy(), real, tmp_path, pert_col="target", control_label="ctrl", celltype_col="ct")
    calls = []

    def fake_run(cmd, *, check, timeout):
        calls.append(cmd)
        out = tmp_path / "cell_eval"
        out.mkdir()
        for ct, value in (("K-1", 0.5), ("R", 0.25)):  # cell-eval replaces "/" in a prefix by "-"
            pd.DataFrame({"statistic": ["mean"], "pearson_delta": [value]}).to_csv(
                out / f"{ct}_agg_results.csv", index=False
            )
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(E, "_cell_eval_available", lambda: True)
    monkeypatch.setattr(subprocess, "run", fake_run)
    table = run_cell_eval(tmp_path, pert_col="target", control_label="ctrl", celltype_col="ct")
    assert calls[0][:4] == [sys.executable, "-m", "cell_eval", "run"] and calls[0][-2:] == ["--celltype-col", "ct"]
    assert list(table["cell_type"]) == ["K/1", "R"]
    assert list(table["pearson_delta"]) == [0.5, 0.25]
    assert table.columns[0] == "cell_type"
