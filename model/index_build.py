"""Build the stage-1 retrieval store from a split's training profiles.

The store is keyed by one entry per (cell type, perturbation) training pair: the key is the perturbation's
gene embedding (sum of its genes' vectors, L2-normalised) and the cached values are that pair's profile in its
own cell type. Per-pair entries rather than per-perturbation ones let the same gene carry a different profile
in each cell type, and let filters and exclusions work on exact (cell type, perturbation) pairs, which is what
the leakage rule is stated in. Held-out pairs of the split are never written, and the store refuses them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np

from model.data.perturbations import parse_perturbation
from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL
from model.data.splits import Split
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.store import build_store

__all__ = ["build_perturbation_index", "perturbation_keys"]

logger = logging.getLogger(__name__)


def perturbation_keys(
    labels: list[str],
    embeddings: GeneEmbeddings,
    *,
    control_label: str = DEFAULT_CONTROL_LABEL,
    aliases: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Key vectors of perturbation labels, resolving genes through ``aliases``.

    Returns
    -------
    keys
        ``(n, d)`` float32, L2-normalised sum of the genes' vectors; zero rows where not ``ok``.
    ok
        ``(n,)`` bool, False when a gene of the label has no embedding.
    missing
        Sorted names of the genes without an embedding.
    """
    gene_sets, missing = [], set()
    for label in labels:
        genes = []
        for gene in parse_perturbation(label, control_label=control_label):
            resolved = embeddings.resolve(gene, aliases=aliases)
            if resolved is None:
                missing.add(gene)
            genes.append(resolved or gene)
        gene_sets.append(tuple(genes))
    keys, ok = embeddings.perturbation_vectors(gene_sets)
    return keys, ok, sorted(missing)


def build_perturbation_index(
    profiles: ad.AnnData,
    embeddings: GeneEmbeddings,
    split: Split,
    out: str | os.PathLike[str],
    *,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    aliases: Mapping[str, str] | None = None,
    index_type: str = "flat",
    index_params: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the retrieval store of ``split``'s training pairs to ``out`` (atomically).

    Parameters
    ----------
    profiles
        Output of :func:`model.data.profiles.compute_profiles`.
    embeddings
        Gene embeddings for the keys; training pairs with a gene lacking one are left out with a warning that
        names the genes.
    split
        Only ``split.train`` pairs become entries; ``split.held_out`` is passed to the store as forbidden, and
        the split id is recorded in its manifest.

    The store holds per entry ``delta`` ``(G,)``, ``mean`` ``(G,)``, ``n_cells`` ``()``, ``cells`` ``(S, G)``;
    per cell type the extras ``control_mean`` ``(C, G)`` and ``control_cells`` ``(C, S, G)`` (their row order
    in ``extras_meta[...]['cell_types']``); and ``attrs['feature_names']``, the genes of the profiles.
    """
    obs = profiles.obs
    cell_types = obs[cell_type_col].astype(str).to_numpy()
    labels = obs[pert_col].astype(str).to_numpy()
    is_control = obs["is_control"].to_numpy(bool)
    train = set(split.train)
    in_train = np.array([(c, p) in train for c, p in zip(cell_types, labels, strict=True)]) & ~is_control
    if not in_train.any():
        msg = f"no profile row is a training pair of split {split.split_id}; was the split made from this data?"
        raise ValueError(msg)
    rows = np.flatnonzero(in_train)
    keys, ok, missing = perturbation_keys(list(labels[rows]), embeddings, control_label=control_label, aliases=aliases)
    if missing:
        dropped = int((~ok).sum())
        warnings.warn(
            f"{len(missing)} perturbed genes have no embedding in {embeddings.source!r} and their {dropped} training "
            f"entries are left out of retrieval: {missing[:20]}{' ...' if len(missing) > 20 else ''}",
            stacklevel=2,
        )
    rows, keys = rows[ok], keys[ok]
    if len(rows) == 0:
        msg = "no training perturbation has an embedding; check the embedding file matches the data's gene symbols"
        raise ValueError(msg)

    ctrl_rows = np.flatnonzero(is_control)
    ctrl_types = [str(c) for c in cell_types[ctrl_rows]]
    cells = np.asarray(profiles.obsm["cells"], dtype=np.float32)
    delta = np.asarray(profiles.layers["delta"], dtype=np.float32)
    mean = np.asarray(profiles.X, dtype=np.float32)
    return build_store(
        out,
        cell_types=list(cell_types[rows]),
        labels=list(labels[rows]),
        keys=keys,
        arrays={
            "delta": delta[rows],
            "mean": mean[rows],
            "n_cells": obs["n_cells"].to_numpy(np.int64)[rows],
            "cells": cells[rows],
        },
        gene_embeddings=embeddings,
        split_id=split.split_id,
        forbidden_pairs=split.held_out,
        extras={"control_mean": mean[ctrl_rows], "control_cells": cells[ctrl_rows]},
        extras_meta={"control_mean": {"cell_types": ctrl_types}, "control_cells": {"cell_types": ctrl_types}},
        attrs={
            "feature_names": list(map(str, profiles.var_names)),
            "pert_col": pert_col,
            "cell_type_col": cell_type_col,
            "control_label": control_label,
            "split_kind": split.kind,
            "genes_without_embedding": missing,
        },
        index_type=index_type,
        index_params=index_params,
        overwrite=overwrite,
    )
