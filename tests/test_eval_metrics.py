"""The metric panel: hand-computed values on tiny inputs, scipy / POT / direct formulas as references, the split-half
ceiling against the zero-delta prediction on simulated and real data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from model.eval import metrics as M
from model.eval.metrics import (
    METRICS,
    PCABasis,
    cell_type_reference,
    control_halves,
    fit_pca,
    observe,
    score,
    split_half,
    split_half_ceiling,
    welch_ttest,
)
from tests.conftest import shared_file

GENES3 = np.array(["A", "B", "C"])


def identity_pca(g: int) -> PCABasis:
    return PCABasis(mean=np.zeros(g), components=np.eye(g))


def around(mean, spread=0.5):
    """Two cells whose mean is exactly ``mean`` (the spread is a power of 2, so no rounding)."""
    mean = np.asarray(mean, dtype=float)
    return np.stack([mean + spread, mean - spread])


@pytest.fixture
def tiny():
    """3 genes. Observed mean (2,3,4) vs eval controls (1,1,1): delta (1,2,3). Predicted mean (1,3,2) from
    input controls (0,0,0): delta (1,3,2). Reference rows P = observed mean, Q = (0,3,2), R = (1,0,0); centroid
    (1,2,2)."""
    ref = cell_type_reference(GENES3, ["P", "Q", "R"], np.array([[2.0, 3, 4], [0, 3, 2], [1, 0, 0]]))
    return {
        "ref": ref,
        "observed": around([2, 3, 4]),
        "ctrl_eval": around([1, 1, 1]),
        "pred": around([1, 3, 2]),
        "ctrl_input": around([0, 0, 0]),
    }


def run(t, *, targets=(), pred=None, ctrl_input=None, **kw):
    obs = observe(t["observed"], t["ctrl_eval"], perturbation="P", reference=t["ref"], pca=identity_pca(3),
                  target_genes=list(targets), rng=np.random.default_rng(0), **kw)  # fmt: skip
    pred = t["pred"] if pred is None else pred
    ctrl_input = t["ctrl_input"] if ctrl_input is None else ctrl_input
    return score(pred, ctrl_input, obs, rng=np.random.default_rng(1))


def test_tiny_hand_computed_values(tiny):
    s = run(tiny)
    assert set(s) == set(METRICS)
    assert all(type(v) is float for v in s.values())
    # r((1,2,3), (1,3,2)): centred (-1,0,1) . (-1,1,0) = 1 over sqrt(2 * 2) = 0.5
    assert s["pearson_delta"] == pytest.approx(0.5)
    assert s["pearson_delta_top20"] == pytest.approx(0.5)  # 3 genes < 20: the top-20 are all genes
    # Systema: observed - c = (1,1,2), predicted - c = (0,1,0): centred products sum to -1/3 over 6/9 -> -0.5
    assert s["pearson_delta_systema"] == pytest.approx(-0.5)
    assert s["pearson_delta_systema_top20"] == pytest.approx(-0.5)
    # means (1,3,2) vs (2,3,4): errors (-1, 0, -2)
    assert s["mse_mean"] == pytest.approx(5 / 3)
    assert s["mae_mean"] == pytest.approx(1.0)
    assert s["mse_top20"] == pytest.approx(5 / 3)
    # L1 to P, Q, R: 3, 1, 5 -> one other row (Q) strictly closer: 1 - 1/3; Q is also the nearest in L2
    assert s["discrimination"] == pytest.approx(2 / 3)
    assert s["centroid_accuracy"] == 0.0
    assert s["pred_shift_l2"] == pytest.approx(np.sqrt(14))
    assert s["obs_shift_l2"] == pytest.approx(np.sqrt(14))
    # overlaps are clipped to the 3 genes there are: every top-N set is all genes
    assert s["de_overlap_20"] == s["de_overlap_50"] == s["de_overlap_100"] == 1.0


def test_target_columns_are_left_out_of_discrimination(tiny):
    # Without gene C: L1 to P, Q, R = 1, 1, 3 and L2^2 = 1, 1, 9; Q ties with P, and a tie is not "strictly closer"
    s = run(tiny, targets=["C", "NOT_IN_PANEL"])
    assert s["discrimination"] == 1.0
    assert s["centroid_accuracy"] == 1.0
    # the top-20 genes lose C: deltas on (A, B) are (1,3) vs (1,2): two points correlate perfectly
    assert s["pearson_delta_top20"] == pytest.approx(1.0)
    assert s["pearson_delta"] == pytest.approx(0.5)  # all-gene metrics keep the target


def test_row_distances_in_blocks_match_direct():
    rng = np.random.default_rng(2)
    rows, x, skip = rng.normal(size=(7, 5)), rng.normal(size=5), np.array([1, 3])
    l1, l2 = M._row_distances(rows, x, skip, block=3)
    keep = [0, 2, 4]
    np.testing.assert_allclose(l1, np.abs(rows[:, keep] - x[keep]).sum(1))
    np.testing.assert_allclose(l2, ((rows[:, keep] - x[keep]) ** 2).sum(1))


def test_zero_delta_prediction_and_constant_vectors(tiny):
    ctrl = tiny["ctrl_input"]
    s = run(tiny, pred=ctrl, ctrl_input=ctrl)
    assert s["pearson_delta"] == 0.0  # constant (zero) predicted delta: r defined as 0
    assert s["pred_shift_l2"] == 0.0
    assert M._pearson(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) == 0.0
    assert M._pearson(np.array([1.0]), np.array([2.0])) == 0.0
    # a constant shift of every cell is constant up to rounding, not a random correlation of rounding errors
    assert M._pearson(0.8 + np.linspace(0, 1e-9, 200), np.arange(200.0)) == 0.0
    assert M._pearson(np.arange(5.0), -2 * np.arange(5.0)) == pytest.approx(-1.0)


def test_unknown_perturbation_and_bad_shapes_raise(tiny):
    ref, pca = tiny["ref"], identity_pca(3)
    kw = {"reference": ref, "pca": pca, "target_genes": [], "rng": np.random.default_rng(0)}
    with pytest.raises(ValueError, match="'Z' is not in the cell type's reference"):
        observe(tiny["observed"], tiny["ctrl_eval"], perturbation="Z", **kw)
    with pytest.raises(ValueError, match=r"observed must be \(n, 3\).*\(2, 4\)"):
        observe(np.zeros((2, 4)), tiny["ctrl_eval"], perturbation="P", **kw)
    with pytest.raises(ValueError, match=r"ctrl_eval needs at least 2 cells.*\(0, 3\)"):
        observe(tiny["observed"], np.zeros((0, 3)), perturbation="P", **kw)
    bad = tiny["observed"].copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        observe(bad, tiny["ctrl_eval"], perturbation="P", **kw)
    with pytest.raises(TypeError, match="not the string"):
        observe(tiny["observed"], tiny["ctrl_eval"], perturbation="P", **{**kw, "target_genes": "A"})
    with pytest.raises(ValueError, match="PCA basis has 4 genes"):
        observe(tiny["observed"], tiny["ctrl_eval"], perturbation="P", **{**kw, "pca": identity_pca(4)})
    obs = observe(tiny["observed"], tiny["ctrl_eval"], perturbation="P", **kw)
    with pytest.raises(ValueError, match=r"pred_cells must be \(n, 3\).*\(5, 2\)"):
        score(np.zeros((5, 2)), tiny["ctrl_input"], obs, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="pred_cells needs at least 2 cells"):
        score(np.zeros((1, 3)), tiny["ctrl_input"], obs, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="inf"):
        score(np.full((2, 3), np.inf), tiny["ctrl_input"], obs, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels must be unique"):
        cell_type_reference(GENES3, ["P", "P"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="means has 2 rows but there are 3 labels"):
        cell_type_reference(GENES3, ["P", "Q", "R"], np.zeros((2, 3)))


# --- DE -------------------------------------------------------------------------------------------------------------


def test_welch_matches_scipy_and_handles_zero_variance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, size=(30, 8)), rng.normal(1.3, 2.0, size=(45, 8))
    a[:, 0] = b[:, 0] = 0.0  # all zero in both
    a[:, 1], b[:, 1] = 0.7, 0.7  # constant non-zero in both (scipy warns about precision loss here)
    a[:, 2], b[:, 2] = 0.3, 2.9  # constant in each, different means: the test is undefined
    a[:, 3] = 0.0  # constant in one set only: a valid Welch test
    t, p = welch_ttest(a, b)  # filterwarnings=error: any warning would fail the test
    assert np.array_equal(t[:3], np.zeros(3)) and np.array_equal(p[:3], np.ones(3))
    ref = scipy.stats.ttest_ind(a[:, 3:], b[:, 3:], equal_var=False)
    np.testing.assert_allclose(t[3:], ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(p[3:], ref.pvalue, rtol=1e-10)


def strong_effect_group(seed=0, n=60, g=40):
    """Controls and observed cells that are equal except for 20 effect genes (0-19; 0-9 up, 10-19 down, graded)
    and target gene 39 (down by 5). Genes without an effect are identical across sets: t = 0, p = 1."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i}" for i in range(g)])
    ctrl = rng.normal(3.0, 0.5, size=(n, g))
    effect = np.zeros(g)
    effect[:10] = np.linspace(2.0, 3.0, 10)
    effect[10:20] = -np.linspace(2.0, 3.0, 10)
    effect[39] = -5.0
    return genes, ctrl, effect


