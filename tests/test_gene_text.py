"""The GenePT text recipe with the local MiniLM model: text loading, the per-gene cache, real-model checks, CLI."""

from __future__ import annotations

import gzip
import json
import warnings
import zlib

import numpy as np
import pytest
from conftest import shared_file

import model.data.gene_text as gt
from api.cli import main
from model.data.gene_text import default_model_path, embed_gene_texts, load_gene_texts
from retrieval_service.embeddings import GeneEmbeddings, load_embeddings

# --- text files ------------------------------------------------------------------------------------------


def test_load_gene_texts_precedence_blanks_and_origin(tmp_path):
    first = tmp_path / "genept.json"
    first.write_text(json.dumps({"A": "text A from genept", "B": "  "}))
    second = tmp_path / "go.json.gz"
    with gzip.open(second, "wt", encoding="utf-8") as fh:
        json.dump({"A": "text A from GO", "B": "text B from GO", "C": "text C"}, fh)

    texts, origin = load_gene_texts(first, second, return_origin=True)
    assert texts == {"A": "text A from genept", "B": "text B from GO", "C": "text C"}
    assert origin == {"A": str(first), "B": str(second), "C": str(second)}
    assert load_gene_texts(second, first)["A"] == "text A from GO"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", r"bad\.json: expected a JSON object \{symbol: text\}, found a list"),
        ('{"A": 1}', r"bad\.json: 1 values are not strings \(e\.g\. \['A'\]\)"),
        ('{"A": "trunc', r"bad\.json: unreadable gene-text file \(JSONDecodeError"),
    ],
)
def test_load_gene_texts_rejects_bad_files(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_gene_texts(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_gene_texts(tmp_path / "missing.json")


def test_default_model_path_is_the_packaged_minilm():
    path = default_model_path()
    assert path.name == "model"
    assert (path / "model.safetensors").exists()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


# --- cache, with a counting encoder ----------------------------------------------------------------------


class CountingEncoder:
    """A deterministic fake model: the vector is a hash of the text; counts calls and texts seen."""

    def __init__(self, dim: int = 6) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.dim) for t in texts])


def test_cache_second_run_does_not_call_the_encoder(tmp_path):
    texts = {f"G{i}": f"gene {i} does thing {i}" for i in range(10)}
    enc = CountingEncoder()
    first = embed_gene_texts(texts, encoder=enc, model_id="fake", batch_size=4, cache_dir=tmp_path, show_progress=False)
    assert [len(c) for c in enc.calls] == [4, 4, 2]
    assert first.symbols == tuple(texts)
    assert first.source == "sentence:fake"
    np.testing.assert_allclose(np.linalg.norm(first.vectors, axis=1), 1.0, atol=1e-6)
    assert (tmp_path / "gene_text_fake.npz").exists()

    enc.calls.clear()
    again = embed_gene_texts(texts, encoder=enc, model_id="fake", batch_size=4, cache_dir=tmp_path, show_progress=False)
    assert enc.calls == []
    np.testing.assert_array_equal(again.vectors, first.vectors)

    # A changed text and a new gene are the only work; the others come from the cache.
    texts2 = {**texts, "G3": "gene 3 was re-annotated", "NEW": "a new gene"}
    third = embed_gene_texts(
        texts2, encoder=enc, model_id="fake", batch_size=4, cache_dir=tmp_path, show_progress=False
    )
    assert sorted(enc.calls[0]) == ["a new gene", "gene 3 was re-annotated"]
    assert len(enc.calls) == 1
    np.testing.assert_array_equal(third.vector("G0"), first.vector("G0"))
    assert not np.allclose(third.vector("G3"), first.vector("G3"))

    # Another model id never reuses these vectors.
    enc.calls.clear()
    embed_gene_texts(texts, encoder=enc, model_id="other", cache_dir=tmp_path, show_progress=False)
    assert sum(len(c) for c in enc.calls) == 10


def test_identical_texts_are_embedded_once_and_blank_ones_named(tmp_path):
    enc = CountingEncoder()
    with pytest.warns(UserWarning, match=r"1 genes have blank text and are not embedded: \['C'\]"):
        emb = embed_gene_texts({"A": "same", "B": "same", "C": " "}, encoder=enc, model_id="f", show_progress=False)
    assert enc.calls == [["same"]]
    assert emb.symbols == ("A", "B")
    np.testing.assert_array_equal(emb.vector("A"), emb.vector("B"))


def test_interrupted_run_keeps_finished_batches(tmp_path):
    texts = {f"G{i}": f"text {i}" for i in range(6)}
    enc = CountingEncoder()

    def flaky(batch: list[str]) -> np.ndarray:
        if len(enc.calls) == 1:
            raise KeyboardInterrupt
        return enc(batch)

    with pytest.raises(KeyboardInterrupt):
        embed_gene_texts(texts, encoder=flaky, model_id="f", batch_size=3, cache_dir=tmp_path, show_progress=False)
    enc.calls.clear()
    embed_gene_texts(texts, encoder=enc, model_id="f", batch_size=3, cache_dir=tmp_path, show_progress=False)
    assert [len(c) for c in enc.calls] == [3]  # only the batch that never finished


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    (tmp_path / "gene_text_f.npz").write_bytes(b"not a zip")
    enc = CountingEncoder()
    with pytest.warns(UserWarning, match="ignoring unreadable embedding cache"):
        embed_gene_texts({"A": "a"}, encoder=enc, model_id="f", cache_dir=tmp_path, show_progress=False)
    assert len(enc.calls) == 1
    enc.calls.clear()
    embed_gene_texts({"A": "a"}, encoder=enc, model_id="f", cache_dir=tmp_path, show_progress=False)
    assert enc.calls == []


