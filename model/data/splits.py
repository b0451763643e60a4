"""Seeded train/val/test splits over (cell type, perturbation) pairs, saved as JSON.

Three protocols:

- ``fewshot_celltype`` (the PT-RAG paper's): in one target cell type a fraction of perturbations is held out
  (default 30% test, 5% val); the same genes stay in training in the other cell types, and the target's
  controls are available.
- ``unseen_perturbation``: single genes held out in every cell type. A combination ``A+B`` that contains a
  held-out gene is held out with it (training on it would leak the gene); of the remaining combinations,
  whose genes are all seen, a fraction is held out too. Each held-out pair records its ``category``.
- ``zeroshot_celltype``: every perturbation of the target cell type held out.

Held-out pairs (val and test) must never be reachable by retrieval; :attr:`Split.held_out` is what the index
builder refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd

from model.data.errors import PerturbDataError
from model.data.perturbations import parse_perturbation
from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL
from retrieval_service.atomic import atomic_write_text

__all__ = ["SPLIT_KINDS", "Split", "make_split"]

SplitKind = Literal["fewshot_celltype", "unseen_perturbation", "zeroshot_celltype"]
SPLIT_KINDS: tuple[str, ...] = ("fewshot_celltype", "unseen_perturbation", "zeroshot_celltype")
Pair = tuple[str, str]  # (cell type, perturbation label)
_FORMAT = 1


@dataclass(frozen=True)
class Split:
    """A split of (cell type, perturbation) pairs; controls are never part of it.

    ``categories`` maps held-out pairs to a finer label where the protocol has one
    (``unseen_single``, ``combo_seen_genes``, ``combo_unseen_gene``, ``target_cell_type``).
    """

    kind: str
    seed: int
    params: dict
    train: tuple[Pair, ...]
    val: tuple[Pair, ...]
    test: tuple[Pair, ...]
    categories: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, tuple(sorted((str(c), str(p)) for c, p in getattr(self, name))))
        sets = {name: set(getattr(self, name)) for name in ("train", "val", "test")}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sets[a] & sets[b]
            if both:
                msg = f"split is not disjoint: {len(both)} pairs in both {a} and {b}, e.g. {sorted(both)[:3]}"
                raise ValueError(msg)

    @property
    def held_out(self) -> frozenset[Pair]:
        """Pairs that no model may see or retrieve: validation and test."""
        return frozenset(self.val) | frozenset(self.test)

    @property
    def split_id(self) -> str:
        """A content hash: two splits with the same pairs and protocol have the same id."""
        payload = json.dumps(
            {"kind": self.kind, "train": self.train, "val": self.val, "test": self.test}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def role(self, cell_type: str, perturbation: str) -> str | None:
        """``"train"``, ``"val"``, ``"test"`` or ``None`` (not in the split)."""
        pair = (cell_type, perturbation)
        for name in ("train", "val", "test"):
            if pair in getattr(self, name):
                return name
        return None

    def summary(self) -> str:
        lines = [
            f"split {self.kind} (id {self.split_id}, seed {self.seed}): "
            f"{len(self.train)} train, {len(self.val)} val, {len(self.test)} test pairs"
        ]
        for name in ("train", "val", "test"):
            counts = pd.Series([c for c, _ in getattr(self, name)], dtype=str).value_counts().sort_index()
            lines.append(f"  {name:5s}: " + ", ".join(f"{ct} {n}" for ct, n in counts.items()))
        return "\n".join(lines)

    # --- persistence ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "split_id": self.split_id,
            "kind": self.kind,
            "seed": self.seed,
            "params": self.params,
            "train": [list(p) for p in self.train],
            "val": [list(p) for p in self.val],
            "test": [list(p) for p in self.test],
            "categories": self.categories,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Split:
        """Read a split written by :meth:`save`; the stored id must match the content."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            split = cls(
                kind=data["kind"],
                seed=int(data["seed"]),
                params=data["params"],
                train=tuple(map(tuple, data["train"])),
                val=tuple(map(tuple, data["val"])),
                test=tuple(map(tuple, data["test"])),
                categories=data.get("categories", {}),
            )
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            msg = f"{path} is not a valid split file ({type(err).__name__}: {err}); recreate it (ptrag split)"
            raise ValueError(msg) from err
        if data.get("split_id") != split.split_id:
            msg = (
                f"{path}: stored split_id {data.get('split_id')} does not match its pairs ({split.split_id}); "
                "the file was edited or damaged"
            )
            raise ValueError(msg)
        return split


def _pairs(data: ad.AnnData | Iterable[Pair], *, pert_col: str, cell_type_col: str, control_label: str) -> list[Pair]:
    if isinstance(data, ad.AnnData):
        for col in (pert_col, cell_type_col):
            if col not in data.obs.columns:
                msg = f"column {col!r} not in adata.obs; available columns: {list(data.obs.columns)}"
                raise PerturbDataError(msg)
        frame = data.obs[[cell_type_col, pert_col]].astype(str).drop_duplicates()
        pairs = list(frame.itertuples(index=False, name=None))
    else:
        pairs = [(str(c), str(p)) for c, p in data]
    return sorted({(c, p) for c, p in pairs if p != control_label})


