"""The one check of a cells x genes matrix handed in from outside (predictions, controls, observations)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["cell_matrix"]


def cell_matrix(x: Any, name: str, n_genes: int, *, min_rows: int = 1, dtype: Any = np.float64) -> np.ndarray:
    """``x`` as a dense ``(n, n_genes)`` array of ``dtype`` (no copy where none is needed).

    Raises ``ValueError`` naming ``name`` and its shape for the wrong number of genes, fewer than ``min_rows``
    cells, or NaN/inf values.
    """
    if sp.issparse(x):
        x = x.toarray()
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2 or x.shape[1] != n_genes:
        msg = f"{name} must be (n, {n_genes}) cells x genes, got shape {x.shape}"
        raise ValueError(msg)
    if x.shape[0] < min_rows:
        msg = f"{name} needs at least {min_rows} cells, got shape {x.shape}"
        raise ValueError(msg)
    if not np.isfinite(x).all():
        msg = f"{name} (shape {x.shape}) contains NaN or inf ({int((~np.isfinite(x)).sum())} values)"
        raise ValueError(msg)
    return x