def test_de_overlap_direction_and_target_exclusion():
    genes, ctrl, effect = strong_effect_group()
    ref = cell_type_reference(genes, ["G39", "OTHER"], np.stack([ctrl.mean(0) + effect, ctrl.mean(0)]))
    obs = observe(ctrl + effect, ctrl, perturbation="G39", reference=ref, pca=identity_pca(len(genes)),
                  target_genes=["G39"], rng=np.random.default_rng(0))  # fmt: skip
    assert set(obs.top20) == set(range(20))  # gene 39 is the strongest but a target
    assert obs.significant.tolist() == list(range(20))

    def s(pred_effect):
        return score(ctrl + pred_effect, ctrl, obs, rng=np.random.default_rng(0))

    right = effect.copy()
    right[39] = 0.0  # not predicting the knockdown costs nothing on the DE metrics
    assert s(right)["de_overlap_20"] == 1.0
    assert s(right)["de_direction"] == 1.0
    assert s(right)["n_de_observed"] == 20.0
    assert s(right)["de_overlap_50"] == 1.0  # clipped to the 39 non-target genes: all of them
    wrong_genes = np.zeros_like(effect)
    wrong_genes[20:39] = 2.0  # 19 genes without an observed effect, + 1 effect gene
    wrong_genes[0] = 2.0
    assert s(wrong_genes)["de_overlap_20"] == pytest.approx(1 / 20)
    flipped = right.copy()
    flipped[[0, 1, 10, 11, 12]] *= -1  # 5 of the 20 significant genes in the wrong direction
    assert s(flipped)["de_direction"] == pytest.approx(15 / 20)
    assert s(flipped)["de_overlap_20"] == 1.0  # the ranking uses p-values, which ignore the sign
    assert s(np.zeros_like(effect))["de_direction"] == 0.0  # a zero predicted delta has no direction


