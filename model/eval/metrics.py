"""The evaluation metric panel: one (cell type, perturbation) group at a time, on log-normalised expression.

Scoring is split in two so a benchmark can score many models against the same group cheaply:

1. :func:`observe` does everything that depends only on the observed data (means, deltas, the observed DE test and
   its ranking, the projected and subsampled observed cells, the row of the true perturbation in the cell type's
   reference) once per group and returns an :class:`ObservedGroup`;
2. :func:`score` compares one model's predicted cells with it and returns ``{metric name: float}``, the names and
   directions being those of :data:`METRICS`.

Two kinds of control cells enter. ``ctrl_input`` are the control cells the model perturbed, so the predicted delta
is ``pred.mean(0) - ctrl_input.mean(0)``; ``ctrl_eval`` is a disjoint half of the cell type's control cells that no
model saw, and the observed delta is ``observed.mean(0) - ctrl_eval.mean(0)``. With one shared control mean, its
noise would sit in both deltas and inflate their correlation even for a prediction without any signal (the
control-noise trap); :func:`control_halves` draws the two halves. The positive control (:func:`split_half_ceiling`)
predicts one half of the observed cells with the other.

Metric definitions (G genes; "target genes" are the perturbed genes present in the gene panel):

==============================  ==================================================================================
``pearson_delta``               Pearson r of the predicted and observed delta over all genes.
``pearson_delta_top20``         The same over the observed top-20 DE genes (below).
``pearson_delta_systema``       Systema: r of ``pred.mean - c`` and ``observed.mean - c``, with c the perturbed
                                centroid of the cell type (:attr:`CellTypeReference.perturbed_centroid`).
``pearson_delta_systema_top20`` The same over the observed top-20 DE genes.
``mse_mean``, ``mae_mean``      Mean squared / absolute error of the predicted vs observed mean expression.
``mse_top20``                   MSE of the means over the observed top-20 DE genes.
``discrimination``              ``1 - rank / N``: L1 distance from the predicted mean to each of the N rows of the
                                reference, target-gene columns left out; rank = number of other rows strictly
                                closer than the true perturbation's row. 1 = best, 1/N = worst.
``centroid_accuracy``           1.0 if no other row is strictly closer (Euclidean, target genes left out) to the
                                predicted mean than the true row, else 0.0.
``de_overlap_{20,50,100}``      ``|top-N predicted DE ∩ top-N observed DE| / N``, N clipped to the number of
                                non-target genes.
``de_direction``                Among the observed significant genes: fraction with sign(predicted delta) ==
                                sign(observed delta) (a zero predicted delta counts as wrong); NaN if none.
``n_de_observed``               Number of observed significant genes (descriptive).
``w1_pca``                      Mean over PCs of the 1-D Wasserstein-1 distance (scipy) of predicted vs observed
                                cells.
``w2_pca``                      2-Wasserstein distance in PC space (see :func:`wasserstein2`).
``mmd_pca``                     Biased (V-statistic) MMD^2, Gaussian kernel, median-heuristic bandwidth (see
                                :func:`mmd_rbf`).
``energy_pca``                  Energy distance, V-statistic (see :func:`energy_distance`).
``pred_shift_l2``               L2 norm of the predicted delta (descriptive: the no-signal check).
``obs_shift_l2``                L2 norm of the observed delta (descriptive).
==============================  ==================================================================================

DE test: per gene, Welch's t-test (``scipy.stats.ttest_ind_from_stats(equal_var=False)``, identical to
``ttest_ind(equal_var=False)``) of the observed cells vs ``ctrl_eval`` (observed DE) or the predicted cells vs
``ctrl_input`` (predicted DE). A gene with zero variance in both sets (up to float rounding) gets t = 0, p = 1.
q-values by Benjamini-Hochberg over all G genes (``scipy.stats.false_discovery_control``); significant = q < fdr.
Genes are ranked by p-value, ties (p underflows to 0 for strong effects) by larger |t|, then by gene order. Every
DE-derived metric (top-20 genes, overlaps, direction, ``n_de_observed``) leaves the target genes out: knocking down
the targeted gene itself is trivial to predict and would otherwise head every ranking.

The four ``*_pca`` metrics compare the predicted and observed cells after projection with a :class:`PCABasis`
fitted on training cells (:func:`fit_pca`), each set subsampled to at most ``max_cells`` cells with the given rng.

A Pearson r over a vector that is constant (standard deviation at most 1e-6 x max(1, max |x|), i.e. constant up to
float32 rounding) or shorter than 2 is defined as 0.0: "no linear agreement", which is also what the zero-delta
(control) prediction scores on ``pearson_delta``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.stats

from model.data.matrices import cell_matrix

__all__ = [
    "METRICS",
    "CellTypeReference",
    "MetricSpec",
    "ObservedGroup",
    "PCABasis",
    "cell_type_reference",
    "control_halves",
    "energy_distance",
    "fit_pca",
    "mmd_rbf",
    "observe",
    "score",
    "split_half",
    "split_half_ceiling",
    "wasserstein2",
    "welch_ttest",
]

TOP_DE = 20  # genes in the *_top20 metrics
DE_OVERLAP_NS = (20, 50, 100)
# n * m up to which w2_pca is solved exactly (ot.emd2), Sinkhorn above: 2000 x 2000, the default max_cells cap.
# Measured on 2 busy cores, 50 PCs: exact 0.4 s at 1000 x 1000 and 1.8-2.2 s at 2000 x 2000; Sinkhorn (below)
# 2-5 s at either size and 1-2% high, so a lower limit (250,000 pairs was the first design) only costs accuracy.
W2_EXACT_MAX_PAIRS = 4_000_000
SINKHORN_REG = 0.02  # entropic regularisation, relative to the mean squared distance (the cost is divided by it)
_CONSTANT_RTOL = 1e-6  # a vector with std <= this x max(1, max|x|) counts as constant (Pearson r := 0)
_VAR_RTOL = 1e-12  # a gene whose Welch standard error is below this x max(1, |means|) has zero variance


# --- metric registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, whether higher is better (None: descriptive, no direction), and what it measures."""

    name: str
    higher_is_better: bool | None
    description: str