def test_argument_checks():
    with pytest.raises(ValueError, match="pass model_id together with encoder"):
        embed_gene_texts({"A": "a"}, encoder=CountingEncoder())
    with pytest.raises(ValueError, match="no gene texts to embed"):
        embed_gene_texts({}, encoder=CountingEncoder(), model_id="f")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        embed_gene_texts({"A": "a"}, encoder=CountingEncoder(), model_id="f", batch_size=0)


# --- the real MiniLM model -------------------------------------------------------------------------------


def test_minilm_embeds_offline_and_the_cache_skips_the_model(tmp_path, monkeypatch):
    texts = {
        "SEC61B": "Protein transport protein Sec61 subunit beta, part of the ER protein translocon.",
        "SEC61G": "Protein transport protein Sec61 subunit gamma, part of the ER protein translocon.",
        "HBB": "Hemoglobin subunit beta, carries oxygen in red blood cells.",
    }
    emb = embed_gene_texts(texts, cache_dir=tmp_path, show_progress=False)
    assert emb.source == "minilm:all-MiniLM-L6-v2"
    assert emb.vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    cos = emb.vectors @ emb.vectors.T
    assert cos[0, 1] > cos[0, 2] + 0.2

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load when every text is cached")

    monkeypatch.setattr(gt, "_sentence_encoder", no_model)
    again = embed_gene_texts(texts, cache_dir=tmp_path, show_progress=False)
    np.testing.assert_array_equal(again.vectors, emb.vectors)


def _upper(v: np.ndarray) -> np.ndarray:
    return (v @ v.T)[np.triu_indices(len(v), 1)]


def test_minilm_recipe_agrees_with_real_genept():
    """MiniLM on GenePT's own texts vs GenePT's ada-002 vectors: similar genes stay similar.

    Measured here: Pearson 0.586 over the 3,655 pairs of the 86 Adamson genes (the data README reports 0.58).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dropped all-zero `ctrl` row
        ada = load_embeddings(shared_file("genept_ada_adamson_86genes.csv.gz"))
    texts = load_gene_texts(shared_file("genept_gene_summaries_1915.json"))
    genes = [g for g in ada.symbols if g in texts]
    assert len(genes) == 86

    mini = embed_gene_texts({g: texts[g] for g in genes}, show_progress=False)
    r = float(np.corrcoef(_upper(ada.subset(genes).vectors), _upper(mini.vectors))[0, 1])
    print(f"MiniLM vs GenePT ada-002 pairwise-cosine Pearson r = {r:.3f} on {len(genes)} genes")
    assert r > 0.4
    # A shuffled gene order destroys the agreement, so r measures the recipe, not the shape of the cone.
    perm = np.random.default_rng(0).permutation(len(genes))
    r_null = float(np.corrcoef(_upper(ada.subset(genes).vectors), _upper(mini.vectors[perm]))[0, 1])
    assert abs(r_null) < 0.15


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_embed_genes_end_to_end(tmp_path, capsys):
    genept = tmp_path / "genept.json"
    genept.write_text(json.dumps({"SEC61B": "Sec61 translocon subunit beta.", "HBB": "Hemoglobin beta."}))
    fallback = tmp_path / "go.json.gz"
    with gzip.open(fallback, "wt", encoding="utf-8") as fh:
        json.dump({"HBB": "ignored: genept wins", "SEC61G": "Sec61 translocon subunit gamma."}, fh)
    out = tmp_path / "emb.npz"
    args = ["embed-genes", "--text", str(genept), "--text", str(fallback), "--out", str(out)]
    args += ["--genes", "SEC61B,SEC61G,HBB,NOTEXT", "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2"]

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "embedded 3 genes (minilm:all-MiniLM-L6-v2, dim 384)" in printed
    assert f"  2 from {genept}" in printed
    assert f"  1 from {fallback}" in printed
    assert "1 requested genes have no text: NOTEXT" in printed

    emb = GeneEmbeddings.from_npz(out)
    assert emb.symbols == ("SEC61B", "SEC61G", "HBB")
    assert emb.dim == 384
    assert emb.vector("SEC61B") @ emb.vector("SEC61G") > emb.vector("SEC61B") @ emb.vector("HBB")

    (tmp_path / "list.txt").write_text("NOTEXT\n\nALSO_NOT\n")
    bad = ["embed-genes", "--text", str(genept), "--out", str(tmp_path / "x.npz"), "--genes-file"]
    assert main([*bad, str(tmp_path / "list.txt")]) == 2
    assert "none of the 2 requested genes has text" in capsys.readouterr().err
