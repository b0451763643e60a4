"""The Perturb-seq simulator: determinism, layout, the generative model's promises, streaming, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from api.cli import main
from model.data.simulator import (
    CONTROL_LABEL,
    SimulatorConfig,
    default_cell_lines,
    describe_h5ad,
    gene_symbols,
    simulate,
    simulate_to_h5ad,
)

SMALL = SimulatorConfig(
    n_genes=300,
    n_programs=12,
    cell_lines=("k562", "rpe1", "jurkat"),
    n_perturbation_pool=40,
    n_perturbations=30,
    n_doubles=4,
    cells_per_perturbation=20,
    n_control_cells=80,
    program_size=30,
    gene_effect_size=15,
    private_effect_size=15,
    interaction_size=10,
    embedding_dim=64,
)


def _truth_table(adata: ad.AnnData) -> dict[tuple[str, str], np.ndarray]:
    """``{(cell_line, perturbation): true delta (G,)}`` from ``uns['simulation']``."""
    sim = adata.uns["simulation"]
    keys = zip(sim["delta_cell_line"], sim["delta_perturbation"], strict=True)
    return {(str(c), str(p)): row for (c, p), row in zip(keys, sim["delta"], strict=True)}


def _same_csr(a: sp.spmatrix, b: sp.spmatrix) -> bool:
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small():
    return simulate(SMALL, seed=7)


# --- determinism ----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays(small):
    adata, emb = small
    again, emb2 = simulate(SMALL, seed=7)
    assert _same_csr(adata.X, again.X)
    assert _same_csr(adata.layers["counts"], again.layers["counts"])
    assert adata.obs.equals(again.obs)
    np.testing.assert_array_equal(adata.uns["simulation"]["delta"], again.uns["simulation"]["delta"])
    np.testing.assert_array_equal(emb.vectors, emb2.vectors)


def test_different_seeds_differ(small):
    adata, emb = small
    other, emb2 = simulate(SMALL, seed=8)
    assert not _same_csr(adata.layers["counts"], other.layers["counts"])
    assert not np.array_equal(adata.uns["simulation"]["delta"], other.uns["simulation"]["delta"])
    assert not np.allclose(emb.vectors, emb2.vectors)


def test_embedding_parameters_do_not_touch_the_cells(small):
    adata, _ = small
    other, emb2 = simulate(dataclasses.replace(SMALL, embedding_snr=50.0, embedding_dim=16), seed=7)
    assert _same_csr(adata.layers["counts"], other.layers["counts"])
    assert emb2.dim == 16


# --- layout ---------------------------------------------------------------------------------------------


def test_layout_matches_the_replogle_nadig_release(small):
    adata, emb = small
    cfg = SMALL
    assert list(adata.var_names) == list(gene_symbols(cfg.n_genes))
    assert list(adata.obs.columns) == ["gene", "cell_line", "gem_group", "UMI_count"]
    assert adata.obs_names.is_unique
    assert list(adata.obs["cell_line"].cat.categories) == list(cfg.cell_lines)
    assert set(adata.obs["gem_group"]) == set(range(1, cfg.n_gem_groups + 1))
    for m in (adata.X, adata.layers["counts"]):
        assert sp.issparse(m) and m.format == "csr" and m.dtype == np.float32
    pool = set(adata.uns["simulation"]["perturbation_pool"])
    for line in cfg.cell_lines:
        obs = adata.obs[adata.obs["cell_line"] == line]
        labels = obs["gene"].astype(str)
        assert (labels == CONTROL_LABEL).sum() == cfg.n_control_cells
        groups = set(labels) - {CONTROL_LABEL}
        singles = {g for g in groups if "+" not in g}
        doubles = {g for g in groups if "+" in g}
        assert len(singles) == cfg.n_perturbations and singles <= pool
        assert len(doubles) == cfg.n_doubles
        for label in doubles:
            a, b = label.split("+")
            assert a < b and a in singles and b in singles  # sorted, from this line's singles
        sizes = labels[labels != CONTROL_LABEL].value_counts()
        assert 0.5 * cfg.cells_per_perturbation < sizes.median() < 1.5 * cfg.cells_per_perturbation
        assert sizes.min() >= 1
    # doubles are mostly shared between lines, so retrieval across lines has something to find
    per_line = [set(adata.obs.loc[adata.obs["cell_line"] == c, "gene"].astype(str)) for c in cfg.cell_lines]
    shared_doubles = {g for g in set.intersection(*per_line) if "+" in g}
    assert len(shared_doubles) >= 1
    assert emb.symbols == tuple(adata.uns["simulation"]["perturbation_pool"])
    assert emb.source == "simulated-genept"
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)


def test_counts_are_integers_and_x_is_their_log_normalisation(small):
    adata, _ = small
    counts, x = adata.layers["counts"], adata.X
    assert np.array_equal(counts.indptr, x.indptr) and np.array_equal(counts.indices, x.indices)
    assert counts.data.min() >= 1 and np.array_equal(counts.data, np.round(counts.data))
    total = np.asarray(counts.sum(axis=1)).ravel()
    np.testing.assert_array_equal(total, adata.obs["UMI_count"].to_numpy())
    expected = np.log1p(counts.multiply(1e4 / total[:, None]).tocsr().toarray())
    np.testing.assert_allclose(x.toarray(), expected, rtol=1e-6, atol=1e-6)
    zeros = 1 - x.nnz / np.prod(x.shape)
    assert 0.4 < zeros < 0.9  # sparse like real data, but not empty


# --- the generative model's promises --------------------------------------------------------------------


def test_target_gene_knockdown_is_visible_in_cells(small):
    adata, _ = small
    sim = adata.uns["simulation"]
    norm = sp.csr_matrix(adata.layers["counts"].multiply(1.0 / adata.obs["UMI_count"].to_numpy()[:, None]))
    genes = list(adata.var_names)
    pool = list(sim["perturbation_pool"])
    truth = _truth_table(adata)
    ratios = []
    for c, line in enumerate(SMALL.cell_lines):
        in_line = (adata.obs["cell_line"] == line).to_numpy()
        ctrl = in_line & (adata.obs["gene"] == CONTROL_LABEL).to_numpy()
        labels = {str(g) for g in adata.obs.loc[in_line, "gene"]} - {CONTROL_LABEL}
        for label in sorted(g for g in labels if "+" not in g):
            g = genes.index(label)
            # the true delta at the target is the drawn knockdown, for effect and no-effect genes alike
            kd = sim["knockdown"][c, pool.index(label)]
            assert truth[(line, label)][g] == pytest.approx(np.log(kd), abs=1e-6)
            cells = in_line & (adata.obs["gene"] == label).to_numpy()
            base = norm[ctrl, g].mean()
            if base * 1e4 > 5:  # the target is expressed well enough to measure its drop
                ratios.append(norm[cells, g].mean() / base)
    ratios = np.asarray(ratios)
    lo, hi = SMALL.knockdown_range
    assert len(ratios) > 30
    assert lo - 0.05 < np.median(ratios) < hi + 0.1
    assert (ratios < 0.7).mean() > 0.85


def test_cells_follow_the_true_deltas(small):
    """Pseudobulk log fold changes of well-expressed genes recover the true deltas, at their scale."""
    adata, _ = small
    counts = adata.layers["counts"]
    norm = sp.csr_matrix(counts.multiply(1e4 / adata.obs["UMI_count"].to_numpy()[:, None]))
    truth = _truth_table(adata)
    true_all, seen_all = [], []
    for line in SMALL.cell_lines:
        in_line = (adata.obs["cell_line"] == line).to_numpy()
        ctrl = in_line & (adata.obs["gene"] == CONTROL_LABEL).to_numpy()
        ctrl_mean = np.asarray(norm[ctrl].mean(axis=0)).ravel()
        expressed = ctrl_mean > 20  # ~4 counts per cell: 20 cells measure a fold change well
        for (c, label), delta in truth.items():
            if c != line:
                continue
            cells = in_line & (adata.obs["gene"] == label).to_numpy()
            mean = np.asarray(norm[cells].mean(axis=0)).ravel()
            true_all.append(delta[expressed])
            seen_all.append(np.log((mean[expressed] + 0.1) / (ctrl_mean[expressed] + 0.1)))
    true_lfc, seen_lfc = np.concatenate(true_all), np.concatenate(seen_all)
    affected = np.abs(true_lfc) > 0.2
    assert affected.sum() > 500
    assert np.corrcoef(true_lfc[affected], seen_lfc[affected])[0, 1] > 0.8
    slope = np.polyfit(true_lfc[affected], seen_lfc[affected], 1)[0]
    assert 0.8 < slope < 1.15
    # unaffected genes move by sampling noise only, far less than strongly affected ones
    assert np.median(np.abs(seen_lfc[true_lfc == 0])) < 0.3 * np.median(np.abs(seen_lfc[np.abs(true_lfc) > 1]))


def _mean_cross_line_correlation(adata: ad.AnnData) -> float:
    truth = _truth_table(adata)
    genes = list(adata.var_names)
    no_effect = set(adata.uns["simulation"]["no_effect"])
    lines = [str(c) for c in adata.uns["simulation"]["cell_lines"]]
    per_pert = []
    for label in adata.uns["simulation"]["perturbation_pool"]:
        rows = [truth[(c, label)].copy() for c in lines if (c, label) in truth]
        if label in no_effect or len(rows) < 2:
            continue
        for r in rows:
            r[genes.index(label)] = 0.0  # the target's own knockdown is shared by construction: leave it out
        corr = np.corrcoef(rows)
        per_pert.append(corr[np.triu_indices(len(rows), 1)].mean())
    return float(np.mean(per_pert))


CORR_BASE = SimulatorConfig(
    n_genes=1000,
    n_programs=20,
    n_perturbation_pool=150,
    n_perturbations=150,
    n_doubles=0,
    cells_per_perturbation=2,
    n_control_cells=2,
    embedding_dim=8,
)


def test_cross_line_correlation_of_true_deltas_is_the_configured_one():
    realised = {}
    for rho in (0.2, 0.6, 0.9):
        adata, _ = simulate(dataclasses.replace(CORR_BASE, cross_line_correlation=rho), seed=1)
        realised[rho] = _mean_cross_line_correlation(adata)
        assert realised[rho] == pytest.approx(rho, abs=0.07), realised
    assert realised[0.2] < realised[0.6] < realised[0.9]


def test_no_effect_perturbations_change_only_their_target(small):
    adata, _ = small
    sim = adata.uns["simulation"]
    no_effect = set(sim["no_effect"])
    assert len(no_effect) == round(SMALL.no_effect_fraction * SMALL.n_perturbation_pool)
    assert no_effect <= set(sim["perturbation_pool"])
    genes = list(adata.var_names)
    checked_none = checked_some = 0
    for (_, label), delta in _truth_table(adata).items():
        if "+" in label:
            continue
        off_target = np.delete(delta, genes.index(label))
        if label in no_effect:
            assert np.all(off_target == 0)
            checked_none += 1
        else:
            assert np.count_nonzero(off_target) >= SMALL.gene_effect_size
            checked_some += 1
    assert checked_none > 0 and checked_some > 0

    half, _ = simulate(dataclasses.replace(SMALL, no_effect_fraction=0.5), seed=7)
    assert len(half.uns["simulation"]["no_effect"]) == SMALL.n_perturbation_pool // 2


def test_double_is_sum_of_singles_plus_small_interaction(small):
    adata, _ = small
    truth = _truth_table(adata)
    genes = list(adata.var_names)
    expected = SMALL.interaction_scale * SMALL.effect_size * np.sqrt(SMALL.program_size)
    n = 0
    for (line, label), delta in truth.items():
        if "+" not in label:
            continue
        a, b = label.split("+")
        resid = delta - truth[(line, a)] - truth[(line, b)]
        ia, ib = genes.index(a), genes.index(b)
        assert delta[ia] == truth[(line, a)][ia] and delta[ib] == truth[(line, b)][ib]  # both targets knocked down
        off = np.delete(resid, [ia, ib])
        assert np.linalg.norm(off) == pytest.approx(expected, rel=0.25)
        assert np.count_nonzero(np.abs(off) > 1e-5) <= SMALL.interaction_size  # float32 rounding aside
        n += 1
    assert n == len(SMALL.cell_lines) * SMALL.n_doubles


def _embedding_vs_membership(snr: float) -> float:
    adata, emb = simulate(dataclasses.replace(SMALL, embedding_snr=snr, embedding_dim=256), seed=3)
    sim = adata.uns["simulation"]
    pool_rows = [list(adata.var_names).index(g) for g in emb.symbols]
    member = sim["program_loadings"][pool_rows]
    member = member / np.linalg.norm(member, axis=1, keepdims=True)
    iu = np.triu_indices(len(emb), 1)
    return float(np.corrcoef((emb.vectors @ emb.vectors.T)[iu], (member @ member.T)[iu])[0, 1])


def test_embedding_snr_controls_how_well_embeddings_reflect_programs():
    low, mid, high = (_embedding_vs_membership(s) for s in (0.05, 1.0, 20.0))
    assert low < 0.4 < 0.85 < high
    assert low < mid < high


def test_unrelated_genes_sit_at_the_baseline_cosine(small):
    adata, emb = small
    member = adata.uns["simulation"]["program_loadings"][[list(adata.var_names).index(g) for g in emb.symbols]] > 0
    unrelated = ~(member.astype(int) @ member.T.astype(int)).astype(bool)
    cos = (emb.vectors @ emb.vectors.T)[np.triu(unrelated, 1)]
    assert cos.mean() == pytest.approx(SMALL.embedding_baseline_cosine, abs=0.05)


# --- streaming writer -----------------------------------------------------------------------------------


def test_streamed_h5ad_equals_in_memory_and_is_byte_identical(small, tmp_path):
    adata, emb = small
    paths = []
    for name, chunk_cells, n_workers in [("a", 37, 1), ("b", 10_000, 1), ("c", 150, 2)]:
        path = simulate_to_h5ad(
            SMALL,
            tmp_path / f"{name}.h5ad",
            seed=7,
            chunk_cells=chunk_cells,
            n_workers=n_workers,
            embeddings_path=tmp_path / f"{name}.npz",
            progress=False,
        )
        paths.append(path)
    assert len({_md5(p) for p in paths}) == 1  # chunking and worker count change no byte

    back = ad.read_h5ad(paths[0])
    assert _same_csr(back.X, adata.X)
    assert _same_csr(back.layers["counts"], adata.layers["counts"])
    assert back.obs.equals(adata.obs)
    assert list(back.var_names) == list(adata.var_names)
    sim, ref = back.uns["simulation"], adata.uns["simulation"]
    np.testing.assert_array_equal(sim["delta"], ref["delta"])
    assert list(sim["delta_perturbation"]) == list(ref["delta_perturbation"])
    assert SimulatorConfig.from_dict(sim["config"]) == SMALL
    assert int(sim["seed"]) == 7
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["vectors"], emb.vectors)
        assert tuple(z["symbols"]) == emb.symbols
    info = describe_h5ad(paths[0])
    assert (info["n_cells"], info["n_genes"], info["nnz"]) == (adata.n_obs, adata.n_vars, adata.X.nnz)
    assert info["cell_lines"] == list(SMALL.cell_lines)


def test_in_memory_result_round_trips_through_h5ad(small, tmp_path):
    adata, _ = small
    adata.write_h5ad(tmp_path / "mem.h5ad")
    back = ad.read_h5ad(tmp_path / "mem.h5ad")
    assert _same_csr(back.layers["counts"], adata.layers["counts"])
    np.testing.assert_array_equal(
        back.uns["simulation"]["program_loadings"], adata.uns["simulation"]["program_loadings"]
    )
    assert SimulatorConfig.from_dict(back.uns["simulation"]["config"]) == SMALL


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    cfg = dataclasses.replace(SMALL, n_perturbations=5, n_perturbation_pool=5, n_doubles=1, n_control_cells=5)
    path = tmp_path / "x.h5ad"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        simulate_to_h5ad(cfg, path, progress=False)
    assert path.read_bytes() == b"keep me"
    simulate_to_h5ad(cfg, path, progress=False, overwrite=True)
    assert ad.read_h5ad(path).n_vars == cfg.n_genes
    assert not list(tmp_path.glob(".x.h5ad.*"))  # no temporary left behind


# --- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_genes": 0}, "n_genes must be >= 1"),
        ({"n_genes": 10.5}, "n_genes must be an integer"),
        ({"n_perturbations": 400}, r"n_perturbations \(400\) must be <= n_perturbation_pool \(320\)"),
        ({"n_perturbation_pool": 3000}, r"n_perturbation_pool \(3000\) must be <= n_genes \(2000\)"),
        ({"cross_line_correlation": 1.5}, r"cross_line_correlation must be in \[0, 1\]"),
        ({"no_effect_fraction": -0.1}, r"no_effect_fraction must be in \[0, 1\]"),
        ({"knockdown_range": (0.5, 0.2)}, "knockdown_range must be"),
        ({"cell_lines": ("k562", "k562")}, "cell_lines must be distinct"),
        ({"cell_lines": ()}, "cell_lines must name at least one line"),
        ({"embedding_snr": 0.0}, "embedding_snr must be > 0"),
        ({"dispersion": -1.0}, "dispersion must be a finite number > 0"),
        ({"n_doubles": 10, "n_perturbations": 4, "n_perturbation_pool": 4}, r"n_doubles \(10\) exceeds the 6 pairs"),
        ({"max_programs_per_gene": 50}, r"max_programs_per_gene \(50\) must be <= n_programs \(40\)"),
    ],
)
def test_config_validation_names_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        SimulatorConfig(**changes)


def test_config_presets_and_round_trip():
    rep = SimulatorConfig.replogle_scale()
    assert (rep.n_genes, rep.n_perturbations, rep.cells_per_perturbation, len(rep.cell_lines)) == (2000, 2000, 75, 4)
    assert SimulatorConfig.preset("replogle", n_genes=3000).n_genes == 3000
    # one flag resizes a consistent dataset: the pool keeps its ratio to the per-line knockdowns
    assert SimulatorConfig.preset("default", n_perturbations=30).n_perturbation_pool == 32
    with pytest.raises(ValueError, match="unknown simulator preset"):
        SimulatorConfig.preset("huge")
    assert SimulatorConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="unknown SimulatorConfig fields"):
        SimulatorConfig.from_dict({"n_genez": 3})
    assert default_cell_lines(5) == ("k562", "rpe1", "jurkat", "hepg2", "line5")
    with pytest.raises(ValueError, match="seed"):
        simulate(SMALL, seed=-1)


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_simulate_end_to_end(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    argv = [
        "simulate",
        "--out",
        str(out),
        "--seed",
        "3",
        "--n-genes",
        "200",
        "--n-perturbations",
        "12",
        "--n-doubles",
        "2",
        "--cells-per-perturbation",
        "8",
        "--n-control-cells",
        "20",
        "--n-cell-lines",
        "2",
        "--embedding-dim",
        "16",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    adata = ad.read_h5ad(out)
    assert adata.n_vars == 200
    assert list(adata.obs["cell_line"].cat.categories) == ["k562", "rpe1"]
    assert f"simulated {adata.n_obs:,} cells x 200 genes, 2 cell lines" in printed
    emb_path = tmp_path / "sim.embeddings.npz"
    with np.load(emb_path) as z:
        assert z["vectors"].shape == (13, 16)  # pool = round(12 * 320 / 300)
        assert str(z["source"]) == "simulated-genept"
    cfg = SimulatorConfig.from_dict(adata.uns["simulation"]["config"])
    assert (cfg.n_perturbations, cfg.n_doubles, cfg.cells_per_perturbation) == (12, 2, 8)

    # the same command again: refused without --overwrite (exit 2, one line), identical bytes with it
    before = _md5(out)
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--workers", "2", "--chunk-cells", "50"]) == 0
    assert _md5(out) == before


@pytest.mark.parametrize(("flag", "value"), [("--cross-line-correlation", "2"), ("--n-perturbations", "999")])
def test_cli_simulate_reports_bad_parameters(tmp_path, capsys, flag, value):
    assert main(["simulate", "--out", str(tmp_path / "x.h5ad"), "--n-genes", "300", flag, value]) == 2
    err = capsys.readouterr().err
    assert "invalid SimulatorConfig" in err
    assert not (tmp_path / "x.h5ad").exists()


def test_gene_symbols_are_unique_and_sorted():
    for n in (5, 9999, 12000):
        names = gene_symbols(n)
        assert len(set(names)) == n and list(names) == sorted(names)
    assert list(itertools.islice(gene_symbols(3), 3)) == ["GENE0001", "GENE0002", "GENE0003"]
