"""From cells, a split and the retrieval store to the tensors one PT-RAG step consumes.

Stage 1 runs once per (cell type, perturbation) query, at start: :func:`retrieve_candidates` turns every pair of
a split role into a query vector and K candidate ids (the query's own entry excluded; a held-out pair has no
entry at all). Each step then only samples cells: :func:`make_batch` draws S control cells of the target cell
type and T observed cells of the pair, and gathers the candidates' cached profiles by id.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from model.data.perturbations import parse_perturbation
from model.data.profiles import group_members
from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL
from model.index_build import perturbation_keys
from model.nn.batch import Batch
from retrieval_service.store import Store

__all__ = ["CandidateTable", "CellPool", "QuerySet", "cell_pool", "make_batch", "retrieve_candidates", "set_rows"]

logger = logging.getLogger(__name__)

Pair = tuple[str, str]


@dataclass
class CellPool:
    """Expression of every cell (CSR, so 600k x 2,000 stays sparse) and where each group's cells are."""

    X: sp.csr_matrix  # (n_cells, G) float32, log-normalised
    genes: list[str]  # (G,)
    cell_types: list[str]  # the model's cell-type vocabulary, sorted; index = cell-type id
    group_rows: dict[Pair, np.ndarray]  # (cell type, perturbation) -> row indices
    control_rows: dict[str, np.ndarray]  # cell type -> row indices of its control cells
    batches: list[str] | None = None  # technical batch names (e.g. gem groups); None: no batch information
    batch_codes: np.ndarray | None = None  # (n_cells,) int64 index into ``batches``

    def cell_type_index(self, name: str) -> int:
        try:
            return self.cell_types.index(name)
        except ValueError:
            msg = f"unknown cell type {name!r}; known: {self.cell_types}"
            raise KeyError(msg) from None


def cell_pool(
    adata: ad.AnnData,
    *,
    pert_col: str = DEFAULT_PERT_COL,
    cell_type_col: str = DEFAULT_CELL_TYPE_COL,
    control_label: str = DEFAULT_CONTROL_LABEL,
    control_mask: np.ndarray | None = None,
    batch_col: str | None = None,
) -> CellPool:
    """Index the cells of a prepared (log-normalised) AnnData by group.

    ``control_mask`` ``(n_obs,)`` bool restricts which control cells may be drawn as model input (the
    evaluation keeps the other half of each cell type's controls as an unseen reference). ``batch_col`` names
    an ``obs`` column of technical batches (e.g. ``gem_group``): sets are then drawn within one batch, whose id
    the model receives (see :func:`make_batch`).
    """
    X = adata.X
    # No copy when X already is float32 CSR: at Replogle-Nadig scale a copy is gigabytes.
    if sp.issparse(X) and X.format == "csr":
        X = X.astype(np.float32, copy=False)
    else:
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    ct = adata.obs[cell_type_col].astype(str).to_numpy()
    pert = adata.obs[pert_col].astype(str).to_numpy()
    codes, groups = pd.factorize(pd.MultiIndex.from_arrays([ct, pert]), sort=True)
    members = group_members(codes, len(groups))
    group_rows = {(str(c), str(p)): rows for (c, p), rows in zip(groups, members, strict=True)}
    is_ctrl = pert == control_label
    if control_mask is not None:
        is_ctrl &= np.asarray(control_mask, bool)
    cell_types = sorted(set(ct))
    control_rows = {c: np.flatnonzero(is_ctrl & (ct == c)) for c in cell_types}
    empty = [c for c, rows in control_rows.items() if rows.size == 0]
    if empty:
        msg = f"cell type(s) {empty} have no usable control cells ({pert_col} == {control_label!r})"
        raise ValueError(msg)
    batches = batch_codes = None
    if batch_col:
        if batch_col not in adata.obs.columns:
            msg = f"batch column {batch_col!r} not in adata.obs; available columns: {list(adata.obs.columns)}"
            raise ValueError(msg)
        codes_b, names = pd.factorize(adata.obs[batch_col].astype(str), sort=True)
        batches, batch_codes = [str(b) for b in names], codes_b.astype(np.int64)
    return CellPool(
        X=X,
        genes=list(map(str, adata.var_names)),
        cell_types=cell_types,
        group_rows=group_rows,
        control_rows=control_rows,
        batches=batches,
        batch_codes=batch_codes,
    )


