"""Per (cell type, perturbation) profiles: what the retrieval service caches for each training perturbation.

A profile is the group's cell count, mean expression, pseudobulk delta against its own cell type's control
mean, and a fixed-size sample of its cells. Profiles are returned as a pseudobulk AnnData (one row per group,
control groups included) so they can be sliced, written and inspected like any other AnnData.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from model.data.errors import PerturbDataError
from model.data.reading import (
    DEFAULT_CELL_TYPE_COL,
    DEFAULT_CONTROL_LABEL,
    DEFAULT_PERT_COL,
    expression_matrix,
    feature_names,
)

__all__ = ["compute_profiles", "group_means", "group_members"]

logger = logging.getLogger(__name__)


def group_means(mat: np.ndarray | sp.spmatrix, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean row of each group: ``(n_groups, n_features)`` float32 from ``mat`` ``(n, n_features)``.

    One sparse indicator product instead of a Python loop over groups: the same cost for 100 or 10,000
    groups, and it never densifies ``mat``.
    """
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    weights = 1.0 / np.maximum(counts, 1.0)
    indicator = sp.csr_matrix(
        (weights[codes], (codes, np.arange(len(codes)))), shape=(n_groups, len(codes))
    )  # (n_groups, n)
    out = indicator @ mat
    out = out.toarray() if sp.issparse(out) else np.asarray(out)
    return out.astype(np.float32, copy=False)