def test_de_direction_nan_without_significant_genes(tiny):
    s = run(tiny, ctrl_input=tiny["ctrl_input"])  # 2 vs 2 cells: nothing survives BH at 0.05
    assert s["n_de_observed"] == 0.0
    assert np.isnan(s["de_direction"])


# --- distributional metrics -----------------------------------------------------------------------------------------


def test_w2_two_points_by_hand():
    x = np.array([[0.0, 0.0], [4.0, 0.0]])
    y = np.array([[1.0, 0.0], [5.0, 3.0]])
    # matching (0,0)-(1,0) and (4,0)-(5,3) costs (1 + 10)/2 = 5.5; the crossed matching (34 + 9)/2 = 21.5
    assert M.wasserstein2(x, y) == pytest.approx(np.sqrt(5.5))
    assert M.wasserstein2(x, x) == 0.0


def test_w2_equal_sizes_matches_brute_force_assignment():
    rng = np.random.default_rng(3)
    for _ in range(3):
        x, y = rng.normal(size=(12, 4)), rng.normal(0.5, 1.5, size=(12, 4))
        cost = cdist(x, y, "sqeuclidean")
        rows, cols = linear_sum_assignment(cost)  # for equal sizes the optimal plan is a permutation
        assert M.wasserstein2(x, y) == pytest.approx(np.sqrt(cost[rows, cols].mean()), rel=1e-9)


def test_w2_sinkhorn_above_the_exact_limit_is_close_to_exact(monkeypatch):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(520, 30)), rng.normal(0.3, 1.0, size=(500, 30))
    monkeypatch.setattr(M, "W2_EXACT_MAX_PAIRS", 250_000)  # 260,000 pairs: Sinkhorn
    approx = M.wasserstein2(x, y)
    monkeypatch.setattr(M, "W2_EXACT_MAX_PAIRS", 10**9)
    exact = M.wasserstein2(x, y)
    assert exact <= approx <= exact * 1.03  # the entropic plan's cost bounds the optimum from above


def test_energy_distance_matches_direct_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 6)), rng.normal(0.4, 1.2, size=(55, 6))
    expected = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    assert M.energy_distance(x, y) == pytest.approx(expected, rel=1e-4)
    assert abs(M.energy_distance(x, x)) < 1e-4