def _specs(*rows: tuple[str, bool | None, str]) -> dict[str, MetricSpec]:
    return {name: MetricSpec(name, direction, text) for name, direction, text in rows}


METRICS: dict[str, MetricSpec] = _specs(
    ("pearson_delta", True, "Pearson r of predicted vs observed delta (vs disjoint control halves), all genes"),
    ("pearson_delta_top20", True, "Pearson r of the deltas on the observed top-20 DE genes"),
    ("pearson_delta_systema", True, "Pearson r of the shifts from the perturbed centroid (Systema), all genes"),
    ("pearson_delta_systema_top20", True, "Pearson r of the shifts from the perturbed centroid, top-20 DE genes"),
    ("mse_mean", False, "MSE of predicted vs observed mean expression, all genes"),
    ("mae_mean", False, "MAE of predicted vs observed mean expression, all genes"),
    ("mse_top20", False, "MSE of the mean expression on the observed top-20 DE genes"),
    ("discrimination", True, "1 - rank/N of the true perturbation by L1 distance to the predicted mean"),
    ("centroid_accuracy", True, "1 if the true perturbation's mean is the nearest (L2) to the predicted mean"),
    ("de_overlap_20", True, "Overlap of the top-20 predicted and observed DE genes"),
    ("de_overlap_50", True, "Overlap of the top-50 predicted and observed DE genes"),
    ("de_overlap_100", True, "Overlap of the top-100 predicted and observed DE genes"),
    ("de_direction", True, "Fraction of observed significant DE genes whose predicted delta has the right sign"),
    ("n_de_observed", None, "Number of observed significant DE genes (BH q < fdr, target genes excluded)"),
    ("w1_pca", False, "Mean over PCs of the 1-D Wasserstein-1 distance, predicted vs observed cells"),
    ("w2_pca", False, "2-Wasserstein distance in PC space, predicted vs observed cells"),
    ("mmd_pca", False, "MMD^2 (Gaussian kernel, median-heuristic bandwidth) in PC space"),
    ("energy_pca", False, "Energy distance in PC space, predicted vs observed cells"),
    ("pred_shift_l2", None, "L2 norm of the predicted delta (how far the prediction moves from control)"),
    ("obs_shift_l2", None, "L2 norm of the observed delta"),
)


# --- input checks ------------------------------------------------------------------------------------------------