def make_split(
    data: ad.AnnData | Iterable[Pair],
    *,
    kind: SplitKind = "fewshot_celltype",
    target_cell_type: str | None = None,
    test_frac: float = 0.3,
    val_frac: float = 0.05,
    combo_test_frac: float | None = None,
    seed: int = 0,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
) -> Split:
    """Split the (cell type, perturbation) pairs of ``data`` (cells, profiles, or an iterable of pairs).

    Parameters
    ----------
    kind
        ``fewshot_celltype``, ``unseen_perturbation`` or ``zeroshot_celltype`` (module docstring).
    target_cell_type
        Required by the two cell-type protocols.
    test_frac, val_frac
        Fractions of the units (perturbations of the target, or genes) held out for test and validation.
    combo_test_frac
        ``unseen_perturbation`` only: fraction of combinations whose genes are all seen that go to test
        (default ``test_frac``).
    seed
        Seeds the shuffle; recorded in the split.
    """
    if kind not in SPLIT_KINDS:
        msg = f"unknown split kind {kind!r}; choose one of {SPLIT_KINDS}"
        raise ValueError(msg)
    for name, frac in (("test_frac", test_frac), ("val_frac", val_frac)):
        if not 0.0 <= frac < 1.0:
            msg = f"{name} must be in [0, 1), got {frac}"
            raise ValueError(msg)
    if test_frac + val_frac >= 1.0:
        msg = f"test_frac + val_frac must be < 1 so something is left to train on, got {test_frac + val_frac}"
        raise ValueError(msg)
    pairs = _pairs(data, pert_col=pert_col, cell_type_col=cell_type_col, control_label=control_label)
    if not pairs:
        msg = "no perturbed (non-control) groups to split"
        raise PerturbDataError(msg)
    rng = np.random.default_rng(seed)
    params = {
        "target_cell_type": target_cell_type,
        "test_frac": test_frac,
        "val_frac": val_frac,
        "combo_test_frac": combo_test_frac,
        "control_label": control_label,
    }
    categories: dict[str, str] = {}
    if kind in ("fewshot_celltype", "zeroshot_celltype"):
        cell_types = sorted({c for c, _ in pairs})
        if target_cell_type not in cell_types:
            msg = f"target_cell_type {target_cell_type!r} is not a cell type with perturbations: {cell_types}"
            raise PerturbDataError(msg)
        target = [p for p in pairs if p[0] == target_cell_type]
        others = [p for p in pairs if p[0] != target_cell_type]
        order = [target[i] for i in rng.permutation(len(target))]
        if kind == "zeroshot_celltype":
            n_val = round(val_frac * len(order))
            val, test, train_target = order[:n_val], order[n_val:], []
        else:
            n_test, n_val = _counts(len(order), test_frac, val_frac)
            test, val, train_target = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        train = others + train_target
        categories = {f"{c}|{p}": "target_cell_type" for c, p in val + test}
    else:
        train, val, test, categories = _unseen_perturbation(
            pairs,
            rng=rng,
            test_frac=test_frac,
            val_frac=val_frac,
            combo_test_frac=test_frac if combo_test_frac is None else combo_test_frac,
            control_label=control_label,
        )
    if not test:
        msg = f"the {kind} split left no test pairs; raise test_frac or add perturbations"
        raise PerturbDataError(msg)
    return Split(
        kind=kind,
        seed=seed,
        params=params,
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        categories=categories,
    )


def _counts(n: int, test_frac: float, val_frac: float) -> tuple[int, int]:
    """Test and val sizes: at least one test unit whenever test_frac > 0 and n > 1; train keeps one."""
    n_test = round(test_frac * n)
    if test_frac > 0 and n > 1:
        n_test = max(n_test, 1)
    n_val = min(round(val_frac * n), max(n - n_test - 1, 0))
    return n_test, n_val


def _unseen_perturbation(
    pairs: list[Pair],
    *,
    rng: np.random.Generator,
    test_frac: float,
    val_frac: float,
    combo_test_frac: float,
    control_label: str,
) -> tuple[list[Pair], list[Pair], list[Pair], dict[str, str]]:
    genes_of = {p: parse_perturbation(p, control_label=control_label) for _, p in pairs}
    singles = sorted({g[0] for g in genes_of.values() if len(g) == 1})
    order = [singles[i] for i in rng.permutation(len(singles))]
    n_test, n_val = _counts(len(order), test_frac, val_frac)
    test_genes, val_genes = set(order[:n_test]), set(order[n_test : n_test + n_val])
    combos = sorted({p for p, g in genes_of.items() if len(g) > 1})
    seen_combos = [p for p in combos if not set(genes_of[p]) & (test_genes | val_genes)]
    n_combo_test = round(combo_test_frac * len(seen_combos))
    combo_test = {seen_combos[i] for i in rng.permutation(len(seen_combos))[:n_combo_test]}
    train, val, test, categories = [], [], [], {}
    for pair in pairs:
        genes = set(genes_of[pair[1]])
        if genes & test_genes:
            test.append(pair)
            categories[f"{pair[0]}|{pair[1]}"] = "unseen_single" if len(genes) == 1 else "combo_unseen_gene"
        elif genes & val_genes:
            val.append(pair)
            categories[f"{pair[0]}|{pair[1]}"] = "unseen_single" if len(genes) == 1 else "combo_unseen_gene"
        elif pair[1] in combo_test:
            test.append(pair)
            categories[f"{pair[0]}|{pair[1]}"] = "combo_seen_genes"
        else:
            train.append(pair)
    return train, val, test, categories