def test_mmd_matches_direct_formula():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(45, 5))
    z = np.vstack([x, y])
    d2 = cdist(z, z, "sqeuclidean")
    h2 = np.median(d2[~np.eye(len(z), dtype=bool)])  # all ordered pairs of distinct pooled points
    k = np.exp(-d2 / (2 * h2))
    n = len(x)
    expected = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    assert M.mmd_rbf(x, y) == pytest.approx(expected, rel=1e-4)


def test_w1_and_projection_match_scipy_in_score():
    rng = np.random.default_rng(7)
    g = 6
    genes = np.array([f"G{i}" for i in range(g)])
    ctrl, observed = rng.normal(size=(25, g)), rng.normal(0.5, 1.0, size=(30, g))
    pred = rng.normal(0.3, 1.1, size=(35, g))
    pca = fit_pca(np.vstack([ctrl, observed]), n_components=3, rng=rng)
    ref = cell_type_reference(genes, ["P"], observed.mean(0, keepdims=True))
    obs = observe(observed, ctrl, perturbation="P", reference=ref, pca=pca, target_genes=[], rng=rng)
    s = score(pred, ctrl, obs, rng=rng)
    xp, yp = (pred - pca.mean) @ pca.components.T, (observed - pca.mean) @ pca.components.T
    w1 = np.mean([scipy.stats.wasserstein_distance(xp[:, k], yp[:, k]) for k in range(3)])
    assert s["w1_pca"] == pytest.approx(w1, rel=1e-12)
    assert s["energy_pca"] == pytest.approx(2 * cdist(xp, yp).mean() - cdist(xp, xp).mean() - cdist(yp, yp).mean(),
                                            rel=1e-4)  # fmt: skip
    assert s["w2_pca"] == pytest.approx(M.wasserstein2(xp, yp), rel=1e-9)


def test_subsampling_is_seeded_and_capped():
    genes, ctrl, effect = strong_effect_group(n=80)
    ref = cell_type_reference(genes, ["G39"], (ctrl + effect).mean(0, keepdims=True))
    pca = fit_pca(ctrl, n_components=5, rng=np.random.default_rng(0))
    obs = observe(ctrl + effect, ctrl, perturbation="G39", reference=ref, pca=pca, target_genes=["G39"],
                  max_cells=30, rng=np.random.default_rng(0))  # fmt: skip
    assert obs.cells_pca.shape == (30, 5)
    a = score(ctrl + 0.5 * effect, ctrl, obs, max_cells=20, rng=np.random.default_rng(9))
    b = score(ctrl + 0.5 * effect, ctrl, obs, max_cells=20, rng=np.random.default_rng(9))
    c = score(ctrl + 0.5 * effect, ctrl, obs, max_cells=20, rng=np.random.default_rng(10))
    assert a == b
    assert a["energy_pca"] != c["energy_pca"]
    assert a["pearson_delta"] == c["pearson_delta"]  # means use every cell


# --- PCA, halves ----------------------------------------------------------------------------------------------------


def test_fit_pca_matches_svd_dense_and_sparse():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    x[x < 0] = 0
    basis = fit_pca(x, n_components=4, rng=rng)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(np.abs(basis.components @ vt[:4].T), np.eye(4), atol=1e-8)
    np.testing.assert_allclose(basis.explained_variance, s[:4] ** 2 / 299, rtol=1e-8)
    np.testing.assert_allclose(basis.transform(x), xc @ basis.components.T, atol=1e-10)
    sparse_basis = fit_pca(sp.csr_matrix(x), n_components=4, rng=rng)
    np.testing.assert_allclose(sparse_basis.components, basis.components, atol=1e-8)
    np.testing.assert_allclose(sparse_basis.transform(sp.csr_matrix(x)), basis.transform(x), atol=1e-8)
    few = fit_pca(x[:8], n_components=4, rng=rng)  # fewer cells than genes: the SVD route
    _, _, vt8 = np.linalg.svd(x[:8] - x[:8].mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(few.components @ vt8[:4].T), np.eye(4), atol=1e-8)
    with pytest.warns(UserWarning, match="only 7 of 10 components"):
        fit_pca(x[:8], n_components=10, rng=rng)
    sub = fit_pca(x, n_components=2, max_cells=50, rng=np.random.default_rng(0))
    assert sub.components.shape == (2, 12)


