"""The model-side index builder: only training pairs are stored, held-out pairs are unreachable."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_toy_perturbseq

from model.data.profiles import compute_profiles
from model.data.splits import make_split
from model.index_build import build_perturbation_index
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.manifest import LeakageError
from retrieval_service.store import Store, build_store


@pytest.fixture
def toy_parts():
    adata = make_toy_perturbseq(
        n_genes=30, perturbations=(*tuple(f"GENE{i:02d}" for i in range(1, 11)), "GENE01+GENE02")
    )
    profiles = compute_profiles(adata, n_sample_cells=4)
    rng = np.random.default_rng(0)
    emb = GeneEmbeddings(tuple(f"GENE{i:02d}" for i in range(30)), rng.normal(size=(30, 8)), "toy")
    split = make_split(profiles, kind="fewshot_celltype", target_cell_type="rpe1", test_frac=0.3, val_frac=0.1)
    return profiles, emb, split


def test_store_holds_exactly_the_training_pairs(tmp_path, toy_parts):
    profiles, emb, split = toy_parts
    out = build_perturbation_index(profiles, emb, split, tmp_path / "idx")
    store = Store.open(out)
    stored = set(zip(map(str, store.cell_types), map(str, store.labels), strict=True))
    assert stored == set(split.train)
    assert not stored & split.held_out
    assert store.manifest.split_id == split.split_id
    store.check_split(split.split_id, split.held_out)
    # Cached profiles are the pairs' own deltas, and controls are kept per cell type.
    i = int(store.ids_for([split.train[0]])[0])
    row = profiles.obs.index.get_loc(f"{split.train[0][0]}|{split.train[0][1]}")
    np.testing.assert_allclose(store.get([i], ["delta"])["delta"][0], profiles.layers["delta"][row])
    assert store.extra_meta("control_mean")["cell_types"] == ["k562", "rpe1"]
    assert store.attrs["feature_names"] == list(profiles.var_names)
    # A query for a held-out pair never returns its own profile: it is not there.
    for pair in split.held_out:
        assert store.ids_for([pair])[0] == -1
        _, ids = store.search_labels([pair[1]], k=len(store))
        cts, labels = store.entries(ids[0])
        assert (pair[0], pair[1]) not in set(zip(cts, labels, strict=True))


def test_missing_embeddings_are_named_and_left_out(tmp_path, toy_parts):
    profiles, emb, split = toy_parts
    partial = emb.subset([s for s in emb.symbols if s != "GENE03"])
    with pytest.warns(UserWarning, match=r"GENE03"):
        out = build_perturbation_index(profiles, partial, split, tmp_path / "idx")
    assert "GENE03" not in set(map(str, Store.open(out).labels))
    assert Store.open(out).attrs["genes_without_embedding"] == ["GENE03"]


def test_leaky_entries_are_refused_and_nothing_is_written(tmp_path, toy_parts):
    _profiles, emb, split = toy_parts
    leaked = sorted(split.held_out)[0]
    vectors, _ = emb.perturbation_vectors([tuple(leaked[1].split("+"))])
    with pytest.raises(LeakageError, match="held-out"):
        build_store(
            tmp_path / "leaky",
            cell_types=[leaked[0]],
            labels=[leaked[1]],
            keys=vectors,
            arrays={"delta": np.zeros((1, 3), np.float32)},
            gene_embeddings=emb,
            split_id=split.split_id,
            forbidden_pairs=split.held_out,
        )
    assert not list(tmp_path.iterdir())