def _subsample(x: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_cells`` rows of x, drawn without replacement (in their original order)."""
    if max_cells < 2:
        msg = f"max_cells must be >= 2, got {max_cells}"
        raise ValueError(msg)
    if x.shape[0] <= max_cells:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=max_cells, replace=False))]


# --- PCA ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PCABasis:
    """A linear projection to principal components: ``(x - mean) @ components.T``.

    mean: (G,) float64; components: (n_comp, G) float64 orthonormal rows, sorted by decreasing variance, each with
    its largest-magnitude loading positive; explained_variance: (n_comp,) variance along each component.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.components.ndim != 2 or self.components.shape[1] != self.mean.shape[0]:
            msg = f"PCABasis needs mean (G,) and components (n_comp, G); got {self.mean.shape}, {self.components.shape}"
            raise ValueError(msg)

    @property
    def n_genes(self) -> int:
        return self.mean.shape[0]

    def transform(self, x: np.ndarray | sp.spmatrix) -> np.ndarray:
        """(n, G) dense or sparse -> (n, n_comp) float64."""
        if x.ndim != 2 or x.shape[1] != self.n_genes:
            msg = f"expected (n, {self.n_genes}) cells to project, got shape {x.shape}"
            raise ValueError(msg)
        if sp.issparse(x):  # keep it sparse: x @ C.T - mean @ C.T
            return np.asarray(x @ self.components.T) - self.mean @ self.components.T
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(
    cells: np.ndarray | sp.spmatrix,
    *,
    n_components: int = 50,
    max_cells: int = 20000,
    rng: np.random.Generator,
) -> PCABasis:
    """Principal components of (a subsample of) ``cells``, (n, G), dense or sparse: the caller passes TRAINING cells.

    At most ``max_cells`` rows are used (drawn with ``rng``). ``n_components`` is clipped to ``min(n - 1, G)``
    with a warning. Exact: an eigendecomposition of the G x G covariance when there are at least G cells, an SVD
    of the centred cells otherwise.
    """
    if cells.ndim != 2 or cells.shape[0] < 2:
        msg = f"fit_pca needs (n >= 2, G) cells, got shape {cells.shape}"
        raise ValueError(msg)
    if n_components < 1:
        msg = f"n_components must be >= 1, got {n_components}"
        raise ValueError(msg)
    n = cells.shape[0]
    rows = np.arange(n) if n <= max_cells else np.sort(rng.choice(n, size=max_cells, replace=False))
    x = cell_matrix(cells[rows], "cells", cells.shape[1], min_rows=2)  # (n', G)
    n, g = x.shape
    k = min(n_components, n - 1, g)
    if k < n_components:
        warnings.warn(f"fit_pca: {n} cells x {g} genes allow only {k} of {n_components} components", stacklevel=2)
    mean = x.mean(0)
    xc = x - mean  # (n, G)
    if n >= g:
        evals, evecs = scipy.linalg.eigh(xc.T @ xc, subset_by_index=[g - k, g - 1])  # top k only, ascending
        components, variance = evecs[:, ::-1].T, evals[::-1] / (n - 1)  # (k, G), (k,)
    else:
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        components, variance = vt[:k], s[:k] ** 2 / (n - 1)
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return PCABasis(mean=mean, components=np.ascontiguousarray(components), explained_variance=np.maximum(variance, 0))


# --- per-cell-type reference ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CellTypeReference:
    """The observed mean of every perturbation of one cell type (train and test), built once per cell type.

    genes: (G,) str; labels: (N,) str, unique; means: (N, G) float64; perturbed_centroid: (G,) mean of the rows
    (the Systema reference); index: label -> row.
    """

    genes: np.ndarray
    labels: np.ndarray
    means: np.ndarray
    perturbed_centroid: np.ndarray
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {str(lab): i for i, lab in enumerate(self.labels)})

    def row(self, label: str) -> int:
        try:
            return self.index[label]
        except KeyError:
            msg = f"perturbation {label!r} is not in the cell type's reference ({len(self.labels)} labels)"
            raise ValueError(msg) from None


