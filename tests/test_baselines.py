"""Baselines: exact definitions on hand-built profiles, recovery of planted structure, fallbacks, no leakage."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from model.baselines import (
    BASELINES,
    Baseline,
    KNNBaseline,
    TransferBaseline,
    _fit_ridge,
    make_baseline,
)
from retrieval_service.embeddings import GeneEmbeddings

CTS = ("hepg2", "k562", "rpe1")
G = 40
CTRL = "non-targeting"


def make_profiles(deltas: dict[tuple[str, str], np.ndarray], *, seed: int = 0, n_cells: int = 4) -> ad.AnnData:
    """Pseudobulk profiles in the layout of ``compute_profiles``: one row per group, controls included."""
    rng = np.random.default_rng(seed)
    cts = sorted({ct for ct, _ in deltas})
    base = {ct: rng.uniform(1.0, 2.0, G).astype(np.float32) for ct in cts}
    keys = [(ct, CTRL) for ct in cts] + sorted(deltas)
    delta = np.stack([np.zeros(G, np.float32) if p == CTRL else deltas[(ct, p)] for ct, p in keys]).astype(np.float32)
    x = np.stack([base[ct] for ct, _ in keys]) + delta
    obs = pd.DataFrame(
        {
            "cell_line": [ct for ct, _ in keys],
            "gene": [p for _, p in keys],
            "n_cells": 50,
            "is_control": [p == CTRL for _, p in keys],
        },
        index=[f"{ct}|{p}" for ct, p in keys],
    )
    out = ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    out.layers["delta"] = delta
    out.obsm["cells"] = (x[:, None, :] + rng.normal(0, 0.1, (len(keys), n_cells, G))).astype(np.float32)
    return out


def row(prof: ad.AnnData, ct: str, pert: str) -> np.ndarray:
    return prof.layers["delta"][prof.obs.index.get_loc(f"{ct}|{pert}")]


def gene_names(n: int) -> list[str]:
    return [f"GENE{i:02d}" for i in range(n)]


def random_embeddings(genes: list[str], dim: int = 8, seed: int = 1) -> GeneEmbeddings:
    rng = np.random.default_rng(seed)
    return GeneEmbeddings(tuple(genes), rng.normal(size=(len(genes), dim)), "test")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture
def world():
    """3 cell types x 30 single-gene perturbations with random deltas; rpe1 holds 9 of them out."""
    rng = np.random.default_rng(0)
    genes = gene_names(30)
    deltas = {(ct, g): rng.normal(size=G).astype(np.float32) for ct in CTS for g in genes}
    held = [("rpe1", g) for g in genes[:9]]
    train = [p for p in deltas if p not in held]
    return make_profiles(deltas), train, held, random_embeddings(genes)


def fit(name: str, profiles, train, emb=None, **params):
    return make_baseline(name, **params).fit(profiles, train_pairs=train, embeddings=emb)


# --- control and train_mean -------------------------------------------------------------------------------


def test_control_predicts_zero_and_cells_are_controls(world):
    prof, train, held, _ = world
    b = fit("control", prof, train)
    pred = b.predict_delta("rpe1", [p for _, p in held])
    assert pred.shape == (9, G) and pred.dtype == np.float32
    assert not pred.any()
    ctrl = np.random.default_rng(3).normal(size=(5, G))
    np.testing.assert_array_equal(b.predict_cells(ctrl, "rpe1", "GENE00"), ctrl.astype(np.float32))


def test_train_mean_is_the_hand_computed_mean_and_falls_back_visibly(world):
    prof, train, _, _ = world
    b = fit("train_mean", prof, train)
    rows = [prof.obs.index.get_loc(f"rpe1|{p}") for c, p in train if c == "rpe1"]
    assert len(rows) == 21
    expected = prof.layers["delta"][rows].mean(axis=0)
    pred = b.predict_delta("rpe1", ["GENE00", "GENE05"])
    np.testing.assert_allclose(pred, np.stack([expected, expected]), rtol=1e-5, atol=1e-6)
    assert [i.fallbacks for i in b.last_info] == [(), ()]

    # A cell type with controls but no training perturbation (zero-shot) gets the pooled mean, and says so.
    only = [p for p in train if p[0] != "rpe1"]
    b = fit("train_mean", prof, only)
    pooled = prof.layers["delta"][[prof.obs.index.get_loc(f"{c}|{p}") for c, p in only]].mean(axis=0)
    np.testing.assert_allclose(b.predict_delta("rpe1", ["GENE00"])[0], pooled, rtol=1e-5, atol=1e-6)
    assert b.last_info[0].fallbacks == ("train_mean_all_cell_types",)
    assert b.fallback_counts["train_mean_all_cell_types"] == 1
    assert "train_mean_all_cell_types 1" in b.explain()


def test_control_label_predicts_zero_and_predict_cells_adds_the_delta(world):
    prof, train, _, _ = world
    b = fit("train_mean", prof, train)
    pred = b.predict_delta("rpe1", ["GENE03", CTRL])
    assert pred[0].any() and not pred[1].any()
    assert b.last_info[1].method == "control_label"
    ctrl = np.random.default_rng(4).normal(size=(6, G)).astype(np.float32)
    np.testing.assert_allclose(b.predict_cells(ctrl, "rpe1", "GENE03"), ctrl + pred[0], rtol=1e-6)


# --- knn ------------------------------------------------------------------------------------------------------


def brute_knn(prof, train, emb, ct, pert, k, *, weighted=False):
    """Reference: rank by (other cell type, -cosine), own entry excluded, average the top k."""
    q = unit(emb.vector(pert).astype(np.float64))
    cands = []
    for c, p in train:
        if (c, p) == (ct, pert):
            continue
        cos = float(q @ unit(emb.vector(p).astype(np.float64)))
        cands.append((c != ct, -cos, c, p))
    top = sorted(cands)[:k]
    d = np.stack([prof.layers["delta"][prof.obs.index.get_loc(f"{c}|{p}")] for _, _, c, p in top])
    w = np.array([max(-neg, 0.0) for _, neg, _, _ in top]) if weighted else np.ones(len(top))
    return (w / w.sum()) @ d, top


def test_knn_is_the_mean_of_the_k_nearest_same_cell_type_first(world):
    prof, train, _, emb = world
    b = fit("knn", prof, train, emb, k=5)
    queries = ["GENE00", "GENE04", "GENE20"]  # two held out, one a training entry (its own entry is excluded)
    pred = b.predict_delta("rpe1", queries)
    for i, q in enumerate(queries):
        expected, top = brute_knn(prof, train, emb, "rpe1", q, 5)
        np.testing.assert_allclose(pred[i], expected, rtol=1e-5, atol=1e-6)
        got = [(c, p) for c, p, _, _ in b.last_info[i].details["neighbours"]]
        assert got == [(c, p) for _, _, c, p in top]
        assert all(c == "rpe1" for c, _ in got)
        assert ("rpe1", q) not in got
    assert b.fallback_counts == {}


def test_knn_fills_from_other_cell_types_and_can_weight_by_cosine(world):
    prof, train, _, emb = world
    # rpe1 keeps only 3 training perturbations, so 5 neighbours need 2 (or 3 with its own excluded) from elsewhere.
    few = [p for p in train if p[0] != "rpe1"] + [("rpe1", "GENE10"), ("rpe1", "GENE11"), ("rpe1", "GENE12")]
    for weighted in (False, True):
        b = fit("knn", prof, few, emb, k=5, weighted=weighted)
        pred = b.predict_delta("rpe1", ["GENE01", "GENE10"])
        for i, q in enumerate(["GENE01", "GENE10"]):
            expected, top = brute_knn(prof, few, emb, "rpe1", q, 5, weighted=weighted)
            np.testing.assert_allclose(pred[i], expected, rtol=1e-5, atol=1e-6)
            n_same = sum(c == "rpe1" for _, _, c, _ in top)
            assert n_same == (3 if q == "GENE01" else 2)
            assert b.last_info[i].details["n_other_cell_types"] == 5 - n_same
            assert b.last_info[i].fallbacks == ("knn_filled_from_other_cell_types",)
        # The same perturbation in the other cell types is the nearest entry there (cosine 1).
        assert b.last_info[0].details["neighbours"][3][1] == "GENE01"
    unweighted, _ = brute_knn(prof, few, emb, "rpe1", "GENE01", 5)
    weighted_ref, _ = brute_knn(prof, few, emb, "rpe1", "GENE01", 5, weighted=True)
    assert not np.allclose(unweighted, weighted_ref)  # the weighting makes a difference the test can see


def test_knn_missing_embedding_falls_back_or_raises_naming_it(world):
    prof, train, _, emb = world
    small = emb.subset([g for g in emb.symbols if g != "GENE02"])
    b = fit("knn", prof, train, small)
    pred = b.predict_delta("rpe1", ["GENE02", "GENE03"])
    mean = fit("train_mean", prof, train).predict_delta("rpe1", ["GENE02"])[0]
    np.testing.assert_allclose(pred[0], mean, rtol=1e-6)
    assert b.last_info[0].method == "train_mean" and b.last_info[0].fallbacks == ("missing_embedding",)
    assert b.last_info[1].method == "knn"
    assert b.fallback_counts["missing_embedding"] == 1
    # GENE02 training entries in other cell types lack a key too, so they are never neighbours.
    assert b.fit_info["n_train_without_embedding"] == 2
    assert all(p != "GENE02" for _, p, _, _ in b.last_info[1].details["neighbours"])

    strict = fit("knn", prof, train, small, on_missing_embedding="raise")
    with pytest.raises(ValueError, match=r"unknown perturbation 'GENE02\+GENE03'.*\['GENE02'\]"):
        strict.predict_delta("rpe1", ["GENE03", "GENE02+GENE03"])
    strict_ridge = fit("ridge", prof, train, small, on_missing_embedding="raise")
    with pytest.raises(ValueError, match=r"unknown perturbation 'NOTAGENE'"):
        strict_ridge.predict_delta("rpe1", ["NOTAGENE"])


# --- ridge ----------------------------------------------------------------------------------------------------


def test_ridge_recovers_a_linear_embedding_map():
    rng = np.random.default_rng(5)
    genes = gene_names(30)
    emb = random_embeddings(genes, dim=6, seed=2)
    keys, _ = emb.perturbation_vectors([(g,) for g in genes])
    deltas = {}
    for ct in CTS:
        w, b0 = rng.normal(size=(6, G)), rng.normal(size=G)
        for g, key in zip(genes, keys, strict=True):
            deltas[(ct, g)] = (key @ w + b0).astype(np.float32)
    prof = make_profiles(deltas)
    held = [(ct, g) for ct in CTS for g in genes[:8]]
    train = [p for p in deltas if p not in held]
    b = fit("ridge", prof, train, emb)
    for ct in CTS:
        pred = b.predict_delta(ct, genes[:8])
        truth = np.stack([deltas[(ct, g)] for g in genes[:8]])
        # Each held-out perturbation's profile, after removing the intercept everyone shares.
        centred = truth - truth.mean(axis=0)
        assert corr(pred - truth.mean(axis=0), centred) > 0.95
        assert min(corr(p, t) for p, t in zip(pred, truth, strict=True)) > 0.95
        assert b.last_info[0].method == "ridge" and b.last_info[0].fallbacks == ()
        assert b.last_info[0].details["n"] == 22
    # The planted map is exact, so leave-one-out prefers the smallest penalty of the grid.
    assert b.last_info[0].details["alpha"] == min(b.alphas)
    assert np.abs(pred - truth).max() < 0.05


def test_ridge_pools_cell_types_with_too_few_training_perturbations(world):
    prof, train, _, emb = world
    few = [p for p in train if p[0] != "rpe1"] + [("rpe1", "GENE10"), ("rpe1", "GENE11")]
    b = fit("ridge", prof, few, emb, min_train=5)
    b.predict_delta("rpe1", ["GENE00", "GENE01"])
    assert [i.method for i in b.last_info] == ["ridge_pooled", "ridge_pooled"]
    assert b.fallback_counts["ridge_pooled"] == 2
    assert b.last_info[0].details["n"] == 62  # 2 x 30 + 2 pooled entries
    b.predict_delta("k562", ["GENE00"])
    assert b.last_info[0].method == "ridge" and b.last_info[0].details["n"] == 30


def test_ridge_leave_one_out_is_exact():
    """The closed-form leave-one-out error equals refitting without each sample at the same absolute penalty."""
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))

    def mean_sq_sv(a: np.ndarray) -> float:
        return float(np.mean(np.linalg.svd(a - a.mean(axis=0), compute_uv=False) ** 2))

    for prior, c in (("zero", 0.0), ("identity", 1.0)):
        fitted = _fit_ridge(x, y, alphas=[0.3], prior=prior)
        assert fitted.prior == c
        errs = []
        for i in range(12):
            keep = np.arange(12) != i
            alpha_rel = fitted.alpha / mean_sq_sv(x[keep])
            sub = _fit_ridge(x[keep], y[keep], alphas=[alpha_rel], prior=prior)
            errs.append(y[i] - sub.predict(x[i : i + 1])[0])
        np.testing.assert_allclose(fitted.loo_mse, np.mean(np.square(errs)), rtol=1e-4)


# --- additive -------------------------------------------------------------------------------------------------


@pytest.fixture
def combos():
    rng = np.random.default_rng(6)
    genes = gene_names(12)
    single = {(ct, g): rng.normal(size=G).astype(np.float32) for ct in CTS for g in genes}
    pairs = [f"{a}+{b}" for a, b in zip(genes[::2], genes[1::2], strict=True)]  # GENE00+GENE01, ...
    deltas = dict(single)
    for ct in CTS:
        for p in pairs:
            a, b = p.split("+")
            deltas[(ct, p)] = single[(ct, a)] + single[(ct, b)]
    # GENE10 is never trained anywhere; GENE08 is trained only outside rpe1.
    held = [("rpe1", p) for p in pairs] + [(ct, "GENE10") for ct in CTS] + [("rpe1", "GENE08")]
    train = [p for p in deltas if p not in held]
    return make_profiles(deltas), train, single


def test_additive_is_exact_on_additive_combinations_and_records_fallbacks(combos):
    prof, train, single = combos
    b = fit("additive", prof, train)
    pred = b.predict_delta("rpe1", ["GENE00+GENE01", "GENE03+GENE02", "GENE04"])
    np.testing.assert_allclose(pred[0], single[("rpe1", "GENE00")] + single[("rpe1", "GENE01")], rtol=1e-5)
    np.testing.assert_allclose(pred[1], single[("rpe1", "GENE02")] + single[("rpe1", "GENE03")], rtol=1e-5)
    np.testing.assert_allclose(pred[2], single[("rpe1", "GENE04")], rtol=1e-6)  # a trained single: its delta
    assert b.fallback_counts == {}

    pred = b.predict_delta("rpe1", ["GENE08+GENE09", "GENE10+GENE11", "GENE08+GENE10"])
    others = (single[("hepg2", "GENE08")] + single[("k562", "GENE08")]) / 2
    np.testing.assert_allclose(pred[0], others + single[("rpe1", "GENE09")], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred[1], single[("rpe1", "GENE11")], rtol=1e-6)  # GENE10 contributes 0
    np.testing.assert_allclose(pred[2], others, rtol=1e-5, atol=1e-6)
    info = b.last_info
    assert info[0].fallbacks == ("additive_gene_from_other_cell_types",)
    assert info[0].details["gene_sources"] == {"GENE08": "other_cell_types:hepg2,k562", "GENE09": "target"}
    assert info[1].fallbacks == ("additive_gene_zero",)
    assert b.fallback_counts == {"additive_gene_from_other_cell_types": 2, "additive_gene_zero": 2}


# --- transfer ---------------------------------------------------------------------------------------------------


@pytest.fixture
def linear_transfer():
    """rpe1 = hepg2 @ W + noise; hepg2 and k562 are independent rank-5 views of one latent effect."""
    rng = np.random.default_rng(7)
    genes = gene_names(60)
    z = rng.normal(size=(60, 5))
    src = {"hepg2": z @ rng.normal(size=(5, G)), "k562": z @ rng.normal(size=(5, G))}
    w = rng.normal(size=(G, G)) / np.sqrt(G)
    tgt = src["hepg2"] @ w + 0.05 * rng.normal(size=(60, G))
    deltas = {(ct, g): src[ct][i].astype(np.float32) for ct in src for i, g in enumerate(genes)}
    deltas |= {("rpe1", g): tgt[i].astype(np.float32) for i, g in enumerate(genes)}
    held = [("rpe1", g) for g in genes[:15]]
    train = [p for p in deltas if p not in held]
    return make_profiles(deltas), train, genes, tgt


def test_transfer_recovers_a_linear_cross_cell_type_map(linear_transfer):
    prof, train, genes, tgt = linear_transfer
    b = fit("transfer", prof, train)
    pred = b.predict_delta("rpe1", genes[:15])
    truth = tgt[:15]
    plain = np.stack([(row(prof, "hepg2", g) + row(prof, "k562", g)) / 2 for g in genes[:15]])
    assert corr(pred, truth) > 0.95
    assert corr(plain, truth) < 0.5
    assert np.mean((pred - truth) ** 2) < 0.1 * np.mean((plain - truth) ** 2)
    info = b.last_info[0]
    assert info.method == "ridge_map" and info.fallbacks == ()
    assert info.details["sources"] == ["hepg2", "k562"]
    assert info.details["maps"]["hepg2"]["n"] == 45
    np.testing.assert_allclose(sum(info.details["weights"]), 1.0)


def test_transfer_identity_prior_keeps_an_unlearnable_target_gene_effect():
    """A knockdown's drop of its own target gene is in no other perturbation; only the prior carries it."""
    rng = np.random.default_rng(9)
    n = 30
    genes = [f"g{i}" for i in range(n)]  # perturb gene i -> its own column drops
    shared = rng.normal(size=(n, 3)) @ rng.normal(size=(3, G))
    deltas = {}
    for ct, scale in (("k562", 1.0), ("rpe1", 0.8)):
        d = scale * shared + 0.01 * rng.normal(size=(n, G))
        d[np.arange(n), np.arange(n)] -= 2.0
        deltas |= {(ct, g): d[i].astype(np.float32) for i, g in enumerate(genes)}
    prof = make_profiles(deltas)
    held = [("rpe1", g) for g in genes[:6]]
    train = [p for p in deltas if p not in held]
    auto = fit("transfer", prof, train, min_shared=10).predict_delta("rpe1", genes[:6])
    zero = fit("transfer", prof, train, min_shared=10, prior="zero").predict_delta("rpe1", genes[:6])
    truth = np.stack([deltas[("rpe1", g)] for g in genes[:6]])
    own = np.arange(6)
    assert np.all(np.abs(auto - truth)[own, own] < 0.2)  # the drop survives the map
    assert np.all(np.abs(zero - truth)[own, own] > 1.0)  # an ordinary ridge map loses most of it
    assert np.mean((auto - truth) ** 2) < 0.05 * np.mean((zero - truth) ** 2)


