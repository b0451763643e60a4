"""Reading and validation: the real shared file, simulated-style toy data, and every bad-input case."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import make_toy_perturbseq

from model.data.errors import PerturbDataError
from model.data.perturbations import format_perturbation, parse_perturbation
from model.data.preprocess import detect_scale, prepare_expression
from model.data.reading import expression_matrix, feature_names, read_perturbseq, validate_perturbseq

REAL = {"pert_col": "perturbation", "cell_type_col": "cell_type", "control_label": "control"}


def test_parse_perturbation_forms():
    assert parse_perturbation("TP53", control_label="non-targeting") == ("TP53",)
    assert parse_perturbation("B+A", control_label="non-targeting") == ("A", "B")
    assert parse_perturbation("A+ctrl", control_label="non-targeting") == ("A",)
    assert parse_perturbation("non-targeting", control_label="non-targeting") == ()
    assert format_perturbation(("B", "A")) == "A+B"
    with pytest.raises(ValueError, match="empty gene name"):
        parse_perturbation("A+", control_label="c")
    with pytest.raises(ValueError, match="names no gene"):
        parse_perturbation("ctrl+ctrl", control_label="c")


def test_read_real_shared_file(perturbench_path):
    adata = read_perturbseq(perturbench_path, **REAL)
    assert adata.shape == (5961, 500)
    assert set(adata.obs["cell_type"]) == {"k562", "A172", "T98G", "U87MG"}
    assert detect_scale(adata.X) == "log"
    # Already log-normalised: not redone, 500 genes kept as they are.
    prepared = prepare_expression(adata, n_top_genes=2000, pert_col="perturbation", control_label="control")
    assert prepared.uns["ptrag_preprocess"]["detected_scale"] == "log"
    np.testing.assert_allclose(prepared.X[:50].toarray(), adata.X[:50].toarray(), rtol=1e-6)


def test_raw_counts_are_normalised_and_hvg_keeps_targets():
    adata = make_toy_perturbseq(n_genes=40, counts=True)
    original = adata.X.copy()
    assert detect_scale(adata.X) == "counts"
    out = prepare_expression(adata, n_top_genes=8)
    np.testing.assert_array_equal(adata.X, original)  # the caller's data is untouched
    assert out.uns["ptrag_preprocess"]["detected_scale"] == "counts"
    assert "counts" in out.layers
    # Perturbed genes GENE01..GENE03 are kept beyond the 8 HVGs.
    assert {"GENE01", "GENE02", "GENE03"} <= set(out.var_names)
    assert 8 <= out.n_vars <= 11
    # X is log1p(CP10k) of the counts over the original library sizes.
    raw = adata.X
    row = 5
    j = list(adata.var_names).index(out.var_names[0])
    expected = np.log1p(raw[row, j] / raw[row].sum() * 1e4)
    assert out.X[row, 0] == pytest.approx(expected, rel=1e-5)


def test_obsm_expression_and_feature_names():
    adata = make_toy_perturbseq(n_genes=20)
    adata.var["highly_variable"] = np.arange(20) < 5
    adata.obsm["X_hvg"] = np.asarray(adata.X[:, :5])
    assert feature_names(adata, obsm_key="X_hvg") == [f"GENE{i:02d}" for i in range(5)]
    assert expression_matrix(adata, obsm_key="X_hvg").shape == (adata.n_obs, 5)
    adata.obsm["X_odd"] = np.zeros((adata.n_obs, 7))
    with pytest.raises(PerturbDataError, match="cannot name the 7 columns"):
        feature_names(adata, obsm_key="X_odd")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.obs.drop(columns="gene", inplace=True), "perturbation column 'gene' not in adata.obs"),
        (lambda a: a.obs.drop(columns="cell_line", inplace=True), "cell type column 'cell_line'"),
        (lambda a: a.obs["gene"].replace("non-targeting", "NT_ctrl", inplace=True), "no control cells"),
        (lambda a: a.X.__setitem__((3, 4), np.nan), "1 NaN/inf"),
        (lambda a: a.X.__setitem__((3, 4), np.inf), "1 NaN/inf"),
        (
            lambda a: a.obs.__setitem__("gene", a.obs["gene"].astype(object).where(a.obs.index != "cell7")),
            "1 missing values",
        ),
        (lambda a: a.obs["gene"].replace("GENE01", "GENE01+", inplace=True), "empty gene name"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    adata = make_toy_perturbseq()
    mutate(adata)
    with pytest.raises(PerturbDataError, match=match):
        validate_perturbseq(adata)


def test_cell_type_without_controls_is_named():
    adata = make_toy_perturbseq()
    keep = ~((adata.obs["cell_line"] == "rpe1") & (adata.obs["gene"] == "non-targeting")).to_numpy()
    with pytest.raises(PerturbDataError, match=r"\['rpe1'\] have no control cells"):
        validate_perturbseq(adata[keep].copy())


def test_duplicate_gene_names_and_missing_layer():
    adata = make_toy_perturbseq()
    adata.var_names = ["GENE00"] * 2 + list(adata.var_names[2:])
    with pytest.raises(PerturbDataError, match="not unique"):
        validate_perturbseq(adata)
    adata = make_toy_perturbseq()
    with pytest.raises(PerturbDataError, match="layer 'counts' not found"):
        validate_perturbseq(adata, layer="counts")


def test_duplicate_cell_names_only_warn():
    adata = make_toy_perturbseq()
    adata.obs_names = ["same"] * adata.n_obs
    with pytest.warns(UserWarning, match="obs_names are not unique"):
        validate_perturbseq(adata)


def test_scaled_data_and_empty_data_rejected():
    adata = make_toy_perturbseq()
    adata.X = adata.X - adata.X.mean(axis=0)
    with pytest.raises(PerturbDataError, match="negative values"):
        detect_scale(adata.X)
    with pytest.raises(PerturbDataError, match="no cells"):
        validate_perturbseq(adata[:0].copy())


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_perturbseq(tmp_path / "absent.h5ad")
    good = tmp_path / "good.h5ad"
    make_toy_perturbseq().write_h5ad(good)
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PerturbDataError, match=r"could not read .*broken\.h5ad"):
        read_perturbseq(broken)
    adata = read_perturbseq(good)
    assert adata.n_obs == make_toy_perturbseq().n_obs


def test_sparse_nan_detected():
    adata = make_toy_perturbseq()
    x = sp.csr_matrix(adata.X)
    x.data[10] = np.nan
    adata = ad.AnnData(X=x, obs=adata.obs, var=adata.var)
    with pytest.raises(PerturbDataError, match="NaN"):
        validate_perturbseq(adata)
