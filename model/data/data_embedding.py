"""Gene embeddings from the data itself: the fallback that exists for every measured gene.

A gene that has no text (so no GenePT or MiniLM vector) can still be described by how it co-varies with
other genes in unperturbed cells. :func:`data_derived_embeddings` takes each gene's loadings in a PCA of the
control cells. Those vectors live in their own small space, so :func:`impute_missing_embeddings` learns a
ridge map from that space into the primary one (e.g. 1536-d GenePT) on the genes that have both, and uses it
only for the genes the primary table lacks, naming them and recording the source of every row.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from model.data.errors import PerturbDataError
from retrieval_service.embeddings import GeneEmbeddings, l2_normalize, merge_embeddings

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["data_derived_embeddings", "fit_ridge_map", "impute_missing_embeddings"]

logger = logging.getLogger(__name__)


def _warn_dropped(what: str, names: list[str]) -> None:
    more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
    msg = f"{len(names)} genes {what}: {', '.join(names[:20])}{more}"
    warnings.warn(msg, UserWarning, stacklevel=3)


def data_derived_embeddings(
    adata: AnnData,
    genes: Iterable[str] | None = None,
    *,
    pert_col: str = "gene",
    cell_type_col: str | None = "cell_line",
    control_label: str = "non-targeting",
    n_comps: int = 50,
    layer: str | None = None,
    rng: np.random.Generator | int | None = None,
) -> GeneEmbeddings:
    """Embed genes by their loadings in a PCA of control cells.

    All cell types' controls are pooled after centring each cell type on its own mean, so that differences
    between cell types (which move many genes together) do not masquerade as gene-gene co-variation. Genes
    are then scaled to unit variance, so that the cosine of two genes' vectors approximates their
    correlation within the top ``n_comps`` components.

    Parameters
    ----------
    adata
        Cells x genes; ``X`` (or ``layers[layer]``) log-normalised expression, dense or sparse. The control
        cells are densified: ``n_control x n_vars`` float64 must fit in memory.
    genes
        Genes to return (default: all ``var_names``). Genes absent from ``var_names`` or constant in the
        controls cannot get a vector: they are named in a warning and left out.
    pert_col
        ``obs`` column with the perturbation label.
    cell_type_col
        ``obs`` column with the cell type, or ``None`` to treat all controls as one population.
    control_label
        Value of ``pert_col`` marking control cells.
    n_comps
        Number of principal components (capped at ``n_control - 1`` and ``n_vars``).
    layer
        Use ``adata.layers[layer]`` instead of ``X``.
    rng
        Seed or generator for the randomized SVD.

    Returns
    -------
    GeneEmbeddings
        ``(n_genes, k)`` float32 unit vectors, in the order of ``genes``; ``source`` ``"data-pca<k>"``.

    Raises
    ------
    PerturbDataError
        Missing columns, fewer than 3 control cells, or no requested gene that can be embedded.
    """
    from sklearn.utils.extmath import randomized_svd

    obs = adata.obs
    for col in (pert_col, cell_type_col):
        if col is not None and col not in obs.columns:
            msg = f"obs has no column {col!r} (columns: {list(obs.columns)})"
            raise PerturbDataError(msg)
    ctrl = (obs[pert_col].astype(str) == control_label).to_numpy()
    if ctrl.sum() < 3:
        msg = f"need at least 3 control cells ({pert_col} == {control_label!r}) for a PCA, found {int(ctrl.sum())}"
        raise PerturbDataError(msg)

    var_names = [str(v) for v in adata.var_names]
    wanted = var_names if genes is None else list(dict.fromkeys(str(g) for g in genes))
    absent = [g for g in wanted if g not in set(var_names)]
    if absent:
        _warn_dropped("are not in var_names and get no data-derived embedding", absent)

    x = adata.layers[layer] if layer is not None else adata.X
    x = x[ctrl]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)  # (n_ctrl, n_vars)
    if cell_type_col is None:
        x -= x.mean(axis=0)
    else:
        types = obs[cell_type_col].astype(str).to_numpy()[ctrl]
        for t in np.unique(types):
            rows = types == t
            x[rows] -= x[rows].mean(axis=0)
    sd = x.std(axis=0)
    varying = sd > 1e-8
    x[:, varying] /= sd[varying]

    n_comps = int(min(n_comps, x.shape[0] - 1, x.shape[1]))
    seed = int(np.random.default_rng(rng).integers(2**31 - 1))
    _, s, vt = randomized_svd(x, n_comps, n_iter=7, random_state=seed)
    loadings = vt.T * s  # (n_vars, k): dot products approximate gene-gene covariance

    col = {g: i for i, g in enumerate(var_names)}
    constant = [g for g in wanted if g in col and not varying[col[g]]]
    if constant:
        _warn_dropped("do not vary in the control cells and get no data-derived embedding", constant)
    keep = [g for g in wanted if g in col and varying[col[g]]]
    if not keep:
        msg = f"none of the {len(wanted)} requested genes can get a data-derived embedding"
        raise PerturbDataError(msg)
    vectors = l2_normalize(loadings[[col[g] for g in keep]])
    logger.info(
        "data-derived embeddings: %d genes, %d components from %d control cells", len(keep), n_comps, x.shape[0]
    )
    return GeneEmbeddings(tuple(keep), vectors, f"data-pca{n_comps}")


def fit_ridge_map(x: np.ndarray, y: np.ndarray, *, alpha: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge regression ``y ~ x @ coef + intercept``, with ``alpha`` chosen by leave-one-out when ``None``.

    Parameters
    ----------
    x
        ``(n, k)`` source vectors.
    y
        ``(n, d)`` target vectors.
    alpha
        L2 penalty; ``None`` picks the best of ``10**-3 .. 10**3`` by exact leave-one-out error, which an SVD
        of ``x`` gives for every alpha at once.

    Returns
    -------
    coef
        ``(k, d)`` float64.
    intercept
        ``(d,)`` float64.
    alpha
        The penalty used.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    assert y.shape[0] == n, f"x has {n} rows, y has {y.shape[0]}"
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    u, s, vt = np.linalg.svd(xc, full_matrices=False)  # u (n, r), s (r,), vt (r, k)
    uty = u.T @ yc  # (r, d)
    if alpha is None:
        best = None
        for a in np.logspace(-3, 3, 13):
            shrink = s**2 / (s**2 + a)  # (r,)
            resid = yc - u @ (shrink[:, None] * uty)  # (n, d)
            # Leverage includes the 1/n of the intercept that centring fitted.
            h = (u**2) @ shrink + 1.0 / n  # (n,)
            loo = float(np.mean((resid / np.maximum(1.0 - h, 1e-6)[:, None]) ** 2))
            if best is None or loo < best[0]:
                best = (loo, float(a))
        alpha = best[1]
    coef = vt.T @ ((s / (s**2 + alpha))[:, None] * uty)  # (k, d)
    return coef, my - mx @ coef, float(alpha)


def impute_missing_embeddings(
    primary: GeneEmbeddings,
    derived: GeneEmbeddings,
    genes: Iterable[str] | None = None,
    *,
    alpha: float | None = None,
    min_shared: int = 10,
) -> GeneEmbeddings:
    """Bring data-derived vectors into the primary space, for the genes the primary table lacks.

    A ridge map from ``derived`` space to ``primary`` space is fitted on the genes present in both, then
    applied to the requested genes that only ``derived`` has. Those genes are named in a warning; every
    row's origin is kept in ``gene_sources``. Primary vectors are never changed.

    Parameters
    ----------
    primary
        ``(n_p, D)`` table, e.g. GenePT (the retrieval key space).
    derived
        ``(n_d, k)`` table, e.g. from :func:`data_derived_embeddings`.
    genes
        Genes that should end up with a vector (default: every gene of ``derived``). Those in neither table
        are named in a warning.
    alpha
        Ridge penalty; ``None`` chooses it by leave-one-out on the shared genes.
    min_shared
        Fewest shared genes to fit the map on; below it the map is not trusted and ``ValueError`` is raised.

    Returns
    -------
    GeneEmbeddings
        All primary rows, then the imputed ones (unit-normalised when the primary vectors are);
        ``gene_sources`` says ``primary.source`` or ``"ridge(<derived>-><primary>)"`` per row.
    """
    wanted = list(derived.symbols) if genes is None else list(dict.fromkeys(str(g) for g in genes))
    nowhere = [g for g in wanted if g not in primary and g not in derived]
    if nowhere:
        _warn_dropped("have neither a primary nor a data-derived embedding and are left out", nowhere)
    targets = [g for g in wanted if g not in primary and g in derived]
    if not targets:
        return primary
    shared = [g for g in derived.symbols if g in primary]
    if len(shared) < min_shared:
        msg = (
            f"only {len(shared)} genes have both a {primary.source!r} and a {derived.source!r} vector; "
            f"need at least {min_shared} to fit the map between the spaces"
        )
        raise ValueError(msg)

    coef, intercept, alpha = fit_ridge_map(derived.subset(shared).vectors, primary.subset(shared).vectors, alpha=alpha)
    pred = derived.subset(targets).vectors @ coef + intercept  # (n_targets, D)
    norms = np.linalg.norm(primary.vectors, axis=1)
    if np.allclose(norms, 1.0, atol=1e-3):
        pred = l2_normalize(pred)
    _warn_dropped(f"lack a {primary.source!r} vector and get one imputed from {derived.source!r}", targets)
    logger.info("ridge map %s -> %s: %d shared genes, alpha=%g", derived.source, primary.source, len(shared), alpha)
    imputed = GeneEmbeddings(tuple(targets), pred, f"ridge({derived.source}->{primary.source})")
    return merge_embeddings(primary, imputed)