def cell_type_reference(genes: Sequence[str], labels: Sequence[str], means: np.ndarray) -> CellTypeReference:
    """Build a :class:`CellTypeReference` from the (N, G) observed mean expression of the N perturbations.

    Pass perturbed groups only: the centroid is the plain mean of all N rows, and every row competes in
    ``discrimination``.
    """
    genes, labels = np.asarray(genes, dtype=str), np.asarray(labels, dtype=str)
    if genes.ndim != 1 or labels.ndim != 1 or len(labels) == 0:
        msg = f"genes and labels must be non-empty 1-D, got shapes {genes.shape} and {labels.shape}"
        raise ValueError(msg)
    means = cell_matrix(means, "means", len(genes))
    if means.shape[0] != len(labels):
        msg = f"means has {means.shape[0]} rows but there are {len(labels)} labels"
        raise ValueError(msg)
    if len(set(labels)) != len(labels):
        dup = sorted({str(x) for x in labels if (labels == x).sum() > 1})
        msg = f"labels must be unique; repeated: {dup[:10]}"
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        msg = "genes must be unique"
        raise ValueError(msg)
    return CellTypeReference(
        genes=genes,
        labels=labels,
        means=means,
        perturbed_centroid=means.mean(0),
    )


# --- statistics --------------------------------------------------------------------------------------------------


def welch_ttest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene Welch t-test of a (n, G) vs b (m, G): (t, p), both (G,), two-sided; needs n, m >= 2.

    Same numbers as ``scipy.stats.ttest_ind(a, b, equal_var=False)`` where that is defined; genes with zero
    variance in both sets (standard error below 1e-12 x max(1, |mean a|, |mean b|), which absorbs float rounding)
    get t = 0 and p = 1 instead of NaN/inf, without warnings.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        msg = f"welch_ttest needs (n >= 2, G) and (m >= 2, G) arrays, got {a.shape} and {b.shape}"
        raise ValueError(msg)
    return _welch(_Moments.of(a), _Moments.of(b))


@dataclass(frozen=True)
class _Moments:
    mean: np.ndarray  # (G,)
    var: np.ndarray  # (G,) ddof=1
    n: int

    @classmethod
    def of(cls, x: np.ndarray) -> _Moments:
        return cls(mean=x.mean(0), var=x.var(0, ddof=1), n=x.shape[0])


def _welch(a: _Moments, b: _Moments) -> tuple[np.ndarray, np.ndarray]:
    se2 = a.var / a.n + b.var / b.n  # (G,)
    scale = np.maximum(1.0, np.maximum(np.abs(a.mean), np.abs(b.mean)))
    ok = se2 > (_VAR_RTOL * scale) ** 2
    t, p = np.zeros_like(se2), np.ones_like(se2)
    if ok.any():
        res = scipy.stats.ttest_ind_from_stats(
            a.mean[ok], np.sqrt(a.var[ok]), a.n, b.mean[ok], np.sqrt(b.var[ok]), b.n, equal_var=False
        )
        t[ok], p[ok] = res.statistic, res.pvalue
    return t, p


