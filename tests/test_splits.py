"""Splits: protocols, disjointness, held-out pairs, seeds, persistence."""

from __future__ import annotations

import json

import anndata as ad
import pytest
from conftest import make_toy_perturbseq

from model.data.errors import PerturbDataError
from model.data.splits import Split, make_split

GENES = [f"G{i}" for i in range(40)]
PAIRS = [(ct, g) for ct in ("k562", "rpe1", "jurkat", "hepg2") for g in GENES] + [
    (ct, f"G{i}+G{i + 1}") for ct in ("k562", "rpe1") for i in range(0, 20, 2)
]


def _check_disjoint(split: Split) -> None:
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(PAIRS)


def test_fewshot_celltype_protocol():
    split = make_split(PAIRS, kind="fewshot_celltype", target_cell_type="rpe1", seed=0)
    _check_disjoint(split)
    assert {c for c, _ in split.test} == {"rpe1"} and {c for c, _ in split.val} == {"rpe1"}
    n_target = sum(1 for c, _ in PAIRS if c == "rpe1")  # 50
    assert len(split.test) == 15 and len(split.val) == round(0.05 * n_target)
    # The held-out genes stay in training in the other cell types (few-shot transfer).
    for _, pert in split.test:
        assert ("k562", pert) in split.train
    assert split.held_out == frozenset(split.val) | frozenset(split.test)


def test_zeroshot_celltype_holds_out_the_whole_target():
    split = make_split(PAIRS, kind="zeroshot_celltype", target_cell_type="hepg2", seed=1)
    _check_disjoint(split)
    assert not any(c == "hepg2" for c, _ in split.train)
    assert len(split.val) + len(split.test) == 40


def test_unseen_perturbation_holds_genes_out_everywhere():
    split = make_split(PAIRS, kind="unseen_perturbation", seed=2, test_frac=0.25, val_frac=0.05)
    _check_disjoint(split)
    train_genes = {g for _, p in split.train for g in p.split("+")}
    held = {p for _, p in split.test if "+" not in p} | {p for _, p in split.val if "+" not in p}
    assert held and not (held & train_genes)
    # Every cell type's copy of a held-out single gene is held out.
    for _, p in split.test:
        if "+" not in p:
            assert all((ct, p) in split.test for ct in ("k562", "rpe1", "jurkat", "hepg2"))
    cats = set(split.categories.values())
    assert "unseen_single" in cats and "combo_seen_genes" in cats
    for key, cat in split.categories.items():
        _, pert = key.split("|")
        if cat == "combo_seen_genes":
            assert set(pert.split("+")) <= train_genes


def test_seeds_reproduce_and_differ():
    a = make_split(PAIRS, kind="fewshot_celltype", target_cell_type="k562", seed=5)
    b = make_split(PAIRS, kind="fewshot_celltype", target_cell_type="k562", seed=5)
    c = make_split(PAIRS, kind="fewshot_celltype", target_cell_type="k562", seed=6)
    assert a == b and a.split_id == b.split_id
    assert a.test != c.test and a.split_id != c.split_id


def test_round_trip_and_tamper_detection(tmp_path):
    split = make_split(PAIRS, kind="unseen_perturbation", seed=0)
    path = split.save(tmp_path / "split.json")
    assert Split.load(path) == split
    data = json.loads(path.read_text())
    data["test"] = data["test"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its pairs"):
        Split.load(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid split file"):
        Split.load(tmp_path / "bad.json")
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_bad_arguments():
    with pytest.raises(PerturbDataError, match="target_cell_type 'liver'"):
        make_split(PAIRS, kind="fewshot_celltype", target_cell_type="liver")
    with pytest.raises(ValueError, match="unknown split kind"):
        make_split(PAIRS, kind="random")
    with pytest.raises(ValueError, match="test_frac must be in"):
        make_split(PAIRS, test_frac=1.5, target_cell_type="k562")
    with pytest.raises(ValueError, match="must be < 1"):
        make_split(PAIRS, test_frac=0.6, val_frac=0.5, target_cell_type="k562")
    with pytest.raises(ValueError, match="not disjoint"):
        Split(kind="x", seed=0, params={}, train=(("a", "b"),), val=(), test=(("a", "b"),))


def test_split_from_anndata_excludes_controls(perturbench_path):
    adata = ad.read_h5ad(perturbench_path)
    split = make_split(
        adata,
        kind="fewshot_celltype",
        target_cell_type="k562",
        seed=0,
        pert_col="perturbation",
        cell_type_col="cell_type",
        control_label="control",
    )
    all_pairs = set(split.train) | set(split.val) | set(split.test)
    assert not any(p == "control" for _, p in all_pairs)
    assert len(all_pairs) == 60
    assert len(split.test) == round(0.3 * 33)


def test_split_from_toy_anndata():
    adata = make_toy_perturbseq()
    split = make_split(adata, kind="zeroshot_celltype", target_cell_type="rpe1")
    assert {p for _, p in split.test} | {p for _, p in split.val} == {"GENE01", "GENE02", "GENE03", "GENE01+GENE02"}