def group_members(codes: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Row indices of each group, in row order: one stable sort instead of a mask per group."""
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=n_groups))])
    return [order[bounds[g] : bounds[g + 1]] for g in range(n_groups)]


def compute_profiles(
    adata: ad.AnnData,
    *,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    layer: str | None = None,
    obsm_key: str | None = None,
    n_sample_cells: int = 16,
    min_cells: int = 1,
    reference_mask: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> ad.AnnData:
    """Profiles of every (cell type, perturbation) group, control groups included.

    Parameters
    ----------
    adata
        Cells x genes, log-normalised (see :func:`model.data.preprocess.prepare_expression`), or pseudobulk
        input with one row per (cell type, perturbation) and an optional ``obs['n_cells']``.
    n_sample_cells
        Size S of the cell sample kept per group, drawn with replacement when the group is smaller.
    min_cells
        Groups with fewer cells are dropped with a warning that names them.
    reference_mask
        ``(n_obs,)`` bool: which control cells form each cell type's reference mean (default: all). The
        evaluation holds half of a cell type's controls out of every profile, so that shared control noise
        cannot inflate correlations of deltas.
    rng
        Source of randomness for the cell samples (default ``np.random.default_rng(0)``).

    Returns
    -------
    AnnData with one row per group:

    - ``obs[cell_type_col]``, ``obs[pert_col]`` (str), ``obs['n_cells']`` (int), ``obs['is_control']`` (bool)
    - ``X``: mean expression, float32 ``(N, G)``
    - ``layers['delta']``: mean minus the cell type's reference control mean, float32 ``(N, G)``
    - ``obsm['cells']``: sampled cells, float32 ``(N, S, G)``
    - ``uns['ptrag_profiles']``: the parameters, ``pseudobulk_input`` and ``n_reference_cells`` per cell type
    """
    rng = np.random.default_rng(0) if rng is None else rng
    if n_sample_cells < 1:
        msg = f"n_sample_cells must be >= 1, got {n_sample_cells}"
        raise ValueError(msg)
    mat = expression_matrix(adata, layer=layer, obsm_key=obsm_key)
    genes = feature_names(adata, obsm_key=obsm_key)
    for col in (pert_col, cell_type_col):
        if col not in adata.obs.columns:
            msg = f"column {col!r} not in adata.obs; available columns: {list(adata.obs.columns)}"
            raise PerturbDataError(msg)
    cell_type = adata.obs[cell_type_col].astype(str).to_numpy()
    pert = adata.obs[pert_col].astype(str).to_numpy()
    is_control_cell = pert == control_label

    keys = pd.MultiIndex.from_arrays([cell_type, pert], names=[cell_type_col, pert_col])
    codes, groups = pd.factorize(keys, sort=True)
    n_cells = np.bincount(codes, minlength=len(groups))
    pseudobulk_input = bool(n_cells.max() == 1) and adata.n_obs > 1
    if pseudobulk_input and "n_cells" in adata.obs:
        n_cells = np.zeros(len(groups), dtype=np.int64)
        n_cells[codes] = adata.obs["n_cells"].to_numpy(np.int64)

    means = group_means(mat, codes, len(groups))  # (N, G)
    group_ct = groups.get_level_values(0).to_numpy(str)
    group_pert = groups.get_level_values(1).to_numpy(str)
    group_is_control = group_pert == control_label

    # Reference control mean per cell type, possibly from a subset of the control cells.
    ref = is_control_cell if reference_mask is None else is_control_cell & np.asarray(reference_mask, bool)
    cell_types = sorted(set(cell_type))
    ct_code = {ct: i for i, ct in enumerate(cell_types)}
    ref_cells = np.flatnonzero(ref)
    ref_codes = np.array([ct_code[c] for c in cell_type[ref_cells]], dtype=np.int64)
    n_ref = np.bincount(ref_codes, minlength=len(cell_types))
    if (n_ref == 0).any():
        missing = [ct for ct, n in zip(cell_types, n_ref, strict=True) if n == 0]
        msg = f"cell type(s) {missing} have no reference control cells; check control_label and reference_mask"
        raise PerturbDataError(msg)
    if pseudobulk_input:
        ref_mean = means[[int(np.flatnonzero(group_is_control & (group_ct == ct))[0]) for ct in cell_types]]
    else:
        ref_mean = group_means(mat[ref_cells], ref_codes, len(cell_types))  # (C, G)
    delta = means - ref_mean[[ct_code[c] for c in group_ct]]  # (N, G)

    keep = n_cells >= min_cells
    if not keep.all():
        dropped = [
            f"{c}/{p} ({n} cells)" for c, p, n in zip(group_ct, group_pert, n_cells, strict=True) if n < min_cells
        ]
        warnings.warn(f"dropping {len(dropped)} groups with < {min_cells} cells: {dropped[:10]}", stacklevel=2)

    cells = _sample_cells(
        mat, codes, len(groups), n_sample_cells, rng=rng, pseudobulk_means=means if pseudobulk_input else None
    )

    obs = pd.DataFrame(
        {
            cell_type_col: group_ct,
            pert_col: group_pert,
            "n_cells": n_cells.astype(np.int64),
            "is_control": group_is_control,
        },
        index=[f"{c}|{p}" for c, p in zip(group_ct, group_pert, strict=True)],
    )
    out = ad.AnnData(X=means, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    out.layers["delta"] = delta.astype(np.float32)
    out.obsm["cells"] = cells
    out.uns["ptrag_profiles"] = {
        "params": {
            "pert_col": pert_col,
            "cell_type_col": cell_type_col,
            "control_label": control_label,
            "n_sample_cells": int(n_sample_cells),
            "min_cells": int(min_cells),
            "reference": "all controls" if reference_mask is None else "reference_mask",
        },
        "pseudobulk_input": pseudobulk_input,
        "cell_types": cell_types,
        "n_reference_cells": [int(n) for n in n_ref],
    }
    out = out[keep].copy() if not keep.all() else out
    logger.info(
        "profiles: %d groups (%d control) over %d genes",
        out.n_obs,
        int(out.obs["is_control"].sum()),
        out.n_vars,
    )
    return out


def _sample_cells(
    mat: np.ndarray | sp.spmatrix,
    codes: np.ndarray,
    n_groups: int,
    n_sample: int,
    *,
    rng: np.random.Generator,
    pseudobulk_means: np.ndarray | None,
) -> np.ndarray:
    """``(n_groups, n_sample, G)`` float32: each group's cells, sampled with replacement only when too few."""
    if pseudobulk_means is not None:
        # No single cells exist: the sample is the group's mean repeated (a point mass).
        return np.repeat(pseudobulk_means[:, None, :], n_sample, axis=1)
    picks = np.empty((n_groups, n_sample), dtype=np.int64)
    for g, members in enumerate(group_members(codes, n_groups)):
        picks[g] = rng.choice(members, size=n_sample, replace=len(members) < n_sample)
    flat = picks.ravel()
    # Row gathers on CSR are fastest in sorted order; undo the sort afterwards.
    sort = np.argsort(flat, kind="stable")
    rows = mat[flat[sort]]
    rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    gathered = np.empty_like(rows, dtype=np.float32)
    gathered[sort] = rows
    return gathered.reshape(n_groups, n_sample, -1)
