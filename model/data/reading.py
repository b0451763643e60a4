"""Reading and validating Perturb-seq AnnData.

Column names are parameters whose defaults match the Arc Institute release of Replogle-Nadig
(``gene``, ``cell_line``, ``non-targeting``, ``gem_group``). Expression comes from ``X``, a layer, or an
``obsm`` matrix such as ``X_hvg``; :func:`expression_matrix` is the one place that picks it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from model.data.errors import PerturbDataError
from model.data.perturbations import parse_perturbations

__all__ = [
    "DEFAULT_BATCH_COL",
    "DEFAULT_CELL_TYPE_COL",
    "DEFAULT_CONTROL_LABEL",
    "DEFAULT_PERT_COL",
    "expression_matrix",
    "feature_names",
    "read_perturbseq",
    "validate_perturbseq",
]

logger = logging.getLogger(__name__)

DEFAULT_PERT_COL = "gene"
DEFAULT_CELL_TYPE_COL = "cell_line"
DEFAULT_CONTROL_LABEL = "non-targeting"
DEFAULT_BATCH_COL = "gem_group"

# Checking every entry of a 600k-cell matrix for NaN costs seconds; a block-wise scan keeps memory flat.
_SCAN_ROWS = 65_536


def read_perturbseq(
    path: str | os.PathLike[str],
    *,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    batch_col: str | None = DEFAULT_BATCH_COL,
    layer: str | None = None,
    obsm_key: str | None = None,
) -> ad.AnnData:
    """Read an ``.h5ad`` Perturb-seq file and validate it (see :func:`validate_perturbseq`).

    ``batch_col`` is optional: when the column is absent it is ignored with a log message.
    """
    path = Path(path)
    if not path.exists():
        msg = f"no such file: {path}"
        raise FileNotFoundError(msg)
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        msg = f"could not read {path} as .h5ad ({type(err).__name__}: {err}); is the file complete?"
        raise PerturbDataError(msg) from err
    if batch_col is not None and batch_col not in adata.obs.columns:
        logger.info("batch column %r not in %s; continuing without batches", batch_col, path.name)
    validate_perturbseq(
        adata,
        pert_col=pert_col,
        cell_type_col=cell_type_col,
        control_label=control_label,
        layer=layer,
        obsm_key=obsm_key,
    )
    return adata


def expression_matrix(
    adata: ad.AnnData, *, layer: str | None = None, obsm_key: str | None = None
) -> np.ndarray | sp.spmatrix:
    """The ``(n_obs, n_features)`` expression matrix: ``X``, ``layers[layer]`` or ``obsm[obsm_key]``."""
    if layer is not None and obsm_key is not None:
        msg = "give either layer= or obsm_key=, not both"
        raise ValueError(msg)
    if layer is not None:
        if layer not in adata.layers:
            msg = f"layer {layer!r} not found; available layers: {list(adata.layers)}"
            raise PerturbDataError(msg)
        return adata.layers[layer]
    if obsm_key is not None:
        if obsm_key not in adata.obsm:
            msg = f"obsm key {obsm_key!r} not found; available: {list(adata.obsm)}"
            raise PerturbDataError(msg)
        mat = adata.obsm[obsm_key]
        return mat.to_numpy() if isinstance(mat, pd.DataFrame) else mat
    if adata.X is None:
        msg = "adata.X is empty; pass layer= or obsm_key= to say where the expression is"
        raise PerturbDataError(msg)
    return adata.X


def feature_names(adata: ad.AnnData, *, obsm_key: str | None = None) -> list[str]:
    """Names of the expression features: ``var_names``, or the genes behind an ``obsm`` matrix.

    For ``obsm`` the names come from a DataFrame's columns, from ``var_names`` when the widths agree, or from
    ``var['highly_variable']`` (the Arc release stores ``X_hvg`` over the highly variable genes).
    """
    if obsm_key is None:
        return list(map(str, adata.var_names))
    mat = adata.obsm[obsm_key]
    if isinstance(mat, pd.DataFrame):
        return list(map(str, mat.columns))
    width = mat.shape[1]
    if width == adata.n_vars:
        return list(map(str, adata.var_names))
    if "highly_variable" in adata.var and int(adata.var["highly_variable"].sum()) == width:
        return list(map(str, adata.var_names[adata.var["highly_variable"].to_numpy(bool)]))
    msg = (
        f"cannot name the {width} columns of obsm[{obsm_key!r}]: store it as a DataFrame with gene columns, "
        f"or mark exactly {width} genes in var['highly_variable']"
    )
    raise PerturbDataError(msg)


def validate_perturbseq(
    adata: ad.AnnData,
    *,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    layer: str | None = None,
    obsm_key: str | None = None,
) -> None:
    """Raise :class:`PerturbDataError` naming the problem if ``adata`` cannot be used.

    Checks: the columns exist and have no missing values; labels parse (``A+B`` for combinations);
    every cell type has control cells; feature names are unique; expression is finite.
    Duplicate ``obs_names`` are only warned about: nothing here indexes cells by name.
    """
    if adata.n_obs == 0:
        msg = "the AnnData has no cells"
        raise PerturbDataError(msg)
    for col, what in ((pert_col, "perturbation"), (cell_type_col, "cell type")):
        if col not in adata.obs.columns:
            msg = (
                f"{what} column {col!r} not in adata.obs; available columns: {list(adata.obs.columns)}. "
                f"Pass the right name (CLI: --{'pert-col' if what == 'perturbation' else 'cell-type-col'})."
            )
            raise PerturbDataError(msg)
        n_missing = int(adata.obs[col].isna().sum())
        if n_missing:
            msg = f"column {col!r} has {n_missing} missing values; label or drop those cells"
            raise PerturbDataError(msg)
    labels = adata.obs[pert_col].astype(str)
    try:
        parse_perturbations(labels.unique(), control_label=control_label)
    except ValueError as err:
        msg = f"column {pert_col!r}: {err}"
        raise PerturbDataError(msg) from err
    is_control = (labels == control_label).to_numpy()
    if not is_control.any():
        examples = labels.value_counts().index[:5].tolist()
        msg = (
            f"no control cells: no value of {pert_col!r} equals control_label={control_label!r} "
            f"(most common labels: {examples}); pass the right control label (CLI: --control-label)"
        )
        raise PerturbDataError(msg)
    cell_types = adata.obs[cell_type_col].astype(str).to_numpy()
    without = sorted(set(cell_types) - set(cell_types[is_control]))
    if without:
        msg = (
            f"cell type(s) {without} have no control cells ({pert_col} == {control_label!r}); deltas need "
            "a control reference in each cell type: add controls or drop these cells"
        )
        raise PerturbDataError(msg)
    names = pd.Index(feature_names(adata, obsm_key=obsm_key))
    if not names.is_unique:
        dupes = names[names.duplicated()].unique().tolist()[:10]
        msg = f"feature (gene) names are not unique, e.g. {dupes}; call adata.var_names_make_unique() first"
        raise PerturbDataError(msg)
    if not adata.obs_names.is_unique:
        warnings.warn("obs_names are not unique; cells are not indexed by name here", stacklevel=2)
    _check_finite(expression_matrix(adata, layer=layer, obsm_key=obsm_key))


def _check_finite(mat: np.ndarray | sp.spmatrix) -> None:
    if sp.issparse(mat):
        data = mat.data
        bad = int((~np.isfinite(data)).sum())
    else:
        bad = 0
        for start in range(0, mat.shape[0], _SCAN_ROWS):
            block = np.asarray(mat[start : start + _SCAN_ROWS])
            bad += int((~np.isfinite(block)).sum())
    if bad:
        msg = f"expression contains {bad} NaN/inf values; impute or drop them before loading"
        raise PerturbDataError(msg)
