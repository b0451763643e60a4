"""Expression preprocessing: raw counts are normalised and log-transformed, log data is left alone.

Whether data is already log-normalised is detected, not assumed: integer-valued non-negative matrices with
large values are counts. Gene selection keeps the perturbed genes themselves, because a knockdown's
strongest signal is usually its own target.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from model.data.errors import PerturbDataError
from model.data.perturbations import parse_perturbations
from model.data.reading import (
    DEFAULT_CELL_TYPE_COL,
    DEFAULT_CONTROL_LABEL,
    DEFAULT_PERT_COL,
    expression_matrix,
    feature_names,
    read_perturbseq,
)

__all__ = ["detect_scale", "load_prepared", "prepare_expression"]

logger = logging.getLogger(__name__)

Scale = Literal["counts", "log"]

# A log1p(CP10k) value above this would need ~1e11 counts per cell: such a matrix is not log data.
_MAX_LOG_VALUE = 30.0


def detect_scale(mat: np.ndarray | sp.spmatrix, *, n_rows: int = 2_000, seed: int = 0) -> Scale:
    """Guess whether ``mat`` holds raw counts or log-normalised values, from a row sample.

    Counts: non-negative, integer-valued, and some value above ``_MAX_LOG_VALUE`` or all rows' totals
    differing (log-normalised rows have no integer structure). Negative values mean the data was scaled or
    centred, which the pseudobulk deltas cannot use: that raises.
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(mat.shape[0], size=min(n_rows, mat.shape[0]), replace=False))
    sample = mat[rows]
    values = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
    if values.size == 0:
        msg = "the sampled expression rows are all zero; is the matrix empty?"
        raise PerturbDataError(msg)
    if values.min() < 0:
        msg = (
            "expression has negative values (scaled or centred data); give raw counts or log-normalised "
            "values instead (e.g. layer='counts')"
        )
        raise PerturbDataError(msg)
    is_integer = bool(np.all(np.mod(values, 1) == 0))
    if is_integer and values.max() > 1:
        return "counts"
    if values.max() > _MAX_LOG_VALUE:
        msg = (
            f"expression is neither counts (non-integer values) nor log-normalised (max {values.max():.1f} > "
            f"{_MAX_LOG_VALUE}); normalise it or pass the counts layer"
        )
        raise PerturbDataError(msg)
    return "log"


def prepare_expression(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    obsm_key: str | None = None,
    n_top_genes: int | None = 2000,
    target_sum: float = 1e4,
    pert_col: str = DEFAULT_PERT_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    keep_perturbed_genes: bool = True,
) -> ad.AnnData:
    """Return a new AnnData whose ``X`` is log-normalised expression over the selected genes.

    Parameters
    ----------
    adata
        Cells x genes, validated (:func:`model.data.reading.validate_perturbseq`).
    layer, obsm_key
        Where the expression is (default ``X``).
    n_top_genes
        Keep this many highly variable genes (scanpy ``seurat`` flavour on log data) when there are more;
        ``None`` keeps all genes.
    target_sum
        Counts per cell after normalisation, for raw counts only.
    keep_perturbed_genes
        Also keep every perturbed gene present in the data, beyond the ``n_top_genes``.

    Returns
    -------
    A new AnnData (``obs`` copied) with float32 ``X`` = log1p-normalised expression, and
    ``uns['ptrag_preprocess']`` with keys ``detected_scale``, ``n_top_genes``, ``target_sum``,
    ``n_genes_in``, ``n_genes_out``, ``source``. With raw counts the selected genes' counts are kept in
    ``layers['counts']``.
    """
    mat = expression_matrix(adata, layer=layer, obsm_key=obsm_key)
    var_names = feature_names(adata, obsm_key=obsm_key)
    scale = detect_scale(mat)
    out = ad.AnnData(
        # Always a copy: normalisation below works in place and must never touch the caller's matrix.
        X=mat.astype(np.float32, copy=True) if sp.issparse(mat) else np.array(mat, dtype=np.float32, copy=True),
        obs=adata.obs.copy(),
    )
    out.var_names = var_names
    if scale == "counts":
        out.layers["counts"] = out.X.copy()
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
        out.uns.pop("log1p", None)
    n_in = out.n_vars
    if n_top_genes is not None and out.n_vars > n_top_genes:
        hvg = sc.pp.highly_variable_genes(out, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
        keep = hvg["highly_variable"].to_numpy(bool)
        if keep_perturbed_genes:
            labels = out.obs[pert_col].astype(str).unique()
            targets = {g for genes in parse_perturbations(labels, control_label=control_label).values() for g in genes}
            keep |= out.var_names.isin(sorted(targets))
        out = out[:, keep].copy()
    logger.info("expression: detected %s, %d -> %d genes", scale, n_in, out.n_vars)
    out.uns["ptrag_preprocess"] = {
        "detected_scale": scale,
        "n_top_genes": -1 if n_top_genes is None else int(n_top_genes),
        "target_sum": float(target_sum),
        "n_genes_in": int(n_in),
        "n_genes_out": int(out.n_vars),
        "source": f"layers[{layer!r}]" if layer else (f"obsm[{obsm_key!r}]" if obsm_key else "X"),
    }
    return out


def load_prepared(
    path: str | os.PathLike[str],
    *,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    layer: str | None = None,
    obsm_key: str | None = None,
    n_top_genes: int | None = 2000,
) -> ad.AnnData:
    """:func:`model.data.reading.read_perturbseq` then :func:`prepare_expression`: the cells every command uses."""
    adata = read_perturbseq(
        path, pert_col=pert_col, cell_type_col=cell_type_col, control_label=control_label, layer=layer,
        obsm_key=obsm_key,
    )  # fmt: skip
    return prepare_expression(
        adata, layer=layer, obsm_key=obsm_key, n_top_genes=n_top_genes, pert_col=pert_col, control_label=control_label
    )
