"""Gene-embedding tables: loaders, aliases, coverage, merging, data-derived vectors and the ridge imputation."""

from __future__ import annotations

import gzip
import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file

from model.data.data_embedding import data_derived_embeddings, fit_ridge_map, impute_missing_embeddings
from retrieval_service.embeddings import (
    GeneEmbeddings,
    aliases_from_gene_text,
    l2_normalize,
    load_aliases,
    load_embeddings,
    merge_embeddings,
)

GENES = ["TP53", "AARS1", "MAP3K21", "GATA1", "MYC"]


def _table(rng: np.random.Generator, n: int = 5, d: int = 8) -> dict[str, list[float]]:
    vecs = rng.normal(size=(n, d))
    return {g: vecs[i].tolist() for i, g in enumerate(GENES[:n])}


# --- loaders: synthetic files --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dict-list", "dict-array", "frame", "series", "gz"])
def test_pickle_formats_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    table = _table(rng)
    expected = np.asarray(list(table.values()), dtype=np.float32)
    obj: object = table
    if kind == "dict-array":
        obj = {g: np.asarray(v) for g, v in table.items()}
    elif kind == "frame":
        obj = pd.DataFrame(expected, index=list(table))
    elif kind == "series":
        obj = pd.Series({g: np.asarray(v) for g, v in table.items()})
    path = tmp_path / ("emb.pkl.gz" if kind == "gz" else "emb.pkl")
    with (gzip.open if kind == "gz" else open)(path, "wb") as fh:
        pickle.dump(obj, fh)

    emb = load_embeddings(path)
    assert emb.symbols == tuple(GENES)
    assert emb.dim == 8
    np.testing.assert_allclose(emb.vectors, expected, rtol=1e-6)
    assert emb.source == "emb"


def test_pickle_frame_with_genes_as_columns_is_transposed(tmp_path):
    vecs = np.random.default_rng(1).normal(size=(3, 6))
    frame = pd.DataFrame(vecs.T, columns=["A", "B", "C"])  # (dim, genes), RangeIndex rows
    path = tmp_path / "cols.pkl"
    frame.to_pickle(path)
    emb = load_embeddings(path)
    assert emb.symbols == ("A", "B", "C")
    np.testing.assert_allclose(emb.vectors, vecs, rtol=1e-6)


@pytest.mark.parametrize(("name", "sep"), [("emb.csv", ","), ("emb.tsv", "\t"), ("emb.csv.gz", ",")])
def test_table_formats(tmp_path, name, sep):
    vecs = np.random.default_rng(2).normal(size=(4, 5)).astype(np.float32)
    pd.DataFrame(vecs, index=GENES[:4]).to_csv(tmp_path / name, sep=sep)
    emb = load_embeddings(tmp_path / name)
    assert emb.symbols == tuple(GENES[:4])
    np.testing.assert_allclose(emb.vectors, vecs, rtol=1e-6)


def test_npz_round_trip_keeps_source_and_gene_sources(tmp_path):
    vecs = np.random.default_rng(3).normal(size=(3, 4))
    emb = GeneEmbeddings(("A", "B", "C"), vecs, "genept", ("genept", "genept", "minilm"))
    path = emb.save_npz(tmp_path / "e.npz")
    back = load_embeddings(path)
    assert back.symbols == emb.symbols
    np.testing.assert_array_equal(back.vectors, emb.vectors)
    assert back.source == "genept"
    assert back.gene_sources == ("genept", "genept", "minilm")
    assert back.source_of("C") == "minilm"
    plain = GeneEmbeddings.from_npz(GeneEmbeddings(("A",), vecs[:1], "x").save_npz(tmp_path / "p.npz"))
    assert plain.gene_sources is None
    assert plain.source_of("A") == "x"
    assert load_embeddings(path, source="relabelled").source == "relabelled"


def test_zero_rows_are_dropped_with_a_warning_naming_them(tmp_path):
    vecs = np.random.default_rng(4).normal(size=(3, 4))
    vecs[1] = 0.0
    pd.DataFrame(vecs, index=["A", "ctrl", "B"]).to_csv(tmp_path / "z.csv")
    with pytest.warns(UserWarning, match=r"dropped 1 all-zero rows.*'ctrl'"):
        emb = load_embeddings(tmp_path / "z.csv")
    assert emb.symbols == ("A", "B")
    kept = load_embeddings(tmp_path / "z.csv", drop_zero=False)
    assert "ctrl" in kept


