"""Non-neural baselines: what PT-RAG must beat on the same split.

Every baseline is fitted on the training (cell type, perturbation) pairs of a split and predicts the pseudobulk
delta (group mean minus the cell type's control mean) of any (cell type, perturbation):

======================  =============================================================================================
``control``             zero delta: the perturbation changes nothing.
``train_mean``          mean delta of the training perturbations in the target cell type.
``knn``                 mean delta of the k training entries whose perturbation embeddings are closest (cosine), the
                        target cell type's entries ranked first; PT-RAG's stage-1 retrieval without the refiner.
``ridge``               GenePert: per cell type, ridge regression from the perturbation embedding to the delta.
``additive``            for ``A+B``: the sum of the single-gene deltas (the strongest simple predictor of doubles).
``transfer``            the same perturbation's delta in the other cell types, mapped to the target cell type by a
                        ridge map fitted on the perturbations both share in training.
======================  =============================================================================================

All share one interface (:class:`Baseline`), so a benchmark can loop over :data:`BASELINES` with
:func:`make_baseline`. ``fit`` reads only the rows of ``train_pairs`` (and the control rows, which carry no
perturbation effect); held-out rows can be changed arbitrarily without changing a prediction.

Every prediction records how it was made in :attr:`last_info` (one :class:`PredictionInfo` per requested
perturbation) and in the cumulative counters :attr:`method_counts` and :attr:`fallback_counts`, so a report can
say how often a baseline fell back (:meth:`explain`).

Ridge fits choose the penalty by exact leave-one-out error from one SVD of the centred inputs; grid values are
multiples of the mean squared singular value, so the same grid suits unit-norm embeddings and log-fold-change
deltas alike.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, runtime_checkable

import numpy as np
import scipy.sparse as sp

from model.data.perturbations import format_perturbation, parse_perturbation
from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL

if TYPE_CHECKING:
    from anndata import AnnData

    from retrieval_service.embeddings import GeneEmbeddings

__all__ = [
    "BASELINES",
    "DEFAULT_ALPHAS",
    "AdditiveBaseline",
    "Baseline",
    "ControlBaseline",
    "KNNBaseline",
    "PredictionInfo",
    "RidgeBaseline",
    "TrainMeanBaseline",
    "TransferBaseline",
    "make_baseline",
]

logger = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("control", "train_mean", "knn", "ridge", "additive", "transfer")

# Ridge penalties as multiples of the mean squared singular value of the centred inputs (scale-free):
# 1e-4 is nearly least squares, 1e3 nearly the intercept (or the prior) alone.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in 10.0 ** np.arange(-4.0, 3.5, 0.5))

MissingPolicy = Literal["train_mean", "raise"]
Key = tuple[str, tuple[str, ...]]  # (cell type, sorted genes)

# Fallback names, as counted in `fallback_counts`.
FB_TRAIN_MEAN_ALL = "train_mean_all_cell_types"  # target cell type has no training perturbation
FB_MISSING_EMBEDDING = "missing_embedding"  # a gene of the query has no embedding -> train_mean
FB_NO_CANDIDATES = "no_candidates"  # knn/ridge: no training entry has an embedding -> train_mean
FB_KNN_OTHER_CELL_TYPES = "knn_filled_from_other_cell_types"  # fewer than k entries in the target cell type
FB_RIDGE_POOLED = "ridge_pooled"  # too few training perturbations in the target cell type
FB_ADDITIVE_OTHER = "additive_gene_from_other_cell_types"  # one per gene, not per prediction
FB_ADDITIVE_ZERO = "additive_gene_zero"  # one per gene, not per prediction
FB_TRANSFER_PLAIN = "transfer_plain_average"  # no source had enough shared perturbations for a map
FB_TRANSFER_NO_SOURCE = "transfer_no_source"  # no other cell type has the perturbation -> train_mean


@dataclass(frozen=True)
class PredictionInfo:
    """How one prediction was made.

    Attributes
    ----------
    cell_type, perturbation
        The query, the perturbation as asked.
    method
        What produced the delta (``"knn"``, ``"train_mean"``, ``"ridge_map"``, ...).
    fallbacks
        Names of the fallbacks taken (empty: the baseline's primary method was used as defined).
    details
        Method-specific facts: neighbours and weights (knn), the penalty (ridge, transfer), the sources used
        (transfer), where each gene's delta came from (additive).
    """

    cell_type: str
    perturbation: str
    method: str
    fallbacks: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Baseline(Protocol):
    """What every baseline offers; see the module docstring for the definitions."""

    name: str
    last_info: list[PredictionInfo]

    def fit(
        self,
        profiles: AnnData,
        *,
        train_pairs: Iterable[tuple[str, str]],
        embeddings: GeneEmbeddings | None = None,
        pert_col: str = DEFAULT_PERT_COL,
        cell_type_col: str = DEFAULT_CELL_TYPE_COL,
        control_label: str = DEFAULT_CONTROL_LABEL,
    ) -> Self: ...

    def predict_delta(self, cell_type: str, perturbations: Sequence[str]) -> np.ndarray: ...

    def predict_cells(self, ctrl_cells: np.ndarray, cell_type: str, perturbation: str) -> np.ndarray: ...

    def explain(self) -> str: ...


# --- training data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrainTable:
    """The training entries of a profile AnnData, one per (cell type, gene set).

    ``delta`` is ``(N, G)`` float32; labels are canonical (``"A+B"``, sorted), so ``"B+A"`` finds ``"A+B"``.
    """

    genes: tuple[str, ...]
    cell_types: tuple[str, ...]  # every cell type with a control or a training row, sorted
    entry_ct: np.ndarray  # (N,) str
    entry_genes: tuple[tuple[str, ...], ...]  # (N,)
    delta: np.ndarray  # (N, G) float32
    index: dict[Key, int]
    by_ct: dict[str, np.ndarray]  # cell type -> entry rows
    n_requested: int  # distinct non-control train pairs asked for
    n_absent: int  # of those, how many had no row in the profiles

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def label(self, i: int) -> str:
        return format_perturbation(self.entry_genes[i])


def _train_table(
    profiles: AnnData,
    train_pairs: Iterable[tuple[str, str]],
    *,
    pert_col: str,
    cell_type_col: str,
    control_label: str,
) -> _TrainTable:
    for col in (pert_col, cell_type_col):
        if col not in profiles.obs.columns:
            msg = f"column {col!r} not in profiles.obs; available columns: {list(profiles.obs.columns)}"
            raise ValueError(msg)
    if "delta" not in profiles.layers:
        msg = "profiles have no layers['delta']; build them with model.data.profiles.compute_profiles"
        raise ValueError(msg)
    cts = profiles.obs[cell_type_col].astype(str).to_numpy()
    perts = profiles.obs[pert_col].astype(str).to_numpy()
    if "is_control" in profiles.obs.columns:
        is_control = profiles.obs["is_control"].to_numpy(bool) | (perts == control_label)
    else:
        is_control = perts == control_label

    # Canonical gene sets on both sides, so that "B+A" in the split matches "A+B" in the profiles.
    wanted: set[Key] = set()
    for ct, pert in train_pairs:
        genes = parse_perturbation(str(pert), control_label=control_label)
        if genes:
            wanted.add((str(ct), genes))
    if not wanted:
        msg = "train_pairs holds no (cell type, perturbation) pair other than controls; nothing to fit on"
        raise ValueError(msg)

    rows_of: dict[Key, list[int]] = {}
    for i in np.flatnonzero(~is_control):
        key = (cts[i], parse_perturbation(perts[i], control_label=control_label))
        if key in wanted:
            rows_of.setdefault(key, []).append(int(i))
    if not rows_of:
        examples = sorted(wanted)[:3]
        msg = (
            f"none of the {len(wanted)} train pairs (e.g. {examples}) has a row in the profiles; check "
            f"pert_col={pert_col!r}, cell_type_col={cell_type_col!r} and control_label={control_label!r}"
        )
        raise ValueError(msg)
    n_absent = len(wanted) - len(rows_of)
    if n_absent:
        logger.info("%d of %d train pairs have no profile row (dropped groups?) and are ignored", n_absent, len(wanted))

    keys = sorted(rows_of)
    delta_all = profiles.layers["delta"]
    delta = np.empty((len(keys), profiles.n_vars), dtype=np.float32)
    for j, key in enumerate(keys):
        # Two labels of one gene set ("A+B", "B+A") are one entry: their mean.
        block = delta_all[rows_of[key]]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        delta[j] = block.astype(np.float64).mean(axis=0)
    if not np.isfinite(delta).all():
        msg = "profiles.layers['delta'] holds NaN or inf in training rows"
        raise ValueError(msg)
    entry_ct = np.array([k[0] for k in keys], dtype=str)
    cell_types = tuple(sorted(set(cts[is_control]) | set(entry_ct)))
    return _TrainTable(
        genes=tuple(str(g) for g in profiles.var_names),
        cell_types=cell_types,
        entry_ct=entry_ct,
        entry_genes=tuple(k[1] for k in keys),
        delta=delta,
        index={k: j for j, k in enumerate(keys)},
        by_ct={ct: np.flatnonzero(entry_ct == ct) for ct in cell_types},
        n_requested=len(wanted),
        n_absent=n_absent,
    )


# --- ridge with leave-one-out penalty ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _RidgeFit:
    """``y = my + prior * (x - mx) + ((x - mx) @ basis) @ coef``, stored in the SVD basis of the inputs.

    ``basis`` is ``(k, r)`` and ``coef`` ``(r, G)``: for a ``G -> G`` map from a few hundred samples this is a
    few MB instead of a ``G x G`` matrix.
    """

    mx: np.ndarray  # (k,)
    my: np.ndarray  # (G,)
    basis: np.ndarray  # (k, r)
    coef: np.ndarray  # (r, G)
    prior: float  # weight of the identity prior (0: ordinary ridge)
    alpha: float  # absolute penalty
    alpha_rel: float  # penalty as a multiple of the mean squared singular value
    loo_mse: float  # leave-one-out mean squared error per entry at the chosen penalty
    n: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``(m, k)`` inputs -> ``(m, G)`` float32 predictions."""
        xc = np.asarray(x, dtype=np.float64) - self.mx  # (m, k)
        out = self.my + (xc @ self.basis) @ self.coef  # (m, G)
        if self.prior:
            out = out + self.prior * xc
        return out.astype(np.float32)

    def summary(self) -> dict[str, float]:
        return {"alpha": self.alpha_rel, "prior": self.prior, "loo_mse": self.loo_mse, "n": self.n}


def _thin_svd(xc: np.ndarray, *, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``u (n, r), s (r,), vt (r, k)`` of ``xc`` ``(n, k)``, keeping singular values above ``rtol * s_max``.

    Through the eigendecomposition of the smaller Gram matrix: for the wide matrices of a ``G -> G`` map (a few
    hundred perturbations x 2000 genes) this is tens of times faster than LAPACK's SVD. Squaring loses the
    directions below ``rtol * s_max``, which every penalty of the grid shrinks to nothing anyway.
    """
    n, k = xc.shape
    gram = xc @ xc.T if n <= k else xc.T @ xc  # (m, m), m = min(n, k)
    evals, evecs = np.linalg.eigh(gram)  # ascending
    keep = evals > max(float(evals[-1]), 0.0) * rtol**2
    s = np.sqrt(evals[keep])[::-1]  # (r,) descending
    vecs = evecs[:, keep][:, ::-1]  # (m, r)
    if n <= k:
        return vecs, s, (vecs.T @ xc) / s[:, None]
    return (xc @ vecs) / s, s, vecs.T


def _fit_ridge(
    x: np.ndarray,
    y: np.ndarray,
    *,
    alphas: Sequence[float],
    prior: Literal["zero", "identity", "auto"] = "zero",
) -> _RidgeFit:
    """Ridge ``y ~ x`` with an unpenalised intercept; penalty (and prior weight) by exact leave-one-out.

    Parameters
    ----------
    x
        ``(n, k)`` inputs.
    y
        ``(n, G)`` targets.
    alphas
        Candidate penalties, as multiples of the mean squared singular value of the centred ``x``.
    prior
        What the coefficients shrink towards: ``"zero"`` (ordinary ridge), ``"identity"`` (``y ~ x + ...``; needs
        ``k == G``) or ``"auto"``: ``c * identity`` with ``c >= 0`` chosen with the penalty by leave-one-out.

    Returns
    -------
    _RidgeFit
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    assert y.shape[0] == n, f"x has {n} rows, y has {y.shape[0]}"
    assert n >= 2, f"a ridge fit needs at least 2 samples, got {n}"
    if prior != "zero":
        assert x.shape[1] == y.shape[1], f"an identity prior needs k == G, got {x.shape[1]} and {y.shape[1]}"
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    u, s, vt = _thin_svd(xc)  # u (n, r), s (r,), vt (r, k)
    if s.size == 0:
        # Identical inputs: nothing to regress on; the intercept is the fit.
        return _RidgeFit(mx, my, vt.T, np.zeros((0, y.shape[1])), 0.0, np.inf, np.inf, float("nan"), n)
    scale = float(np.mean(s**2))
    uty = u.T @ yc  # (r, G)

    # Leave-one-out residuals are ry_i = R_i + (u d1 uty)_i with d1 = 1 - shrink and R = yc - u uty the part of
    # y no penalty can fit. Their squared norms need only (n, r) and (r, r) products per penalty, never (n, G),
    # and small residuals are computed as sums of small terms (no cancellation when the fit is nearly exact).
    resid = yc - u @ uty  # (n, G)
    r_norm = np.einsum("ij,ij->i", resid, resid)  # (n,)
    r_uty = resid @ uty.T  # (n, r)
    m_uty = uty @ uty.T  # (r, r)
    if prior != "zero":
        # x's residuals rx = u d2 vt (d2 = s d1) have no part outside u, because xc = u s vt.
        r_vt = resid @ vt.T  # (n, r)
        m_cross = uty @ vt.T  # (r, r)

    best: tuple[float, float, float] | None = None  # (loo, alpha_rel, prior weight)
    for a_rel in alphas:
        a = a_rel * scale
        shrink = s**2 / (s**2 + a)  # (r,)
        # Leverage of the full fit; the 1/n is the intercept's, which centring fitted.
        h = (u**2) @ shrink + 1.0 / n  # (n,)
        inv2 = 1.0 / np.maximum(1.0 - h, 1e-6) ** 2  # (n,)
        ud1 = u * (1.0 - shrink)  # (n, r)
        ry2 = r_norm + 2.0 * np.einsum("ij,ij->i", ud1, r_uty) + np.einsum("ij,ij->i", ud1 @ m_uty, ud1)  # (n,)
        ry2 = np.maximum(ry2, 0.0)
        if prior == "zero":
            c, sse = 0.0, float(inv2 @ ry2)
        else:
            ud2 = ud1 * s  # (n, r)
            rxy = np.einsum("ij,ij->i", ud2, r_vt) + np.einsum("ij,ij->i", ud1 @ m_cross, ud2)  # (n,)
            rx2 = np.einsum("ij,ij->i", ud2, ud2)  # (n,)
            b, cc = float(inv2 @ rxy), float(inv2 @ rx2)
            # Fitting y - c x has residuals ry - c rx: the leave-one-out error is quadratic in c, so minimise it
            # in closed form (c >= 0) or fix c = 1.
            c = 1.0 if prior == "identity" else max(b / max(cc, 1e-300), 0.0)
            sse = max(float(inv2 @ ry2) - 2.0 * c * b + c * c * cc, 0.0)
        loo = sse / (n * y.shape[1])
        if best is None or loo < best[0]:
            best = (loo, float(a_rel), c)
    assert best is not None, "alphas must not be empty"
    loo, a_rel, c = best
    a = a_rel * scale
    utz = uty - c * (s[:, None] * vt) if c else uty  # (r, G): u.T @ (yc - c xc)
    coef = (s / (s**2 + a))[:, None] * utz  # (r, G)
    return _RidgeFit(mx, my, vt.T.copy(), coef, c, a, a_rel, loo, n)


# --- the shared machinery -----------------------------------------------------------------------------------


class _BaselineBase:
    """Fitting, validation, bookkeeping and ``predict_cells``; subclasses implement ``_fit`` and ``_predict_one``."""

    name: ClassVar[str] = "base"
    needs_embeddings: ClassVar[bool] = False

    def __init__(self) -> None:
        self._table: _TrainTable | None = None
        self._embeddings: GeneEmbeddings | None = None
        self._control_label = DEFAULT_CONTROL_LABEL
        self._ct_mean: dict[str, np.ndarray] = {}
        self._all_mean: np.ndarray | None = None
        self.last_info: list[PredictionInfo] = []
        self.method_counts: Counter[str] = Counter()
        self.fallback_counts: Counter[str] = Counter()
        self.fit_info: dict[str, Any] = {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, Any]:
        """The constructor's parameters, for reports."""
        return {}

    # --- fit ---

    def fit(
        self,
        profiles: AnnData,
        *,
        train_pairs: Iterable[tuple[str, str]],
        embeddings: GeneEmbeddings | None = None,
        pert_col: str = DEFAULT_PERT_COL,
        cell_type_col: str = DEFAULT_CELL_TYPE_COL,
        control_label: str = DEFAULT_CONTROL_LABEL,
    ) -> Self:
        """Fit on the training pairs of ``profiles``.

        Parameters
        ----------
        profiles
            Pseudobulk profiles (:func:`model.data.profiles.compute_profiles`): ``obs[cell_type_col]``,
            ``obs[pert_col]``, ``layers['delta']`` ``(N, G)``.
        train_pairs
            ``(cell type, perturbation)`` pairs to fit on, e.g. ``split.train``. Only these rows are read;
            pairs without a profile row are ignored (and counted in ``fit_info``).
        embeddings
            Gene embeddings; required by ``knn`` and ``ridge``, ignored by the others.
        pert_col, cell_type_col, control_label
            Column names and the control value of ``pert_col``.

        Returns
        -------
        self
        """
        if self.needs_embeddings and embeddings is None:
            msg = f"the {self.name!r} baseline needs gene embeddings: pass embeddings=GeneEmbeddings(...) to fit"
            raise ValueError(msg)
        table = _train_table(
            profiles, train_pairs, pert_col=pert_col, cell_type_col=cell_type_col, control_label=control_label
        )
        self._table = table
        self._embeddings = embeddings if self.needs_embeddings else None
        self._control_label = control_label
        self._ct_mean = {ct: table.delta[rows].mean(axis=0) for ct, rows in table.by_ct.items() if rows.size}
        self._all_mean = table.delta.mean(axis=0)
        self.last_info = []
        self.method_counts = Counter()
        self.fallback_counts = Counter()
        self.fit_info = {
            "n_train_entries": len(table.entry_genes),
            "n_train_pairs_absent": table.n_absent,
            "train_entries_per_cell_type": {ct: int(rows.size) for ct, rows in table.by_ct.items()},
        }
        self._fit()
        logger.info(
            "%s: fitted on %d training entries over %d cell types",
            self.name,
            len(table.entry_genes),
            len(table.cell_types),
        )
        return self

    def _fit(self) -> None:
        """Subclass hook, run at the end of :meth:`fit` (``self._table`` is set)."""

    # --- predict ---

    def predict_delta(self, cell_type: str, perturbations: Sequence[str]) -> np.ndarray:
        """Predicted deltas of ``perturbations`` in ``cell_type``.

        Parameters
        ----------
        cell_type
            A cell type of the profiles the baseline was fitted on.
        perturbations
            Labels such as ``"TP53"`` or ``"A+B"``; the control label predicts zero.

        Returns
        -------
        ``(n, G)`` float32. How each row was made is in :attr:`last_info`.
        """
        table = self._require_fit()
        if isinstance(perturbations, str):
            msg = f"perturbations must be a sequence of labels, got the string {perturbations!r}; wrap it in a list"
            raise TypeError(msg)
        cell_type = str(cell_type)
        if cell_type not in table.cell_types:
            msg = f"unknown cell type {cell_type!r}; the fitted profiles have {list(table.cell_types)}"
            raise ValueError(msg)
        labels = [str(p) for p in perturbations]
        genes = [parse_perturbation(p, control_label=self._control_label) for p in labels]
        out = np.zeros((len(labels), table.n_genes), dtype=np.float32)
        infos: list[PredictionInfo] = [None] * len(labels)  # type: ignore[list-item]
        todo = [i for i, g in enumerate(genes) if g]
        for i in set(range(len(labels))) - set(todo):
            infos[i] = PredictionInfo(cell_type, labels[i], "control_label")
        if todo:
            deltas, todo_infos = self._predict(cell_type, [labels[i] for i in todo], [genes[i] for i in todo])
            assert deltas.shape == (len(todo), table.n_genes), f"{deltas.shape} != {(len(todo), table.n_genes)}"
            out[todo] = deltas
            for i, info in zip(todo, todo_infos, strict=True):
                infos[i] = info
        for info in infos:
            self.method_counts[info.method] += 1
            self.fallback_counts.update(info.fallbacks)
        self.last_info = infos
        return out

    def _predict(
        self, cell_type: str, labels: list[str], genes: list[tuple[str, ...]]
    ) -> tuple[np.ndarray, list[PredictionInfo]]:
        """``(n, G)`` deltas and infos for non-control queries; the default loops over :meth:`_predict_one`."""
        rows, infos = [], []
        for label, g in zip(labels, genes, strict=True):
            delta, info = self._predict_one(cell_type, label, g)
            rows.append(delta)
            infos.append(info)
        return np.stack(rows).astype(np.float32, copy=False), infos

    def _predict_one(self, cell_type: str, label: str, genes: tuple[str, ...]) -> tuple[np.ndarray, PredictionInfo]:
        raise NotImplementedError

    def predict_cells(self, ctrl_cells: np.ndarray, cell_type: str, perturbation: str) -> np.ndarray:
        """Predicted cells: control cells of ``cell_type`` shifted by the predicted delta.

        Parameters
        ----------
        ctrl_cells
            ``(S, G)`` control cells of ``cell_type``, on the scale of the profiles (e.g. log-normalised).
        perturbation
            One label.

        Returns
        -------
        ``(S, G)`` float32 ``ctrl_cells + delta``. :attr:`last_info` holds the one prediction's info.
        """
        table = self._require_fit()
        ctrl = np.asarray(ctrl_cells, dtype=np.float32)
        if ctrl.ndim != 2 or ctrl.shape[1] != table.n_genes:
            msg = f"ctrl_cells must be (S, {table.n_genes}) control cells, got shape {ctrl.shape}"
            raise ValueError(msg)
        return ctrl + self.predict_delta(cell_type, [perturbation])[0]

    # --- reporting ---

    def explain(self) -> str:
        """One paragraph: predictions since fit, by method, and every fallback taken."""
        n = sum(self.method_counts.values())
        methods = ", ".join(f"{m} {c}" for m, c in sorted(self.method_counts.items())) or "none"
        falls = ", ".join(f"{f} {c}" for f, c in sorted(self.fallback_counts.items())) or "none"
        return f"{self.name}: {n} predictions since fit; methods: {methods}; fallbacks: {falls}"

    # --- helpers for subclasses ---

    def _require_fit(self) -> _TrainTable:
        if self._table is None:
            msg = f"the {self.name!r} baseline is not fitted; call fit(profiles, train_pairs=...) first"
            raise RuntimeError(msg)
        return self._table

    def _train_mean(self, cell_type: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """The target's training mean delta, or the mean over all training entries when it has none."""
        mean = self._ct_mean.get(cell_type)
        if mean is not None:
            return mean, ()
        assert self._all_mean is not None
        return self._all_mean, (FB_TRAIN_MEAN_ALL,)


class _EmbeddingMixin:
    """Keys of training entries and queries from gene embeddings, and the missing-embedding policy."""

    on_missing_embedding: MissingPolicy
    _embeddings: GeneEmbeddings | None
    _table: _TrainTable | None
    fit_info: dict[str, Any]
    name: ClassVar[str]

    def _fit_keys(self) -> None:
        assert self._table is not None and self._embeddings is not None
        keys, ok = self._embeddings.perturbation_vectors(list(self._table.entry_genes))
        self._keys = keys  # (N, d) unit rows; zero where not ok
        self._has_key = ok  # (N,)
        self.fit_info["n_train_without_embedding"] = int((~ok).sum())
        if not ok.all():
            bad = [self._table.label(i) for i in np.flatnonzero(~ok)[:10]]
            logger.info(
                "%s: %d training entries have genes without an embedding and are not used (e.g. %s)",
                self.name,
                int((~ok).sum()),
                bad,
            )

    def _query_keys(self, labels: list[str], genes: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """``(n, d)`` unit keys and ``(n,)`` ok; raises naming the perturbation when the policy says so."""
        assert self._embeddings is not None
        keys, ok = self._embeddings.perturbation_vectors(genes)
        if self.on_missing_embedding == "raise" and not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            missing = [g for g in genes[i] if g not in self._embeddings]
            msg = (
                f"unknown perturbation {labels[i]!r}: gene(s) {missing} have no embedding in "
                f"{self._embeddings.source!r}; the {self.name!r} baseline cannot place it "
                "(on_missing_embedding='train_mean' falls back to the training mean instead)"
            )
            raise ValueError(msg)
        return keys, ok


def _check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in alphas)
    if not out or not all(np.isfinite(a) and a > 0 for a in out):
        msg = f"alphas must be a non-empty sequence of positive numbers, got {alphas!r}"
        raise ValueError(msg)
    return out


def _check_policy(policy: str) -> MissingPolicy:
    if policy not in ("train_mean", "raise"):
        msg = f"on_missing_embedding must be 'train_mean' or 'raise', got {policy!r}"
        raise ValueError(msg)
    return policy  # type: ignore[return-value]


# --- the baselines ------------------------------------------------------------------------------------------


class ControlBaseline(_BaselineBase):
    """Zero delta: predicted cells are the control cells."""

    name = "control"

    def _predict(
        self, cell_type: str, labels: list[str], genes: list[tuple[str, ...]]
    ) -> tuple[np.ndarray, list[PredictionInfo]]:
        table = self._require_fit()
        infos = [PredictionInfo(cell_type, label, "zero") for label in labels]
        return np.zeros((len(labels), table.n_genes), dtype=np.float32), infos


class TrainMeanBaseline(_BaselineBase):
    """Mean delta of the training perturbations in the target cell type.

    Every perturbation gets the same prediction. A cell type with no training perturbation (zero-shot) gets the
    mean over all training entries of all cell types (fallback ``train_mean_all_cell_types``).
    """

    name = "train_mean"

    def _predict_one(self, cell_type: str, label: str, genes: tuple[str, ...]) -> tuple[np.ndarray, PredictionInfo]:
        mean, fallbacks = self._train_mean(cell_type)
        return mean, PredictionInfo(cell_type, label, "train_mean", fallbacks)


class KNNBaseline(_EmbeddingMixin, _BaselineBase):
    """Average delta of the ``k`` nearest training entries by cosine of perturbation embeddings.

    Candidates are the training entries whose genes all have an embedding, keyed like PT-RAG's stage-1
    retrieval (the L2-normalised sum of the genes' vectors). The query's own (cell type, perturbation) entry is
    never a candidate. Candidates in the target cell type are ranked first (by cosine, then entry order on ties);
    when it has fewer than ``k``, the rest come from other cell types, ranked by cosine (fallback
    ``knn_filled_from_other_cell_types``, visible per prediction in ``details['n_other_cell_types']``).

    Parameters
    ----------
    k
        Number of neighbours.
    weighted
        Weight neighbours by their cosine (clipped at 0; uniform if all weights are 0) instead of equally.
    on_missing_embedding
        A query gene without an embedding: ``"train_mean"`` (fallback ``missing_embedding``) or ``"raise"``.
    """

    name = "knn"
    needs_embeddings = True

    def __init__(self, *, k: int = 8, weighted: bool = False, on_missing_embedding: MissingPolicy = "train_mean"):
        super().__init__()
        if int(k) < 1:
            msg = f"k must be >= 1, got {k}"
            raise ValueError(msg)
        self.k = int(k)
        self.weighted = bool(weighted)
        self.on_missing_embedding = _check_policy(on_missing_embedding)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "weighted": self.weighted, "on_missing_embedding": self.on_missing_embedding}

    def _fit(self) -> None:
        self._fit_keys()

    def _predict(
        self, cell_type: str, labels: list[str], genes: list[tuple[str, ...]]
    ) -> tuple[np.ndarray, list[PredictionInfo]]:
        table = self._require_fit()
        qkeys, qok = self._query_keys(labels, genes)
        cos = qkeys @ self._keys.T  # (n, N)
        other_ct = (table.entry_ct != cell_type).astype(np.int8)  # (N,) 0 ranks first
        order_ix = np.arange(len(table.entry_genes))
        out = np.empty((len(labels), table.n_genes), dtype=np.float32)
        infos = []
        for i, (label, g) in enumerate(zip(labels, genes, strict=True)):
            if not qok[i] or not self._has_key.any():
                mean, fallbacks = self._train_mean(cell_type)
                reason = FB_MISSING_EMBEDDING if not qok[i] else FB_NO_CANDIDATES
                out[i] = mean
                infos.append(PredictionInfo(cell_type, label, "train_mean", (reason, *fallbacks)))
                continue
            usable = self._has_key.copy()
            own = table.index.get((cell_type, g))
            if own is not None:
                usable[own] = False
            cand = np.flatnonzero(usable)
            # lexsort: last key is primary -> target cell type first, then cosine descending, then entry order.
            ranked = cand[np.lexsort((order_ix[cand], -cos[i, cand], other_ct[cand]))][: self.k]
            if ranked.size == 0:
                mean, fallbacks = self._train_mean(cell_type)
                out[i] = mean
                infos.append(PredictionInfo(cell_type, label, "train_mean", (FB_NO_CANDIDATES, *fallbacks)))
                continue
            sims = cos[i, ranked].astype(np.float64)
            if self.weighted and np.clip(sims, 0.0, None).sum() > 0:
                w = np.clip(sims, 0.0, None)
                w /= w.sum()
            else:
                w = np.full(ranked.size, 1.0 / ranked.size)
            out[i] = w @ table.delta[ranked].astype(np.float64)
            n_other = int(other_ct[ranked].sum())
            fallbacks = (FB_KNN_OTHER_CELL_TYPES,) if n_other else ()
            neighbours = [
                (str(table.entry_ct[j]), table.label(j), float(s), float(wj))
                for j, s, wj in zip(ranked, sims, w, strict=True)
            ]
            details = {"neighbours": neighbours, "n_other_cell_types": n_other}
            infos.append(PredictionInfo(cell_type, label, "knn", fallbacks, details))
        return out, infos


class RidgeBaseline(_EmbeddingMixin, _BaselineBase):
    """GenePert: per cell type, ridge regression from the perturbation embedding to the delta.

    The input is the perturbation's key (L2-normalised sum of its genes' embeddings), the output its ``(G,)``
    delta, with an unpenalised intercept (so a heavy penalty predicts the cell type's training mean). Each cell
    type's model is fitted on its own training entries that have an embedding, with the penalty chosen from
    ``alphas`` by exact leave-one-out error. A cell type with fewer than ``min_train`` such entries uses one model
    fitted on all cell types pooled (fallback ``ridge_pooled``). Models are fitted on first use and cached.

    Parameters
    ----------
    alphas
        Penalty grid, as multiples of the mean squared singular value of the centred keys.
    min_train
        Fewest training entries for a cell type's own model.
    on_missing_embedding
        A query gene without an embedding: ``"train_mean"`` (fallback ``missing_embedding``) or ``"raise"``.
    """

    name = "ridge"
    needs_embeddings = True

    def __init__(
        self,
        *,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        min_train: int = 5,
        on_missing_embedding: MissingPolicy = "train_mean",
    ):
        super().__init__()
        if int(min_train) < 3:
            msg = f"min_train must be >= 3 (leave-one-out needs it), got {min_train}"
            raise ValueError(msg)
        self.alphas = _check_alphas(alphas)
        self.min_train = int(min_train)
        self.on_missing_embedding = _check_policy(on_missing_embedding)
        self._models: dict[str | None, _RidgeFit | None] = {}

    def params(self) -> dict[str, Any]:
        return {"alphas": self.alphas, "min_train": self.min_train, "on_missing_embedding": self.on_missing_embedding}

    def _fit(self) -> None:
        self._fit_keys()
        self._models = {}

    def _model(self, cell_type: str | None) -> _RidgeFit | None:
        """The cell type's model (``None``: the pooled one); ``None`` when there is too little to fit."""
        if cell_type not in self._models:
            table = self._require_fit()
            rows = np.flatnonzero(self._has_key) if cell_type is None else table.by_ct[cell_type]
            rows = rows[self._has_key[rows]]
            model = None
            if rows.size >= (3 if cell_type is None else self.min_train):
                model = _fit_ridge(self._keys[rows], table.delta[rows], alphas=self.alphas)
                logger.info("ridge %s: %d entries, alpha %g", cell_type or "pooled", rows.size, model.alpha_rel)
            self._models[cell_type] = model
        return self._models[cell_type]

    def _predict(
        self, cell_type: str, labels: list[str], genes: list[tuple[str, ...]]
    ) -> tuple[np.ndarray, list[PredictionInfo]]:
        table = self._require_fit()
        qkeys, qok = self._query_keys(labels, genes)
        model, fallbacks = self._model(cell_type), ()
        if model is None:
            model, fallbacks = self._model(None), (FB_RIDGE_POOLED,)
        out = np.empty((len(labels), table.n_genes), dtype=np.float32)
        if model is not None and qok.any():
            out[qok] = model.predict(qkeys[qok])
        infos = []
        for i, label in enumerate(labels):
            if model is None or not qok[i]:
                mean, mean_fb = self._train_mean(cell_type)
                out[i] = mean
                reason = FB_MISSING_EMBEDDING if not qok[i] else FB_NO_CANDIDATES
                infos.append(PredictionInfo(cell_type, label, "train_mean", (reason, *mean_fb)))
            else:
                method = "ridge_pooled" if fallbacks else "ridge"
                infos.append(PredictionInfo(cell_type, label, method, fallbacks, model.summary()))
        return out, infos


class AdditiveBaseline(_BaselineBase):
    """Sum of single-gene training deltas: ``delta(A+B) = delta(A) + delta(B)``.

    Each gene's term is its single-gene training delta in the target cell type. A gene with none there
    contributes the mean of its single-gene training deltas in the other cell types (fallback
    ``additive_gene_from_other_cell_types``), or 0 when no cell type has it in training (``additive_gene_zero``);
    both are counted once per gene. A single gene is its own term, so a single seen in training in the target
    predicts its training delta. A combination's own training delta, if any, is never used.
    """

    name = "additive"

    def _fit(self) -> None:
        table = self._require_fit()
        self._single: dict[tuple[str, str], int] = {
            (str(table.entry_ct[i]), g[0]): i for i, g in enumerate(table.entry_genes) if len(g) == 1
        }

    def _predict_one(self, cell_type: str, label: str, genes: tuple[str, ...]) -> tuple[np.ndarray, PredictionInfo]:
        table = self._require_fit()
        total = np.zeros(table.n_genes, dtype=np.float64)
        sources: dict[str, str] = {}
        fallbacks: list[str] = []
        for g in genes:
            row = self._single.get((cell_type, g))
            if row is not None:
                total += table.delta[row]
                sources[g] = "target"
                continue
            others = [self._single[(ct, g)] for ct in table.cell_types if ct != cell_type and (ct, g) in self._single]
            if others:
                total += table.delta[others].astype(np.float64).mean(axis=0)
                sources[g] = "other_cell_types:" + ",".join(str(table.entry_ct[r]) for r in others)
                fallbacks.append(FB_ADDITIVE_OTHER)
            else:
                sources[g] = "zero"
                fallbacks.append(FB_ADDITIVE_ZERO)
        return total.astype(np.float32), PredictionInfo(
            cell_type, label, "additive", tuple(fallbacks), {"gene_sources": sources}
        )


class TransferBaseline(_BaselineBase):
    """The perturbation's delta in other cell types, mapped into the target cell type.

    For each source cell type ``s`` a ridge map ``G -> G`` from ``s``'s deltas to the target's is fitted on the
    perturbations both have in training (at least ``min_shared``). The map shrinks towards ``c * identity``
    rather than towards zero (``prior="auto"``, ``c >= 0`` chosen with the penalty by exact leave-one-out):
    under a heavy penalty it is the plain transfer ``c * delta_s + offset``, so a knockdown's effect on its own
    target gene, which no map can learn from other perturbations, is carried over; with enough shared
    perturbations it learns how the cell types' responses differ. The prediction averages the mapped deltas
    of every source that has the perturbation in training and a map, weighted by inverse leave-one-out error
    (``source_weights="inverse_loo"``) or equally.

    One map per source, not one map from the mean of the sources: the sources that have a perturbation vary
    from perturbation to perturbation, so a mean of sources would be a differently composed input each time,
    while a per-source map is fitted and applied to the same kind of input, and each source's reliability is
    measured and used in the weights.

    Fallbacks: sources with a perturbation but too few shared perturbations for a map are used only when no
    source has a map, as the plain average of their deltas (``transfer_plain_average``); a perturbation that
    no other cell type has in training gets the target's training mean (``transfer_no_source``). A query that is
    itself a training pair of the target was among the samples its maps were fitted on (held-out pairs never are).

    Parameters
    ----------
    alphas
        Penalty grid, as multiples of the mean squared singular value of the centred source deltas.
    min_shared
        Fewest shared training perturbations to fit a map between two cell types.
    prior
        ``"auto"``, ``"identity"`` (``c = 1``) or ``"zero"`` (ordinary ridge).
    source_weights
        ``"inverse_loo"`` or ``"uniform"``.
    """

    name = "transfer"

    def __init__(
        self,
        *,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        min_shared: int = 20,
        prior: Literal["auto", "identity", "zero"] = "auto",
        source_weights: Literal["inverse_loo", "uniform"] = "inverse_loo",
    ):
        super().__init__()
        if int(min_shared) < 3:
            msg = f"min_shared must be >= 3 (leave-one-out needs it), got {min_shared}"
            raise ValueError(msg)
        if prior not in ("auto", "identity", "zero"):
            msg = f"prior must be 'auto', 'identity' or 'zero', got {prior!r}"
            raise ValueError(msg)
        if source_weights not in ("inverse_loo", "uniform"):
            msg = f"source_weights must be 'inverse_loo' or 'uniform', got {source_weights!r}"
            raise ValueError(msg)
        self.alphas = _check_alphas(alphas)
        self.min_shared = int(min_shared)
        self.prior = prior
        self.source_weights = source_weights
        self._maps: dict[tuple[str, str], _RidgeFit | None] = {}

    def params(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas,
            "min_shared": self.min_shared,
            "prior": self.prior,
            "source_weights": self.source_weights,
        }

    def _fit(self) -> None:
        self._maps = {}

    def _map(self, source: str, target: str) -> _RidgeFit | None:
        """The ``source -> target`` map, fitted on first use; ``None`` when they share too few perturbations."""
        if (source, target) not in self._maps:
            table = self._require_fit()
            src_rows, tgt_rows = [], []
            for j in table.by_ct[target]:
                i = table.index.get((source, table.entry_genes[j]))
                if i is not None:
                    src_rows.append(i)
                    tgt_rows.append(j)
            fit = None
            if len(src_rows) >= self.min_shared:
                fit = _fit_ridge(table.delta[src_rows], table.delta[tgt_rows], alphas=self.alphas, prior=self.prior)
                logger.info(
                    "transfer %s -> %s: %d shared, alpha %g, prior %.3g, loo mse %.4g",
                    source,
                    target,
                    len(src_rows),
                    fit.alpha_rel,
                    fit.prior,
                    fit.loo_mse,
                )
            self._maps[(source, target)] = fit
        return self._maps[(source, target)]

    def _predict_one(self, cell_type: str, label: str, genes: tuple[str, ...]) -> tuple[np.ndarray, PredictionInfo]:
        table = self._require_fit()
        sources = [ct for ct in table.cell_types if ct != cell_type and (ct, genes) in table.index]
        if not sources:
            mean, fallbacks = self._train_mean(cell_type)
            return mean, PredictionInfo(cell_type, label, "train_mean", (FB_TRANSFER_NO_SOURCE, *fallbacks))
        rows = {s: table.index[(s, genes)] for s in sources}
        maps = {s: self._map(s, cell_type) for s in sources}
        mapped = [s for s in sources if maps[s] is not None]
        if not mapped:
            delta = table.delta[[rows[s] for s in sources]].astype(np.float64).mean(axis=0)
            details = {"sources": sources}
            return delta.astype(np.float32), PredictionInfo(
                cell_type, label, "plain_average", (FB_TRANSFER_PLAIN,), details
            )
        preds = np.stack([maps[s].predict(table.delta[rows[s]][None])[0] for s in mapped])  # (n_src, G)
        loo = np.array([maps[s].loo_mse for s in mapped])
        if self.source_weights == "inverse_loo" and np.all(np.isfinite(loo)) and np.all(loo > 0):
            w = (1.0 / loo) / (1.0 / loo).sum()
        else:
            w = np.full(len(mapped), 1.0 / len(mapped))
        details = {
            "sources": mapped,
            "weights": [float(x) for x in w],
            "maps": {s: maps[s].summary() for s in mapped},
            "unmapped_sources": [s for s in sources if s not in mapped],
        }
        return (w @ preds).astype(np.float32), PredictionInfo(cell_type, label, "ridge_map", (), details)


# --- factory ------------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[_BaselineBase]] = {
    "control": ControlBaseline,
    "train_mean": TrainMeanBaseline,
    "knn": KNNBaseline,
    "ridge": RidgeBaseline,
    "additive": AdditiveBaseline,
    "transfer": TransferBaseline,
}
assert tuple(_CLASSES) == BASELINES


def make_baseline(name: str, **params: Any) -> _BaselineBase:
    """A new, unfitted baseline by name (one of :data:`BASELINES`) with its keyword parameters.

    >>> make_baseline("knn", k=4)
    KNNBaseline(k=4, weighted=False, on_missing_embedding='train_mean')
    """
    cls = _CLASSES.get(name)
    if cls is None:
        msg = f"unknown baseline {name!r}; choose one of {BASELINES}"
        raise ValueError(msg)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        msg = f"baseline {name!r} takes no parameter(s) {unknown}; it accepts {accepted or 'none'}"
        raise ValueError(msg)
    return cls(**params)