def test_transfer_falls_back_to_plain_average_then_train_mean(linear_transfer):
    prof, train, _, _ = linear_transfer
    b = fit("transfer", prof, train, min_shared=100)
    pred = b.predict_delta("rpe1", ["GENE00"])
    rows = [prof.obs.index.get_loc(f"{ct}|GENE00") for ct in ("hepg2", "k562")]
    np.testing.assert_allclose(pred[0], prof.layers["delta"][rows].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert b.last_info[0].method == "plain_average"
    assert b.last_info[0].fallbacks == ("transfer_plain_average",)

    # GENE00 held out in every cell type: no source has it.
    no_src = [p for p in train if p[1] != "GENE00"]
    b = fit("transfer", prof, no_src)
    mean = fit("train_mean", prof, no_src).predict_delta("rpe1", ["GENE00"])[0]
    np.testing.assert_allclose(b.predict_delta("rpe1", ["GENE00"])[0], mean, rtol=1e-6)
    assert b.last_info[0].fallbacks == ("transfer_no_source",)
    assert "transfer_no_source 1" in b.explain()


def test_transfer_only_uses_sources_with_a_map(linear_transfer):
    prof, train, genes, _ = linear_transfer
    # k562 shares only 10 training perturbations with rpe1: too few for its map, so hepg2's map alone predicts.
    sub = [p for p in train if p[0] != "k562" or p[1] in genes[:25]]
    b = TransferBaseline(min_shared=20).fit(prof, train_pairs=sub)
    b.predict_delta("rpe1", ["GENE00"])
    assert b.last_info[0].details["sources"] == ["hepg2"]
    assert b.last_info[0].details["unmapped_sources"] == ["k562"]
    assert b.last_info[0].details["weights"] == [1.0]


# --- every baseline -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_held_out_rows_cannot_change_predictions(name, combos):
    prof, train, _ = combos
    emb = random_embeddings(gene_names(12))
    held = [
        (ct, p)
        for ct, p in zip(prof.obs["cell_line"], prof.obs["gene"], strict=True)
        if p != CTRL and (ct, p) not in set(train)
    ]
    queries = [p for ct, p in held if ct == "rpe1"] + ["GENE02", "GENE04+GENE05"]
    before = fit(name, prof, train, emb).predict_delta("rpe1", queries)

    wild = prof.copy()
    rows = [wild.obs.index.get_loc(f"{ct}|{p}") for ct, p in held]
    rng = np.random.default_rng(11)
    wild.X[rows] = rng.normal(0, 1e6, (len(rows), G))
    wild.layers["delta"][rows] = rng.normal(0, 1e6, (len(rows), G))
    wild.obsm["cells"][rows] = rng.normal(0, 1e6, (len(rows), wild.obsm["cells"].shape[1], G))
    after = fit(name, wild, train, emb).predict_delta("rpe1", queries)
    np.testing.assert_array_equal(before, after)
    if name != "control":
        # The guard can fail: fitting on everything does move the predictions.
        everything = train + held
        leaky = fit(name, wild, everything, emb).predict_delta("rpe1", queries)
        assert not np.array_equal(before, leaky)


@pytest.mark.parametrize("name", BASELINES)
def test_errors_name_the_problem(name, world):
    prof, train, _, emb = world
    b = make_baseline(name)
    assert isinstance(b, Baseline) and b.name == name
    with pytest.raises(RuntimeError, match=rf"'{name}' baseline is not fitted"):
        b.predict_delta("rpe1", ["GENE00"])
    b.fit(prof, train_pairs=train, embeddings=emb)
    with pytest.raises(ValueError, match=r"unknown cell type 'jurkat'.*'hepg2', 'k562', 'rpe1'"):
        b.predict_delta("jurkat", ["GENE00"])
    with pytest.raises(ValueError, match=r"ctrl_cells must be \(S, 40\).*\(5, 39\)"):
        b.predict_cells(np.zeros((5, G - 1)), "rpe1", "GENE00")
    with pytest.raises(TypeError, match="wrap it in a list"):
        b.predict_delta("rpe1", "GENE00")
    with pytest.raises(ValueError, match=r"malformed perturbation label 'GENE00\+'"):
        b.predict_delta("rpe1", ["GENE00+"])
    out = b.predict_delta("rpe1", ["GENE00", "GENE01+GENE02"])
    assert out.shape == (2, G) and out.dtype == np.float32 and np.isfinite(out).all()
    assert len(b.last_info) == 2 and b.last_info[0].perturbation == "GENE00"


@pytest.mark.parametrize("name", ["knn", "ridge"])
def test_embedding_baselines_refuse_to_fit_without_embeddings(name, world):
    prof, train, _, _ = world
    with pytest.raises(ValueError, match=rf"the '{name}' baseline needs gene embeddings"):
        make_baseline(name).fit(prof, train_pairs=train)


def test_factory_and_fit_validation(world):
    prof, train, _, _ = world
    with pytest.raises(ValueError, match=r"unknown baseline 'mean'.*'train_mean'"):
        make_baseline("mean")
    with pytest.raises(ValueError, match=r"'knn' takes no parameter\(s\) \['kk'\].*'k'"):
        make_baseline("knn", kk=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        KNNBaseline(k=0)
    with pytest.raises(ValueError, match="none of the 1 train pairs"):
        make_baseline("control").fit(prof, train_pairs=[("rpe1", "NOPE")])
    with pytest.raises(ValueError, match=r"column 'perturbation' not in profiles\.obs"):
        make_baseline("control").fit(prof, train_pairs=train, pert_col="perturbation")


def test_combination_labels_match_in_any_order(combos):
    prof, train, _ = combos
    b = fit("transfer", prof, train, min_shared=5)
    a = b.predict_delta("k562", ["GENE01+GENE00"])
    assert b.last_info[0].method == "ridge_map"  # found the other cell types' "GENE00+GENE01"
    np.testing.assert_array_equal(a, b.predict_delta("k562", ["GENE00+GENE01"]))