def _de_order(t: np.ndarray, p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indices of the kept genes, most significant first: by p, then by larger |t|, then by gene order."""
    idx = np.flatnonzero(keep)
    return idx[np.lexsort((idx, -np.abs(t[idx]), p[idx]))]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 when either vector is constant (up to float32 rounding) or has fewer than 2 entries."""
    if x.size < 2:
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    for v, c in ((x, xc), (y, yc)):
        if np.sqrt(np.mean(c * c)) <= _CONSTANT_RTOL * max(1.0, float(np.abs(v).max())):
            return 0.0
    r = float(xc @ yc / np.sqrt((xc @ xc) * (yc @ yc)))
    return min(1.0, max(-1.0, r))


def wasserstein2(x: np.ndarray, y: np.ndarray) -> float:
    """2-Wasserstein distance between the uniform empirical distributions of x (n, d) and y (m, d).

    Squared Euclidean ground cost. Exact (POT ``ot.emd2``, network simplex) when ``n * m <= W2_EXACT_MAX_PAIRS``;
    above that, ``ot.sinkhorn2`` on the cost divided by its mean with ``reg = SINKHORN_REG``, i.e. the transport
    cost <P_eps, C> of the entropic plan, an upper bound on the exact W2^2: W2 comes out 1-2% high for 500-2000
    cells in 10-50 dimensions, about 4% high in 5 (measured against ``ot.emd2``). With the default caps (2000 cells
    per set) every call is exact. If the scaled cost would underflow the Sinkhorn kernel
    (max cost / mean cost / reg > 700), the exact solver is used instead. Returns the square root of the cost.
    """
    import ot  # POT imports slowly (~4 s, it probes its backends): only when needed

    n, m = x.shape[0], y.shape[0]
    cost = ot.dist(x, y)  # (n, m) squared Euclidean
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    scale = float(cost.mean())
    if scale == 0.0:
        return 0.0
    if n * m <= W2_EXACT_MAX_PAIRS or float(cost.max()) / scale / SINKHORN_REG > 700.0:
        w2 = ot.emd2(a, b, cost, numItermax=10_000_000)
    else:
        w2 = ot.sinkhorn2(a, b, cost / scale, SINKHORN_REG, numItermax=20_000, stopThr=1e-6) * scale
    return math.sqrt(max(float(w2), 0.0))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean), V-statistic, of x (n, d) and y (m, d).

    The V-statistic averages over all pairs including i = j in the within-set terms, so it is the energy distance
    of the two empirical distributions: >= 0, and 0 for identical sets. Computed by ``model.losses.energy_distance``
    (same definition; float32).
    """
    import torch

    from model.losses import energy_distance as _energy

    return float(
        _energy(torch.from_numpy(np.ascontiguousarray(x))[None], torch.from_numpy(np.ascontiguousarray(y))[None])[0]
    )


def mmd_rbf(x: np.ndarray, y: np.ndarray) -> float:
    """Squared MMD of x (n, d) and y (m, d), biased (V-statistic) estimate, Gaussian kernel.

    k(a, b) = exp(-|a - b|^2 / (2 h^2)); MMD^2 = mean k(X, X') + mean k(Y, Y') - 2 mean k(X, Y), means over all
    pairs including i = j. Bandwidth: median heuristic, h^2 = median of the squared distances between all pairs of
    distinct points of the pooled set x + y. This is ``model.losses.mmd_rbf`` exactly; only the median is taken
    here, in numpy (a linear-time selection over the n(n-1)/2 unordered pairs, whose median equals that of the
    ordered pairs), because ``torch.quantile`` sorts (3 s at 2000 + 2000 cells) and refuses more than 2^24 values.
    """
    import torch
    from scipy.spatial.distance import pdist

    from model.losses import mmd_rbf as _mmd

    h2 = max(float(np.median(pdist(np.vstack([x, y]), "sqeuclidean"))), 1e-12)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x))[None], torch.from_numpy(np.ascontiguousarray(y))[None]
    return float(_mmd(xt, yt, bandwidth=math.sqrt(h2))[0])


def _row_distances(rows: np.ndarray, x: np.ndarray, skip: np.ndarray, block: int = 1024) -> tuple[np.ndarray, ...]:
    """L1 and squared L2 distances from x (G,) to each of rows (N, G), columns ``skip`` left out: (N,), (N,).

    In blocks of rows, so a genome-wide reference (10^4 perturbations x 10^4 genes) never needs an (N, G) copy.
    """
    l1, l2 = np.empty(rows.shape[0]), np.empty(rows.shape[0])
    for start in range(0, rows.shape[0], block):
        diff = rows[start : start + block] - x  # (b, G)
        diff[:, skip] = 0.0
        l1[start : start + block] = np.abs(diff).sum(1)
        l2[start : start + block] = np.einsum("ij,ij->i", diff, diff)
    return l1, l2


def _w1_mean(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([scipy.stats.wasserstein_distance(x[:, k], y[:, k]) for k in range(x.shape[1])]))


# --- observed group and scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ObservedGroup:
    """Everything about one (cell type, perturbation)'s observed data that scoring any model reuses.

    Vectors are (G,) float64 unless noted; gene index arrays index ``reference.genes``.
    """

    perturbation: str
    reference: CellTypeReference
    pca: PCABasis
    true_row: int  # row of this perturbation in reference.means
    target_idx: np.ndarray  # indices of the target genes present in the panel
    n_observed: int
    n_ctrl_eval: int
    mean: np.ndarray  # observed mean expression
    ctrl_eval_mean: np.ndarray
    delta: np.ndarray  # mean - ctrl_eval_mean
    delta_systema: np.ndarray  # mean - reference.perturbed_centroid
    de_t: np.ndarray
    de_p: np.ndarray
    de_q: np.ndarray  # BH over all G genes
    de_order: np.ndarray  # non-target genes, most significant first
    significant: np.ndarray  # non-target genes with q < fdr, in gene order
    fdr: float
    cells_pca: np.ndarray  # (<= max_cells, n_comp) observed cells, subsampled and projected

    @property
    def n_genes(self) -> int:
        return self.mean.shape[0]

    @property
    def top20(self) -> np.ndarray:
        return self.de_order[:TOP_DE]


def observe(
    observed: np.ndarray,
    ctrl_eval: np.ndarray,
    *,
    perturbation: str,
    reference: CellTypeReference,
    pca: PCABasis,
    target_genes: Sequence[str],
    max_cells: int = 2000,
    rng: np.random.Generator,
    fdr: float = 0.05,
) -> ObservedGroup:
    """Precompute the observed side of one group: observed (m, G) cells vs ctrl_eval (e, G) held-out controls.

    ``target_genes`` are the perturbed genes (``["A", "B"]`` for ``"A+B"``); those not in ``reference.genes`` are
    ignored. ``rng`` draws the subsample of at most ``max_cells`` observed cells for the distributional metrics.
    Raises ValueError when ``perturbation`` is not a reference label, on mismatched G, fewer than 2 cells in
    either set, or non-finite values.
    """
    if isinstance(target_genes, str):
        msg = f"target_genes must be a sequence of gene symbols, not the string {target_genes!r}"
        raise TypeError(msg)
    if not 0.0 < fdr < 1.0:
        msg = f"fdr must be in (0, 1), got {fdr}"
        raise ValueError(msg)
    g = len(reference.genes)
    if pca.n_genes != g:
        msg = f"PCA basis has {pca.n_genes} genes but the reference has {g}"
        raise ValueError(msg)
    true_row = reference.row(perturbation)
    observed = cell_matrix(observed, "observed", g, min_rows=2)
    ctrl_eval = cell_matrix(ctrl_eval, "ctrl_eval", g, min_rows=2)
    target_idx = np.flatnonzero(np.isin(reference.genes, np.asarray(list(target_genes), dtype=str)))
    keep = np.ones(g, dtype=bool)
    keep[target_idx] = False

    obs_m, ctrl_m = _Moments.of(observed), _Moments.of(ctrl_eval)
    t, p = _welch(obs_m, ctrl_m)
    q = scipy.stats.false_discovery_control(p)
    return ObservedGroup(
        perturbation=perturbation,
        reference=reference,
        pca=pca,
        true_row=true_row,
        target_idx=target_idx,
        n_observed=observed.shape[0],
        n_ctrl_eval=ctrl_eval.shape[0],
        mean=obs_m.mean,
        ctrl_eval_mean=ctrl_m.mean,
        delta=obs_m.mean - ctrl_m.mean,
        delta_systema=obs_m.mean - reference.perturbed_centroid,
        de_t=t,
        de_p=p,
        de_q=q,
        de_order=_de_order(t, p, keep),
        significant=np.flatnonzero(keep & (q < fdr)),
        fdr=fdr,
        cells_pca=pca.transform(_subsample(observed, max_cells, rng)),
    )


def score(
    pred_cells: np.ndarray,
    ctrl_input: np.ndarray,
    obs: ObservedGroup,
    *,
    max_cells: int = 2000,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Score predicted cells (n, G), made by perturbing ``ctrl_input`` (c, G), against an observed group.

    Both sets need at least 2 cells (the predicted DE test). ``rng`` draws the subsample of at most ``max_cells``
    predicted cells for the distributional metrics. Returns ``{name: float}`` for every name in :data:`METRICS`
    (``de_direction`` may be NaN).
    """
    g = obs.n_genes
    pred = cell_matrix(pred_cells, "pred_cells", g, min_rows=2)
    ctrl = cell_matrix(ctrl_input, "ctrl_input", g, min_rows=2)
    pred_m, ctrl_m = _Moments.of(pred), _Moments.of(ctrl)
    delta = pred_m.mean - ctrl_m.mean  # (G,)
    top = obs.top20
    out: dict[str, float] = {}

    out["pearson_delta"] = _pearson(delta, obs.delta)
    out["pearson_delta_top20"] = _pearson(delta[top], obs.delta[top])
    shift = pred_m.mean - obs.reference.perturbed_centroid
    out["pearson_delta_systema"] = _pearson(shift, obs.delta_systema)
    out["pearson_delta_systema_top20"] = _pearson(shift[top], obs.delta_systema[top])

    err = pred_m.mean - obs.mean
    out["mse_mean"] = float(np.mean(err**2))
    out["mae_mean"] = float(np.mean(np.abs(err)))
    out["mse_top20"] = float(np.mean(err[top] ** 2)) if top.size else float("nan")

    l1, l2 = _row_distances(obs.reference.means, pred_m.mean, obs.target_idx)  # (N,), (N,)
    rank = int(np.sum(l1 < l1[obs.true_row]))
    out["discrimination"] = 1.0 - rank / l1.shape[0]
    out["centroid_accuracy"] = float(not np.any(l2 < l2[obs.true_row]))

    t, p = _welch(pred_m, ctrl_m)
    keep = np.ones(g, dtype=bool)
    keep[obs.target_idx] = False
    pred_order = _de_order(t, p, keep)
    for n_top in DE_OVERLAP_NS:
        n_eff = min(n_top, pred_order.size)
        hits = np.intersect1d(pred_order[:n_eff], obs.de_order[:n_eff]).size
        out[f"de_overlap_{n_top}"] = hits / n_eff if n_eff else float("nan")
    sig = obs.significant
    agree = np.sign(delta[sig]) == np.sign(obs.delta[sig])
    out["de_direction"] = float(agree.mean()) if sig.size else float("nan")
    out["n_de_observed"] = float(sig.size)

    x = obs.pca.transform(_subsample(pred, max_cells, rng))  # (n', n_comp)
    y = obs.cells_pca  # (m', n_comp)
    out["w1_pca"] = _w1_mean(x, y)
    out["w2_pca"] = wasserstein2(x, y)
    out["mmd_pca"] = mmd_rbf(x, y)
    out["energy_pca"] = energy_distance(x, y)

    out["pred_shift_l2"] = float(np.linalg.norm(delta))
    out["obs_shift_l2"] = float(np.linalg.norm(obs.delta))
    assert out.keys() == METRICS.keys(), sorted(set(out) ^ set(METRICS))
    return out