# --- loaders: bad files ----------------------------------------------------------------------------------


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _good_pickle_bytes() -> bytes:
    return pickle.dumps(_table(np.random.default_rng(5)))


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("empty.pkl", lambda: b"", r"empty\.pkl: empty file"),
        ("trunc.pkl", lambda: _good_pickle_bytes()[:40], r"trunc\.pkl: truncated or corrupt pickle"),
        ("junk.pkl", lambda: b"\x00\x01not a pickle at all", r"junk\.pkl: truncated or corrupt pickle"),
        ("list.pkl", lambda: pickle.dumps([1.0, 2.0]), r"list\.pkl: pickle holds a list; expected a pickled"),
        ("nogenes.pkl", lambda: pickle.dumps({}), r"nogenes\.pkl: the pickle holds no genes"),
        (
            "ragged.pkl",
            lambda: pickle.dumps({"A": [1.0, 2.0, 3.0], "B": [1.0, 2.0, 3.0], "C": [1.0, 2.0]}),
            r"ragged\.pkl: ragged vectors, expected every gene to have 3 values; 1 differ \(e\.g\. \['C'\]\)",
        ),
        ("text.pkl", lambda: pickle.dumps({"A": ["x", "y"]}), r"text\.pkl: non-numeric embedding values"),
        (
            "nan.pkl",
            lambda: pickle.dumps({"A": [1.0, float("nan")], "B": [1.0, 0.0]}),
            r"nan\.pkl: 1 embedding vectors contain NaN or inf \(e\.g\. \['A'\]\)",
        ),
        ("trunc.csv.gz", lambda: gzip.compress(b",0,1\nA,1,2\nB,3,4\n" * 50)[:30], r"trunc\.csv\.gz: unreadable csv"),
        ("dupes.csv", lambda: b",0,1\nA,1,2\nB,3,4\nA,5,6\n", r"dupes\.csv: duplicate gene symbols.*'A'"),
        ("header.csv", lambda: b",0,1\n", r"header\.csv: table of shape \(0, 2\) holds no vectors"),
        ("words.csv", lambda: b",0,1\nA,x,y\n", r"words\.csv: non-numeric embedding values"),
        ("bad.npz", lambda: b"PK\x03\x04 truncated zip", r"bad\.npz: could not read gene-embedding \.npz"),
        ("emb.parquet", lambda: b"x", r"cannot tell the embedding format"),
    ],
)
def test_bad_files_raise_value_error_naming_the_file(tmp_path, name, make, match):
    path = _write(tmp_path / name, make())
    with pytest.raises(ValueError, match=match):
        load_embeddings(path)