def test_control_halves_and_split_half():
    mask = control_halves(11, np.random.default_rng(0))
    assert mask.dtype == bool and mask.sum() == 6 and (~mask).sum() == 5
    assert np.array_equal(mask, control_halves(11, np.random.default_rng(0)))
    assert not np.array_equal(mask, control_halves(11, np.random.default_rng(1)))
    x = np.arange(14.0)[:, None] * np.ones((1, 3))
    a, b = split_half(x, np.random.default_rng(0))
    assert a.shape == (7, 3) and b.shape == (7, 3)
    assert sorted(np.concatenate([a[:, 0], b[:, 0]]).tolist()) == list(range(14))
    with pytest.raises(ValueError, match="at least 2"):
        control_halves(1, np.random.default_rng(0))


def test_ceiling_beats_zero_delta_on_simulated_strong_effect():
    rng = np.random.default_rng(11)
    g = 50
    genes = np.array([f"G{i}" for i in range(g)])
    base = rng.uniform(0.5, 3.0, size=g)
    ctrl = np.clip(base + rng.normal(0, 0.6, size=(200, g)), 0, None)
    effects = {f"P{j}": np.where(rng.random(g) < 0.2, rng.normal(0, 1.5, size=g), 0.0) for j in range(6)}
    cells = {p: np.clip(base + e + rng.normal(0, 0.6, size=(120, g)), 0, None) for p, e in effects.items()}
    ref = cell_type_reference(genes, list(cells), np.stack([c.mean(0) for c in cells.values()]))
    model_half = control_halves(len(ctrl), rng)
    ctrl_in, ctrl_ev = ctrl[model_half], ctrl[~model_half]
    pca = fit_pca(np.vstack([ctrl_in, *cells.values()]), n_components=10, rng=rng)
    ceiling = split_half_ceiling(cells["P0"], ctrl_in, ctrl_ev, perturbation="P0", reference=ref, pca=pca,
                                 target_genes=[], rng=rng)  # fmt: skip
    obs = observe(cells["P0"], ctrl_ev, perturbation="P0", reference=ref, pca=pca, target_genes=[], rng=rng)
    zero = score(ctrl_in, ctrl_in, obs, rng=rng)
    assert ceiling["pearson_delta"] > 0.9 > zero["pearson_delta"]
    assert ceiling["energy_pca"] < 0.5 * zero["energy_pca"]
    assert ceiling["mse_mean"] < zero["mse_mean"]
    assert ceiling["discrimination"] == 1.0 and ceiling["centroid_accuracy"] == 1.0
    assert ceiling["de_direction"] > 0.9 and zero["de_direction"] == 0.0


def test_registry_directions():
    assert METRICS["pearson_delta"].higher_is_better is True
    assert METRICS["energy_pca"].higher_is_better is False
    assert METRICS["n_de_observed"].higher_is_better is None
    assert METRICS["pred_shift_l2"].higher_is_better is None
    assert all(spec.name == name and spec.description for name, spec in METRICS.items())


# --- real data ------------------------------------------------------------------------------------------------------


def test_ceiling_beats_control_on_norman_k562():
    import anndata as ad

    adata = ad.read_h5ad(shared_file("perturbench_devel.h5ad"))
    k562 = adata[adata.obs["cell_type"].astype(str) == "k562"]
    x = k562.X.toarray() if sp.issparse(k562.X) else np.asarray(k562.X)
    pert = k562.obs["perturbation"].astype(str).to_numpy()
    genes = k562.var_names.to_numpy().astype(str)
    rng = np.random.default_rng(0)
    ctrl = x[pert == "control"]
    model_half = control_halves(len(ctrl), rng)
    ctrl_in, ctrl_ev = ctrl[model_half], ctrl[~model_half]
    labels = sorted(set(pert) - {"control"})
    ref = cell_type_reference(genes, labels, np.stack([x[pert == p].mean(0) for p in labels]))
    pca = fit_pca(np.vstack([x[pert != "control"], ctrl_in]), n_components=30, rng=rng)
    for p in ["SGK1+TBX3", "CBL+CNN1", "BPGM+SAMD1", "KLF1"]:
        observed, targets = x[pert == p], p.split("+")
        ceiling = split_half_ceiling(observed, ctrl_in, ctrl_ev, perturbation=p, reference=ref, pca=pca,
                                     target_genes=targets, rng=rng)  # fmt: skip
        obs = observe(observed, ctrl_ev, perturbation=p, reference=ref, pca=pca, target_genes=targets, rng=rng)
        zero = score(ctrl_in, ctrl_in, obs, rng=rng)
        assert ceiling["pearson_delta"] > zero["pearson_delta"] + 0.5, p
        assert ceiling["energy_pca"] < zero["energy_pca"], p
