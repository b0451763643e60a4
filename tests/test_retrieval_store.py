"""The store on disk: build/load round trip, leakage guard, manifest checks, corruption, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from api.cli import main as cli_main
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    LeakageError,
    Manifest,
    StoreCorruptedError,
    StoreMismatchError,
    hash_pairs,
    hash_strings,
)
from retrieval_service.store import Store, build_store

D = 16
N_GENES = 40


def _inputs(seed: int = 0) -> dict:
    """30 single-gene entries in two cell types plus two combinations, with random arrays."""
    rng = np.random.default_rng(seed)
    genes = tuple(f"G{i}" for i in range(N_GENES))
    emb = GeneEmbeddings(genes, rng.standard_normal((N_GENES, D)).astype(np.float32), "test-emb")
    labels = [f"G{i}" for i in range(15)] * 2 + ["G1+G2", "G3+G4"]
    cell_types = ["K562"] * 15 + ["RPE1"] * 15 + ["K562", "RPE1"]
    n = len(labels)
    arrays = {
        "delta": rng.standard_normal((n, 7)).astype(np.float32),
        "n_cells": rng.integers(1, 100, n),
        "cells": rng.standard_normal((n, 3, 7)).astype(np.float16),
    }
    extras = {"control_mean": rng.standard_normal((2, 7)).astype(np.float32)}
    return {
        "cell_types": cell_types,
        "labels": labels,
        "arrays": arrays,
        "gene_embeddings": emb,
        "split_id": "split-a",
        "forbidden_pairs": [("K562", "G20"), ("RPE1", "G21+G22")],
        "extras": extras,
        "extras_meta": {"control_mean": {"cell_types": ["K562", "RPE1"]}},
        "attrs": {"feature_names": [f"f{i}" for i in range(7)], "note": "test"},
    }


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, dict]:
    kw = _inputs()
    out = build_store(tmp_path / "idx", **kw)
    return out, kw


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# --- round trip --------------------------------------------------------------------------------------------


def test_round_trip_arrays_entries_attrs(built: tuple[Path, dict]) -> None:
    out, kw = built
    store = Store.open(out)
    n = len(kw["labels"])
    assert len(store) == n
    assert store.cell_types.tolist() == kw["cell_types"]
    assert store.labels.tolist() == kw["labels"]
    ids = np.array([[3, 0, -1], [31, 17, 5]])
    got = store.get(ids)
    assert set(got) == {"delta", "n_cells", "cells"}
    for name, src in kw["arrays"].items():
        assert got[name].dtype == src.dtype
        assert got[name].shape == (2, 3, *src.shape[1:])
        np.testing.assert_array_equal(got[name][1], src[[31, 17, 5]])
        np.testing.assert_array_equal(got[name][0, :2], src[[3, 0]])
    assert np.isnan(got["delta"][0, 2]).all()  # padding row of a float array
    assert (got["n_cells"][0, 2] == 0).all()  # padding row of an int array
    # profile arrays are memory-mapped, not read into memory
    assert isinstance(store._arrays["delta"], np.memmap)
    assert isinstance(store.extra("control_mean"), np.memmap)
    np.testing.assert_array_equal(store.extra("control_mean"), kw["extras"]["control_mean"])
    assert store.extra_meta("control_mean") == {"cell_types": ["K562", "RPE1"]}
    assert store.attrs == kw["attrs"]
    cts, labs = store.entries(np.array([30, -1]))
    assert cts.tolist() == ["K562", None]
    assert labs.tolist() == ["G1+G2", None]


def test_manifest_records_what_was_built(built: tuple[Path, dict]) -> None:
    out, kw = built
    m = Manifest.load(out)
    emb = kw["gene_embeddings"]
    assert m.format_version == FORMAT_VERSION
    assert (m.embedding_source, m.embedding_dim, m.n_genes) == ("test-emb", D, N_GENES)
    assert m.gene_list_hash == hash_strings(emb.symbols)
    assert m.split_id == "split-a"
    assert (m.held_out_hash, m.held_out_count) == hash_pairs(kw["forbidden_pairs"])
    assert m.held_out_count == 2
    assert m.n_entries == 32
    assert m.cell_types == {"K562": 16, "RPE1": 16}
    assert m.arrays == {
        "delta": {"dtype": "<f4", "shape": [7]},
        "n_cells": {"dtype": "<i8", "shape": []},
        "cells": {"dtype": "<f2", "shape": [3, 7]},
    }
    assert m.feature_names_hash == hash_strings(kw["attrs"]["feature_names"])
    assert m.index_type == "flat"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(m.checksums) == [f for f in files if f != MANIFEST_NAME]
    assert {"keys.npy", "index.faiss", "embeddings.npz", "entries.json", "arrays/delta.npy"} <= set(m.checksums)
    # the keys are the normalised sums of the genes' vectors
    keys = np.load(out / "keys.npy")
    g1, g2 = emb.vector("G1"), emb.vector("G2")
    np.testing.assert_allclose(keys[30], (g1 + g2) / np.linalg.norm(g1 + g2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-6)


def test_search_by_label_finds_its_own_entry(built: tuple[Path, dict]) -> None:
    store = Store.open(built[0])
    scores, ids = store.search_labels(["G3", "G2+G1"], 2, cell_types="K562")
    assert ids[:, 0].tolist() == [3, 30]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    _, ids = store.search_labels(["G3", "G2+G1"], 2, cell_types="K562", exclude_self_cell_type="K562")
    assert 3 not in ids[0] and 30 not in ids[1]
    assert store.ids_for([("K562", "G2+G1"), ("RPE1", "G3"), ("RPE1", "nope")]).tolist() == [30, 18, -1]


def test_check_split_and_features(built: tuple[Path, dict]) -> None:
    out, kw = built
    store = Store.open(out)
    store.check_split("split-a", [("RPE1", "G22+G21"), ("K562", "G20")])  # order-free, gene-order-free
    with pytest.raises(StoreMismatchError, match=r"split id 'split-a', asked for 'split-b'.*ptrag index build"):
        store.check_split("split-b", kw["forbidden_pairs"])
    with pytest.raises(StoreMismatchError, match=r"2 held-out pairs recorded, 1 given"):
        store.check_split("split-a", kw["forbidden_pairs"][:1])
    store.check_features([f"f{i}" for i in range(7)])
    with pytest.raises(StoreMismatchError, match="other features"):
        store.check_features([f"f{i}" for i in range(6)])


def test_build_refuses_existing_directory_unless_overwrite(built: tuple[Path, dict]) -> None:
    out, kw = built
    with pytest.raises(FileExistsError, match="already exists"):
        build_store(out, **kw)
    kw2 = {**kw, "split_id": "split-b"}
    build_store(out, overwrite=True, **kw2)
    assert Manifest.load(out).split_id == "split-b"
    assert [p.name for p in out.parent.iterdir()] == ["idx"]  # no temporary directories left behind


# --- leakage guard -----------------------------------------------------------------------------------------


def test_leakage_refused_and_nothing_written(tmp_path: Path) -> None:
    kw = _inputs()
    kw["forbidden_pairs"] = [("RPE1", "G4"), ("K562", "G2+G1"), ("K562", "G99")]
    with pytest.raises(LeakageError, match=r"2 entries are held-out .*\('K562', 'G1\+G2'\).*\('RPE1', 'G4'\)"):
        build_store(tmp_path / "idx", **kw)
    assert list(tmp_path.iterdir()) == []


def test_build_validates_inputs_before_writing(tmp_path: Path) -> None:
    kw = _inputs()
    with pytest.raises(ValueError, match="appear more than once"):
        build_store(tmp_path / "a", **{**kw, "labels": [*kw["labels"][:-1], "G5"]})
    with pytest.raises(ValueError, match="first axis must be the 32 entries"):
        build_store(tmp_path / "b", **{**kw, "arrays": {"delta": np.zeros((31, 7))}})
    with pytest.raises(ValueError, match="L2-normalised"):
        build_store(tmp_path / "c", **kw, keys=np.ones((32, D), np.float32))
    with pytest.raises(ValueError, match="genes without an embedding"):
        build_store(tmp_path / "d", **{**kw, "labels": [*kw["labels"][:-1], "G3+NOPE"]})
    with pytest.raises(ValueError, match=r"array name '\.\./x'"):
        build_store(tmp_path / "e", **{**kw, "arrays": {"../x": np.zeros((32, 2))}})
    assert list(tmp_path.iterdir()) == []


# --- mismatch and corruption -------------------------------------------------------------------------------


def test_wrong_format_version_refused(built: tuple[Path, dict]) -> None:
    out, _ = built
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["format_version"] = 99
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(StoreMismatchError, match=r"format version 99.*reads version 1.*ptrag index build"):
        Store.open(out)


def test_wrong_dimension_in_manifest_refused(built: tuple[Path, dict]) -> None:
    out, _ = built
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["embedding_dim"] = 32
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(StoreCorruptedError, match=r"keys.npy is float32 \(32, 16\), manifest says float32 \(32, 32\)"):
        Store.open(out)
    m = Manifest.load(out)
    with pytest.raises(StoreMismatchError, match="queries have dimension 16 but the store's keys have dimension 32"):
        m.check_dim(16)


@pytest.mark.parametrize("rel", ["arrays/delta.npy", "index.faiss", "keys.npy", "entries.json"])
def test_flipped_byte_is_detected(built: tuple[Path, dict], rel: str) -> None:
    out, _ = built
    _flip_byte(out / rel)
    with pytest.raises(StoreCorruptedError, match=rf"{rel}: sha256 .* manifest says .*ptrag index build"):
        Store.open(out)


def test_truncated_file_detected_without_checksums(built: tuple[Path, dict]) -> None:
    out, _ = built
    path = out / "arrays" / "cells.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StoreCorruptedError, match=r"arrays/cells.npy: \d+ bytes, manifest says \d+"):
        Store.open(out, verify=False)


def test_missing_file_and_missing_manifest(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = built
    (out / "embeddings.npz").unlink()
    with pytest.raises(StoreCorruptedError, match=r"embeddings\.npz: missing"):
        Store.open(out)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"not an index directory \(no manifest.json\)"):
        Store.open(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Store.open(tmp_path / "nowhere")


def test_manifest_validation() -> None:
    good = {
        "embedding_source": "x",
        "embedding_dim": 4,
        "n_genes": 3,
        "gene_list_hash": hash_strings(["a"]),
        "split_id": "s",
        "held_out_count": 0,
        "held_out_hash": hash_pairs([])[0],
        "n_entries": 2,
        "cell_types": {"A": 2},
        "arrays": {},
    }
    assert Manifest(**good).n_entries == 2
    with pytest.raises(StoreMismatchError, match="index_type 'kd' not in"):
        Manifest(**good, index_type="kd")
    with pytest.raises(StoreMismatchError, match="cell_types count 3 != n_entries 2"):
        Manifest(**{**good, "cell_types": {"A": 3}})
    with pytest.raises(StoreMismatchError, match="gene_list_hash 'abc' is not"):
        Manifest(**{**good, "gene_list_hash": "abc"})


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_index_info(built: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = built
    assert cli_main(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "entries          32 (K562: 16, RPE1: 16)" in text
    assert "split            'split-a', 2 held-out pairs excluded" in text
    assert "OK, sha256 verified" in text
    assert cli_main(["index", "info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split("\nfiles ")[0])["n_entries"] == 32
    _flip_byte(out / "keys.npy")
    assert cli_main(["index", "info", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ptrag index: error:" in err and "keys.npy: sha256" in err and "ptrag index build" in err


def test_prefilter_is_a_choice_at_open(built: tuple[Path, dict]) -> None:
    from retrieval_service.app import Settings, open_from_settings

    out, _ = built
    auto, on, off = Store.open(out), Store.open(out, prefilter=True), Store.open(out, prefilter=False)
    assert auto.index._prefilter is None  # a small store: the plain scan
    assert on.index._prefilter is not None and off.index._prefilter is None
    q = np.asarray(on.index.keys[:1]) + np.float32(0.05)
    q /= np.linalg.norm(q)
    s_on, i_on = on.index.search(q, 5)
    s_off, i_off = off.index.search(q, 5)
    np.testing.assert_array_equal(i_on, i_off)
    np.testing.assert_allclose(s_on, s_off, atol=2e-6)
    assert on.index.prefilter_stats["certified"] == 1
    served = open_from_settings(Settings(index_dir=out, prefilter=True))  # PTRAG_PREFILTER reaches the store
    assert served.index._prefilter is not None