def test_npz_without_required_keys(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz: not a gene-embedding \.npz.*found \['weights'\]"):
        load_embeddings(path)


def test_all_zero_table_and_missing_file(tmp_path):
    pd.DataFrame(np.zeros((2, 3)), index=["A", "B"]).to_csv(tmp_path / "zeros.csv")
    with pytest.raises(ValueError, match="every vector is all-zero"):
        load_embeddings(tmp_path / "zeros.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        load_embeddings(tmp_path / "nope.pkl")


# --- the real GenePT file --------------------------------------------------------------------------------


def test_real_genept_adamson_csv():
    path = shared_file("genept_ada_adamson_86genes.csv.gz")
    with pytest.warns(UserWarning, match=r"\['ctrl'\]"):
        emb = load_embeddings(path)
    assert len(emb) == 86
    assert "ctrl" not in emb
    assert emb.dim == 1536
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-4)
    # ada-002 puts all texts in a narrow cone (mean cosine ~0.83); no two genes share a vector, and the
    # closest pair is two subunits of the same translocon.
    cos = emb.vectors @ emb.vectors.T
    off = cos[np.triu_indices(len(emb), 1)]
    assert off.max() < 0.999
    assert 0.75 < off.mean() < 0.9
    np.fill_diagonal(cos, -1.0)
    assert emb.symbols[int(np.argmax(cos[emb.symbols.index("SEC61B")]))] == "SEC61G"


# --- lookup, aliases, coverage ---------------------------------------------------------------------------


def _small() -> GeneEmbeddings:
    # Symbols as GenePT stores them: some are outdated (KIAA1804 is now MAP3K21).
    vecs = l2_normalize(np.eye(4, 6))
    return GeneEmbeddings(("TP53", "AARS1", "KIAA1804", "MYC"), vecs, "toy")


def test_lookup_resolves_aliases_in_both_directions_and_names_missing():
    emb = _small()
    aliases = {"AARS": "AARS1", "KIAA1804": "MAP3K21"}
    with pytest.warns(UserWarning, match=r"2 genes have no embedding in 'toy' and are excluded: GATA1, NOPE"):
        res = emb.lookup(["MYC", "AARS", "MAP3K21", "GATA1", "NOPE"], aliases=aliases)
    assert res.found == ["MYC", "AARS", "MAP3K21"]
    assert res.via_alias == {"AARS": "AARS1", "MAP3K21": "KIAA1804"}
    assert res.missing == ["GATA1", "NOPE"]
    np.testing.assert_array_equal(res.vectors, emb.vectors[[3, 1, 2]])
    assert emb.resolve("MAP3K21", aliases=aliases) == "KIAA1804"
    assert emb.resolve("MAP3K21") is None


def test_coverage_report_contents():
    emb = _small()
    rep = emb.coverage(["MYC", "AARS", "GATA1", "MYC", "ZZZ", "TP53"], aliases={"AARS": "AARS1"})
    assert rep.n_query == 5  # MYC counted once
    assert rep.n_found == 3
    assert rep.n_via_alias == 1
    assert rep.missing == ["GATA1", "ZZZ"]
    assert rep.alias_used == {"AARS": "AARS1"}
    assert rep.fraction == pytest.approx(0.6)
    text = rep.summary()
    assert "3/5 genes (60.0%), 1 through an alias" in text
    assert "AARS->AARS1" in text
    assert "missing (2): GATA1, ZZZ" in text


def test_load_aliases_json_and_csv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"AARS": "AARS1", "X": "X"}))
    assert load_aliases(tmp_path / "a.json") == {"AARS": "AARS1"}
    (tmp_path / "a.csv").write_text("old,new\nAARS,AARS1\nKIAA1804,MAP3K21\n")
    assert load_aliases(tmp_path / "a.csv") == {"AARS": "AARS1", "KIAA1804": "MAP3K21"}
    (tmp_path / "b.csv").write_text("AARS,AARS1\n")
    assert load_aliases(tmp_path / "b.csv") == {"AARS": "AARS1"}
    (tmp_path / "c.csv").write_text("AARS,AARS1,extra\n")
    with pytest.raises(ValueError, match=r"c\.csv: expected 2 columns"):
        load_aliases(tmp_path / "c.csv")
    (tmp_path / "d.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"d\.json: expected a JSON object"):
        load_aliases(tmp_path / "d.json")


def test_aliases_from_gene_text_rules():
    texts = {
        "AARS1": "Gene AARS1: alanyl-tRNA synthetase 1. Also known as AARS, CMT2N. Molecular function: x.",
        "SARS1": "Gene SARS1: seryl. Also known as SARS, SERS. Biological process: y.",
        "SARS2": "Gene SARS2: seryl mito. Also known as SARS, SARSM. Biological process: y.",
        "GENEA": "Gene GENEA: a. Also known as SHARED, dJ862P8.3.",
        "GENEB": "Gene GENEB: b. Also known as SHARED, GENEA.",
    }
    al = aliases_from_gene_text(texts)
    assert al["AARS"] == "AARS1"
    assert al["SARS"] == "SARS1"  # the X -> X1 rename wins over the paralog
    assert al["SARSM"] == "SARS2"
    assert al["dJ862P8.3"] == "GENEA"  # dots inside an alias do not end the list
    assert "SHARED" not in al  # ambiguous
    assert "GENEA" not in al  # a current symbol is never an alias


def test_aliases_from_real_gene_text_resolve_genept_old_symbols():
    al = aliases_from_gene_text(shared_file("gene_text_orgHs_GO.json.gz"))
    assert al["AARS"] == "AARS1"
    assert al["SLMO2"] == "PRELID3B"
    assert al["SARS"] == "SARS1"
    assert "TP53" not in al


# --- merging ---------------------------------------------------------------------------------------------


def test_merge_fills_missing_and_records_sources():
    a = GeneEmbeddings(("A", "B"), np.eye(2, 3), "genept")
    b = GeneEmbeddings(("B", "C", "D"), np.full((3, 3), 0.5), "minilm")
    m = merge_embeddings(a, b)
    assert m.symbols == ("A", "B", "C", "D")
    np.testing.assert_array_equal(m.vector("B"), np.eye(2, 3)[1])  # primary wins
    assert m.gene_sources == ("genept", "genept", "minilm", "minilm")
    assert m.source == "genept+minilm"
    only_c = merge_embeddings(a, b, genes=["C", "Z"])
    assert only_c.symbols == ("A", "B", "C")
    with pytest.raises(ValueError, match=r"different dimension: 'genept' is 3-d, 'x' is 2-d"):
        merge_embeddings(a, GeneEmbeddings(("C",), np.ones((1, 2)), "x"))


# --- data-derived embeddings -----------------------------------------------------------------------------


def _synthetic_adata(seed: int = 0) -> ad.AnnData:
    """Controls in two cell types: genes 0-9 share program A, 10-19 program B, 20-29 are noise.

    Cell type "T2" is shifted on genes 0 and 10 together, and perturbed cells move genes 0 and 20 together:
    neither must look like co-variation once controls are centred per cell type.
    """
    rng = np.random.default_rng(seed)
    n_ctrl, n_pert, n_genes = 400, 200, 30
    a, b = rng.normal(size=(n_ctrl, 1)), rng.normal(size=(n_ctrl, 1))
    x = rng.normal(scale=0.5, size=(n_ctrl, n_genes))
    x[:, :10] += a
    x[:, 10:20] += b
    cell = np.where(np.arange(n_ctrl) % 2 == 0, "T1", "T2")
    x[cell == "T2", 0] += 6.0
    x[cell == "T2", 10] += 6.0
    xp = rng.normal(scale=0.5, size=(n_pert, n_genes))
    shift = rng.normal(scale=5.0, size=n_pert)
    xp[:, 0] += shift
    xp[:, 20] += shift
    obs = pd.DataFrame(
        {
            "gene": ["non-targeting"] * n_ctrl + ["KD"] * n_pert,
            "cell_line": list(cell) + ["T1"] * n_pert,
        },
        index=[f"c{i}" for i in range(n_ctrl + n_pert)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(np.vstack([x, xp]).astype(np.float32), obs=obs, var=var)


def test_data_derived_embeddings_capture_co_variation():
    adata = _synthetic_adata()
    emb = data_derived_embeddings(adata, n_comps=10, rng=0)
    assert len(emb) == 30
    assert emb.dim == 10
    assert emb.source == "data-pca10"
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    cos = emb.vectors @ emb.vectors.T
    same_a = cos[np.ix_(range(1, 10), range(1, 10))][np.triu_indices(9, 1)]
    assert same_a.min() > 0.8
    assert abs(cos[1, 11]) < 0.3  # programs A and B are independent
    assert abs(cos[0, 10]) < 0.3  # the cell-type shift was centred away
    assert abs(cos[0, 20]) < 0.3  # perturbed cells are not used
    assert cos[0, 1] > 0.8


def test_data_derived_without_per_type_centring_is_fooled_by_the_shift():
    # The counterpart of the test above: pooling without centring per cell type makes genes 0 and 10 look alike.
    adata = _synthetic_adata()
    emb = data_derived_embeddings(adata, n_comps=10, cell_type_col=None, rng=0)
    assert emb.vector("g0") @ emb.vector("g10") > 0.5


def test_data_derived_names_genes_it_cannot_embed():
    adata = _synthetic_adata()
    adata.X[:, 5] = 1.0  # constant
    with pytest.warns(UserWarning, match=r"1 genes are not in var_names.*NOTAGENE"):
        with pytest.warns(UserWarning, match=r"1 genes do not vary in the control cells.*g5"):
            emb = data_derived_embeddings(adata, ["g1", "NOTAGENE", "g5", "g12"], n_comps=5, rng=0)
    assert emb.symbols == ("g1", "g12")
    with pytest.raises(ValueError, match=r"obs has no column 'perturbation'"):
        data_derived_embeddings(adata, pert_col="perturbation")
    with pytest.raises(ValueError, match="need at least 3 control cells"):
        data_derived_embeddings(adata, control_label="ctrl")


def test_data_derived_embeddings_are_reproducible_with_rng():
    adata = _synthetic_adata()
    a = data_derived_embeddings(adata, n_comps=8, rng=np.random.default_rng(7))
    b = data_derived_embeddings(adata, n_comps=8, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.vectors, b.vectors)


# --- ridge imputation into the primary space -------------------------------------------------------------


def test_fit_ridge_map_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w = rng.normal(size=(5, 3))
    y = x @ w + 2.0
    coef, intercept, _ = fit_ridge_map(x, y, alpha=1e-8)
    np.testing.assert_allclose(coef, w, atol=1e-6)
    np.testing.assert_allclose(intercept, 2.0, atol=1e-6)
    _, _, chosen = fit_ridge_map(x, y + rng.normal(scale=0.1, size=y.shape))
    assert chosen <= 1.0  # clean, well-determined data: the LOO choice is a small penalty


def test_impute_recovers_held_out_genes_better_than_chance():
    rng = np.random.default_rng(1)
    n_genes, latent = 300, 8
    z = rng.normal(size=(n_genes, latent))
    names = tuple(f"G{i}" for i in range(n_genes))
    primary_all = l2_normalize(z @ rng.normal(size=(latent, 64)) + 0.3 * rng.normal(size=(n_genes, 64)))
    derived = GeneEmbeddings(
        names, l2_normalize(z @ rng.normal(size=(latent, 16)) + 0.3 * rng.normal(size=(n_genes, 16))), "data-pca16"
    )
    held = rng.choice(n_genes, 60, replace=False)
    keep = np.setdiff1d(np.arange(n_genes), held)
    primary = GeneEmbeddings(tuple(names[i] for i in keep), primary_all[keep], "genept")

    with pytest.warns(UserWarning, match=r"60 genes lack a 'genept' vector and get one imputed from 'data-pca16'"):
        out = impute_missing_embeddings(primary, derived)
    assert len(out) == n_genes
    held_names = [names[i] for i in held]
    assert {out.source_of(g) for g in held_names} == {"ridge(data-pca16->genept)"}
    assert out.source_of(names[keep[0]]) == "genept"
    np.testing.assert_array_equal(out.vector(names[keep[0]]), primary_all[keep[0]])
    imputed = out.subset(held_names).vectors
    np.testing.assert_allclose(np.linalg.norm(imputed, axis=1), 1.0, atol=1e-5)
    truth = primary_all[held]
    hit = np.sum(imputed * truth, axis=1)  # cosine to the gene's own true vector
    chance = np.sum(imputed * truth[rng.permutation(len(held))], axis=1)  # to another held-out gene's
    assert hit.mean() > 0.7
    assert hit.mean() > chance.mean() + 0.5
    # Nearest true vector among the held-out genes is the right gene for most of them.
    top1 = np.mean(np.argmax(imputed @ truth.T, axis=1) == np.arange(len(held)))
    assert top1 > 0.5


def test_impute_guards():
    primary = GeneEmbeddings(("A", "B"), np.eye(2, 4), "genept")
    derived = GeneEmbeddings(("A", "B", "C"), np.eye(3, 3), "data")
    with pytest.raises(ValueError, match=r"only 2 genes have both a 'genept' and a 'data' vector"):
        impute_missing_embeddings(primary, derived)
    assert impute_missing_embeddings(primary, derived, ["A", "B"]) is primary
    with pytest.warns(UserWarning, match=r"neither a primary nor a data-derived embedding.*ZZZ"):
        assert impute_missing_embeddings(primary, derived, ["A", "ZZZ"]) is primary