@dataclass
class CandidateTable:
    """The store's entries as tensors the batches gather from, indexed by entry id."""

    keys: torch.Tensor  # (N, E) float32, L2-normalised
    cell_type: torch.Tensor  # (N,) int64 in the model's cell-type vocabulary
    delta: torch.Tensor  # (N, G) float32

    def gather(self, cand_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The ``Batch`` candidate fields for ``cand_ids`` ``(B, K)`` (-1 = padding, zero-filled and masked)."""
        ids = torch.from_numpy(np.asarray(cand_ids, dtype=np.int64))  # (B, K)
        mask = ids >= 0
        safe = ids.clamp(min=0)
        flat = safe.view(-1)  # index_select: ~4x faster than indexing with a 2-D tensor here (0.3 vs 1.3 ms)
        emb = self.keys.index_select(0, flat).view(*safe.shape, -1)  # (B, K, E): fresh tensors
        delta = self.delta.index_select(0, flat).view(*safe.shape, -1)  # (B, K, G)
        if not bool(mask.all()):  # zero the few padded rows in place, not a masked copy of everything
            emb[~mask] = 0
            delta[~mask] = 0
        return {"cand_emb": emb, "cand_cell_type": self.cell_type[safe], "cand_delta": delta, "cand_mask": mask}

    @classmethod
    def from_store(cls, store: Store, cell_types: Sequence[str]) -> CandidateTable:
        vocab = {c: i for i, c in enumerate(cell_types)}
        unknown = sorted(set(map(str, store.cell_types)) - set(vocab))
        if unknown:
            msg = f"the store has cell types {unknown} that the data lacks; was it built from other data?"
            raise ValueError(msg)
        ids = np.arange(len(store))
        delta = store.get(ids, ["delta"])["delta"]
        return cls(
            keys=torch.from_numpy(np.array(store.index.keys, dtype=np.float32)),  # a copy: the memmap is read-only
            cell_type=torch.tensor([vocab[str(c)] for c in store.cell_types], dtype=torch.int64),
            delta=torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32)),
        )


@dataclass
class QuerySet:
    """The queries of one split role with their stage-1 candidates, computed once."""

    pairs: list[Pair]  # (P,) (cell type, perturbation)
    cell_type: np.ndarray  # (P,) int64 target cell-type ids
    query: np.ndarray  # (P, E) float32 unit query keys
    cand_ids: np.ndarray  # (P, K) int64 store ids, best first, -1 padding

    def __len__(self) -> int:
        return len(self.pairs)


def retrieve_candidates(
    store: Store,
    pairs: Sequence[Pair],
    *,
    cell_types: Sequence[str],
    k: int = 32,
    random_candidates: bool = False,
    control_label: str = DEFAULT_CONTROL_LABEL,
    rng: np.random.Generator | None = None,
) -> QuerySet:
    """Stage 1 for every pair: K candidate entry ids, the query's own (cell type, perturbation) entry excluded.

    For a combination ``A+B`` the training entries of its single genes (in any cell type, the target's first)
    lead the list, so the refiner can compose them; the rest is filled by cosine. With ``random_candidates``
    (the ``random_retrieval`` control) the K ids are drawn uniformly from the store instead. Pairs whose genes
    lack an embedding cannot be queried: they are left out with a warning naming them.
    """
    unique = list(dict.fromkeys(pairs))
    if not random_candidates and len(unique) < len(pairs):
        # A pair asked more than once (a micro-batch of requests for one gene): search once, repeat its row.
        once = retrieve_candidates(store, unique, cell_types=cell_types, k=k, control_label=control_label)
        row = {p: r for r, p in enumerate(once.pairs)}
        kept = [p for p in pairs if p in row]
        idx = [row[p] for p in kept]
        return QuerySet(pairs=kept, cell_type=once.cell_type[idx], query=once.query[idx], cand_ids=once.cand_ids[idx])
    rng = np.random.default_rng(0) if rng is None else rng
    labels = [p for _, p in pairs]
    keys, ok, missing = perturbation_keys(labels, store.index.embeddings, control_label=control_label)
    if missing:
        warnings.warn(f"{int((~ok).sum())} queries dropped: genes without an embedding {missing[:20]}", stacklevel=2)
    pairs = [p for p, good in zip(pairs, ok, strict=True) if good]
    keys = keys[ok]
    own = store.ids_for(pairs)  # -1 for held-out pairs: they were never written
    store_types = list(map(str, store.index.cell_type_names))
    lead: list[list[int]] = []
    for (target, label), own_id in zip(pairs, own, strict=True):
        genes = parse_perturbation(label, control_label=control_label)
        ids: list[int] = []
        if len(genes) > 1:
            types = [target] + [c for c in store_types if c != target]
            ids = [int(i) for i in store.ids_for([(c, g) for g in genes for c in types]) if i >= 0 and i != own_id]
        lead.append(ids[:k])
    n = len(store)
    cand = np.full((len(pairs), k), -1, dtype=np.int64)
    if random_candidates:
        for r, own_id in enumerate(own):
            pool = np.setdiff1d(np.arange(n), [own_id])
            picks = rng.choice(pool, size=min(k, pool.size), replace=False)
            cand[r, : picks.size] = picks
    elif len(pairs):
        exclude = [[int(o), *ids] for o, ids in zip(own, lead, strict=True)]
        _, found = store.search(keys, k, exclude=exclude)
        for r, ids in enumerate(lead):
            row = ids + [int(i) for i in found[r] if i >= 0]
            cand[r, : min(k, len(row))] = row[:k]
    vocab = {c: i for i, c in enumerate(cell_types)}
    return QuerySet(
        pairs=list(pairs),
        cell_type=np.array([vocab[c] for c, _ in pairs], dtype=np.int64),
        query=keys.astype(np.float32),
        cand_ids=cand,
    )


def _rows(pool: CellPool, rows_per_set: list[np.ndarray], n: int, rngs: Sequence[np.random.Generator]) -> torch.Tensor:
    """``(len(rows_per_set), n, G)``: n cells drawn per set, with replacement only when the set is smaller."""
    picks = np.concatenate(
        [rng.choice(rows, size=n, replace=rows.size < n) for rows, rng in zip(rows_per_set, rngs, strict=True)]
    )
    dense = pool.X[picks].toarray()  # (B * n, G)
    return torch.from_numpy(dense).view(len(rows_per_set), n, -1)


def set_rows(
    pool: CellPool, pair: Pair, rng: np.random.Generator, *, batch_dropout: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows a set may draw its control and observed cells from, and its batch id (-1: unknown).

    Without batch information every control cell of the cell type and every cell of the pair qualify. With it,
    one batch holding both is drawn and both row sets are restricted to it, except for a ``batch_dropout`` share
    of sets, which draw across batches with an unknown id, as a prediction without a batch does.
    """
    ctrl, target = pool.control_rows[pair[0]], pool.group_rows.get(pair, np.zeros(0, dtype=np.int64))
    if pool.batch_codes is None:
        return ctrl, target, -1
    shared = np.intersect1d(pool.batch_codes[ctrl], pool.batch_codes[target]) if target.size else np.zeros(0)
    if rng.random() < batch_dropout or shared.size == 0:
        return ctrl, target, -1
    b = int(rng.choice(shared))
    return ctrl[pool.batch_codes[ctrl] == b], target[pool.batch_codes[target] == b], b


def make_batch(
    pool: CellPool,
    queries: QuerySet,
    table: CandidateTable,
    idx: np.ndarray,
    *,
    n_ctrl: int,
    n_target: int | None,
    rngs: Sequence[np.random.Generator],
    batch_dropout: float = 0.0,
) -> Batch:
    """The batch of query sets ``idx``: S = ``n_ctrl`` control cells each, T = ``n_target`` observed cells.

    ``rngs`` holds one generator per set, so a set's cells do not depend on which other sets share its batch
    (a batch split across data-parallel processes samples exactly what one process would).
    ``n_target=None`` leaves ``target`` empty (inference). With batch information in ``pool``, each set's cells
    come from one technical batch (see :func:`set_rows`) and ``batch_id`` carries it.
    """
    idx = np.asarray(idx, dtype=np.int64)
    pairs = [queries.pairs[i] for i in idx]
    rows = [set_rows(pool, p, rng, batch_dropout=batch_dropout) for p, rng in zip(pairs, rngs, strict=True)]
    ctrl = _rows(pool, [r[0] for r in rows], n_ctrl, rngs)  # (B, S, G)
    target = None if n_target is None else _rows(pool, [r[1] for r in rows], n_target, rngs)
    return Batch(
        ctrl=ctrl,
        query=torch.from_numpy(queries.query[idx]),
        cell_type=torch.from_numpy(queries.cell_type[idx]),
        **table.gather(queries.cand_ids[idx]),
        target=target,
        batch_id=None if pool.batch_codes is None else torch.tensor([r[2] for r in rows], dtype=torch.int64),
    )