# --- control halves and the positive control --------------------------------------------------------------------


def control_halves(n_controls: int, rng: np.random.Generator) -> np.ndarray:
    """(n_controls,) bool: True = model half (``ctrl_input`` pool), False = evaluation half (``ctrl_eval``).

    Balanced: ``n - n // 2`` True (the model half gets the odd cell), ``n // 2`` False, positions drawn by rng.
    """
    if n_controls < 2:
        msg = f"need at least 2 control cells to halve, got {n_controls}"
        raise ValueError(msg)
    mask = np.zeros(n_controls, dtype=bool)
    mask[rng.permutation(n_controls)[: n_controls - n_controls // 2]] = True
    return mask


def split_half(observed: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint halves (a, b) of the rows of observed (m, G): a has m // 2 rows, b the other m - m // 2."""
    if observed.ndim != 2 or observed.shape[0] < 2:
        msg = f"split_half needs (m >= 2, G) cells, got shape {observed.shape}"
        raise ValueError(msg)
    perm = rng.permutation(observed.shape[0])
    h = observed.shape[0] // 2
    return observed[np.sort(perm[:h])], observed[np.sort(perm[h:])]


def split_half_ceiling(
    observed: np.ndarray,
    ctrl_input: np.ndarray,
    ctrl_eval: np.ndarray,
    *,
    perturbation: str,
    reference: CellTypeReference,
    pca: PCABasis,
    target_genes: Sequence[str],
    max_cells: int = 2000,
    rng: np.random.Generator,
    fdr: float = 0.05,
) -> dict[str, float]:
    """The positive control: half a of the observed cells, as a prediction from ``ctrl_input`` (model-half
    controls), scored against half b as observed vs ``ctrl_eval``. What a perfect model could reach with this
    many cells; ``rng`` is spawned into the split, the observed subsample and the predicted subsample."""
    split_rng, obs_rng, pred_rng = rng.spawn(3)
    half_a, half_b = split_half(observed, split_rng)
    obs = observe(half_b, ctrl_eval, perturbation=perturbation, reference=reference, pca=pca,
                  target_genes=target_genes, max_cells=max_cells, rng=obs_rng, fdr=fdr)  # fmt: skip
    return score(half_a, ctrl_input, obs, max_cells=max_cells, rng=pred_rng)
