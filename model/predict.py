"""Inference from a checkpoint alone (plus its retrieval store): predicted cells as AnnData.

The checkpoint carries the model's arguments, gene vocabulary, cell types, split id and a cache of control
cells per cell type, so a :class:`Predictor` needs nothing else from training. Inference is deterministic: the
refiner takes the top-k of its scores, and control cells are drawn with the given seed.

One code path: :meth:`Predictor.predict` is :meth:`~Predictor.make_items` (check a request, draw its control
cells: one :class:`PredictItem` per perturbation) then :meth:`~Predictor.predict_items` (retrieve and run the
model on items of any cell types and control sets at once), which the serving micro-batcher calls with the items
of concurrent requests.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import torch

from model.data.matrices import cell_matrix
from model.data.perturbations import format_perturbation, parse_perturbation
from model.examples import CandidateTable, QuerySet, retrieve_candidates
from model.nn.batch import Batch
from model.nn.ptrag import PTRAG, PTRAGConfig
from model.train import (
    BATCHES,
    CELL_TYPES,
    CONFIG,
    CONTROL_BATCHES,
    CONTROLS,
    EMBEDDINGS,
    FEATURES,
    MODEL,
    MODEL_ARGS,
    SPLIT_ID,
    TRAIN_STATE,
    load_checkpoint,
    open_store,
)
from retrieval_service.embeddings import load_aliases
from retrieval_service.index import UnknownGeneError
from retrieval_service.store import Store

__all__ = ["CANDIDATE_COLUMNS", "MAX_FORWARD_CELLS", "PredictItem", "Prediction", "Predictor"]

CANDIDATE_COLUMNS = ("id", "cell_type", "perturbation", "cosine", "score", "weight", "selected")
MAX_FORWARD_CELLS = 16_384  # control cells (B * S) per forward pass; more are split into several passes


@dataclass
class Prediction:
    """One perturbation's predicted cell set (or its mean) and the candidates that explain it."""

    perturbation: str
    mean: np.ndarray  # (G,) predicted pseudobulk profile: the mean of the predicted cells
    ctrl: np.ndarray  # (n_cells, G) the control cells they were generated from
    columns: dict[str, np.ndarray]  # the candidates column by column: CANDIDATE_COLUMNS, one entry per candidate
    cells: np.ndarray | None = None  # (n_cells, G) predicted cells; None when the item asked for the mean only
    warnings: list[str] = field(default_factory=list)  # alias resolution, zero-shot cell type
    # (G,) mean of ctrl. Computed with the forward pass (on the model's thread), not when a server reads delta on
    # its event loop, where a numpy reduction released the GIL to the model thread and waited to get it back.
    ctrl_mean: np.ndarray | None = None

    @property
    def delta(self) -> np.ndarray:
        """(G,) predicted pseudobulk change from the control cells."""
        if self.ctrl_mean is None:
            self.ctrl_mean = self.ctrl.mean(0)
        return self.mean - self.ctrl_mean

    @property
    def candidates(self) -> pd.DataFrame:
        """The retrieved candidates with their refiner scores and weights, one row each (built on access: a
        DataFrame per prediction cost ~0.7 ms, a sixth of a batched forward pass per item)."""
        return pd.DataFrame(self.columns, columns=list(CANDIDATE_COLUMNS))


@dataclass
class PredictItem:
    """One cell set to perturb: what :meth:`Predictor.predict_items` takes, and the unit that the serving
    micro-batcher groups across requests. Build items with :meth:`Predictor.make_items`, which validates them."""

    cell_type: str
    perturbation: str  # the label as asked, e.g. "A+B"
    ctrl: np.ndarray  # (S, G) float32 control cells in the model's gene order
    batch_code: int = -1  # index into Predictor.batches; -1: unknown batch
    seed: int = 0  # random_retrieval's candidate draw
    query_label: str | None = None  # the label with alias-resolved symbols, as retrieval sees it; None: perturbation
    warnings: list[str] = field(default_factory=list)
    cells: bool = True  # predict every cell; False: only their mean (Prediction.cells is None), ~1/3 less work
    ctrl_rows: np.ndarray | None = None  # (S,) rows of Predictor.controls[cell_type] that ctrl holds, if drawn there


class Predictor:
    """A trained PT-RAG model with its store, ready to predict.

    ``aliases`` ``{old symbol: current symbol}`` (see :func:`retrieval_service.embeddings.load_aliases`) lets
    requests name genes by symbols the embedding table lacks; such resolutions are reported as warnings.
    """

    def __init__(
        self, model: PTRAG, store: Store, ckpt: dict, *, device: torch.device, aliases: Mapping[str, str] | None = None
    ) -> None:
        self.model, self.store, self.device = model.eval(), store, device
        self.genes: list[str] = list(ckpt[FEATURES])
        self.cell_types: list[str] = list(ckpt[CELL_TYPES])
        self.controls: dict[str, np.ndarray] = {
            ct: cell_matrix(
                v.numpy(), f"cached control cells of {ct!r} in the checkpoint", len(self.genes), dtype=np.float32
            )
            for ct, v in ckpt[CONTROLS].items()
        }
        self.batches: list[str] = list(ckpt[BATCHES])  # empty: the model takes no batch input
        self.control_batches: dict[str, np.ndarray] = {k: v.numpy() for k, v in ckpt[CONTROL_BATCHES].items()}
        self.config: dict = ckpt[CONFIG]
        self.split_id: str = ckpt[SPLIT_ID]
        self.embedding_source: str = ckpt[EMBEDDINGS]
        self.train_state: dict = {k: v for k, v in ckpt[TRAIN_STATE].items() if k != "history"}  # step, best_val
        self.table = CandidateTable.from_store(store, self.cell_types)
        self.aliases: dict[str, str] = dict(aliases or {})
        self.store_cell_types: set[str] = {str(c) for c in store.cell_types}  # with training entries to retrieve
        # Work that depends on a cached control cell or a store entry alone, done once here instead of per request.
        with torch.no_grad():
            self.control_tokens: dict[str, torch.Tensor] = {
                ct: _chunked(lambda x: self.model.cells.mlp(x.to(device).float()).cpu(), torch.from_numpy(cells))
                for ct, cells in self.controls.items()
            }  # {cell type: (n_cached, d)}
            self.cand_codes = self._encode_store() if self.model.profiles is not None else None

    def _encode_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``PTRAG.encode_candidates`` of every store entry, plus a last row for padding (an all-zero candidate,
        which is what ``CandidateTable.gather`` hands the model for one): (N + 1, d) each, on CPU."""
        emb = torch.cat([self.table.keys, self.table.keys.new_zeros(1, self.table.keys.shape[1])])  # (N + 1, E)
        delta = torch.cat([self.table.delta, self.table.delta.new_zeros(1, self.table.delta.shape[1])])  # (N + 1, G)
        proj = _chunked(lambda x: self.model.emb(x.to(self.device)).cpu(), emb)
        profile = _chunked(lambda x: self.model.profiles(x.to(self.device)).cpu(), delta)
        return proj, profile

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike[str],
        *,
        index: str | os.PathLike[str] | None = None,
        retrieval_url: str | None = None,
        embeddings: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        aliases: str | os.PathLike[str] | Mapping[str, str] | None = None,
    ) -> Predictor:
        """Rebuild the model from ``checkpoint``.

        Retrieval uses ``index`` (a store directory) or ``retrieval_url`` (a running service, with ``embeddings``,
        the gene table it was built from); by default whatever the checkpoint was trained with. ``aliases`` is an
        alias map or a file :func:`~retrieval_service.embeddings.load_aliases` reads.
        """
        if aliases is not None and not isinstance(aliases, Mapping):
            aliases = load_aliases(aliases)
        dev = torch.device(device)
        # On the CPU: only the network moves to ``dev``; the cached controls and tables stay numpy-side.
        ckpt = load_checkpoint(checkpoint)
        model = PTRAG(PTRAGConfig(**ckpt[MODEL_ARGS]))
        model.load_state_dict(ckpt[MODEL])
        cfg = ckpt[CONFIG]
        if index is None and retrieval_url is None:
            index, retrieval_url = cfg.get("index", ""), cfg.get("retrieval_url", "")
        store_dir = index or retrieval_url
        store = open_store(str(index or ""), retrieval_url=retrieval_url or "",
                           embeddings=str(embeddings or cfg.get("embeddings", "")),
                           control_label=cfg["control_label"])  # fmt: skip
        if store.manifest.split_id != ckpt[SPLIT_ID]:
            msg = (
                f"store {store_dir} was built for split {store.manifest.split_id}, the checkpoint for "
                f"{ckpt[SPLIT_ID]}: predictions could retrieve held-out profiles; use the run's own index"
            )
            raise ValueError(msg)
        store.check_features(ckpt[FEATURES])
        return cls(model.to(dev), store, ckpt, device=dev, aliases=aliases)

    def control_cells(self, cell_type: str, *, n_cells: int = 64, seed: int = 0, batch_code: int = -1) -> np.ndarray:
        """``(n_cells, G)`` float32 control cells drawn (seeded) from the checkpoint's cache of ``cell_type``,
        only from technical batch ``batch_code`` when it is not -1."""
        return self.controls[cell_type][self.control_rows(cell_type, n_cells=n_cells, seed=seed, batch_code=batch_code)]

    def control_rows(self, cell_type: str, *, n_cells: int = 64, seed: int = 0, batch_code: int = -1) -> np.ndarray:
        """``(n_cells,)`` rows of ``controls[cell_type]`` that :meth:`control_cells` draws."""
        pool_rows = np.arange(len(self.controls[cell_type]))
        if batch_code >= 0:
            pool_rows = np.flatnonzero(self.control_batches[cell_type] == batch_code)
            if not len(pool_rows):
                msg = (f"no cached control cells of cell type {cell_type!r} in batch "
                       f"{self.batches[batch_code]!r}; pass ctrl=")  # fmt: skip
                raise ValueError(msg)
        rng = np.random.default_rng(seed)
        return pool_rows[rng.choice(len(pool_rows), size=n_cells, replace=len(pool_rows) < n_cells)]

    def knows(self, cell_type: str, perturbations: list[str], batch: str | None = None) -> bool:
        """Whether :meth:`make_items` finds every name as given, with no alias lookup and no close-match search
        (a fuzzy match over the gene table, which a server should not run on its event loop)."""
        if cell_type not in self.controls or (batch is not None and batch not in self.batches):
            return False
        emb, control_label = self.store.index.embeddings, self.config["control_label"]
        try:
            genes = [g for p in perturbations for g in parse_perturbation(p, control_label=control_label)]
        except ValueError:
            return False
        return all(g in emb for g in genes)

    def make_items(
        self,
        cell_type: str,
        perturbations: list[str],
        *,
        n_cells: int = 64,
        seed: int = 0,
        ctrl: np.ndarray | None = None,
        batch: str | None = None,
        cells: bool = True,
    ) -> list[PredictItem]:
        """Check a request against the checkpoint and turn it into one :class:`PredictItem` per perturbation.

        ``cells=False`` asks for the mean of the predicted cells only (:attr:`PredictItem.cells`).

        Raises ``KeyError`` for an unknown cell type or batch, :class:`UnknownGeneError` (a ``KeyError``) naming
        genes without an embedding (with close matches), ``ValueError`` for a malformed label or control cells.
        Genes found only through :attr:`aliases`, and a cell type without training entries in the store
        (zero-shot), are reported in the items' ``warnings``.
        """
        if cell_type not in self.controls:
            msg = f"unknown cell type {cell_type!r}; the model knows {sorted(self.controls)}"
            raise KeyError(msg)
        if not perturbations:
            msg = "no perturbations given"
            raise ValueError(msg)
        batch_code = -1
        if batch is not None:
            if batch not in self.batches:
                known = self.batches[:20] or "none: the model was trained without batch_col"
                msg = f"unknown batch {batch!r}; the model knows {known}"
                raise KeyError(msg)
            batch_code = self.batches.index(batch)
        ctrl_rows = None
        if ctrl is None:  # the cache: float32, (n, G) and finite, checked once at load
            ctrl_rows = self.control_rows(cell_type, n_cells=n_cells, seed=seed, batch_code=batch_code)
            ctrl = self.controls[cell_type][ctrl_rows]
        else:
            ctrl = cell_matrix(ctrl, "control cells", len(self.genes), dtype=np.float32)
        emb, control_label = self.store.index.embeddings, self.config["control_label"]
        parsed = {p: parse_perturbation(p, control_label=control_label) for p in perturbations}
        found = emb.lookup(dict.fromkeys(g for genes in parsed.values() for g in genes), aliases=self.aliases,
                           warn=False)  # fmt: skip
        resolved = {g: found.via_alias.get(g, g) for g in found.found}
        unknown = sorted(set(found.missing))
        if unknown:
            raise UnknownGeneError(unknown, self.store.index.suggest(unknown[:20]))  # difflib is slow
        shared = []
        if cell_type not in self.store_cell_types:
            shared.append(f"cell type {cell_type!r} has no training perturbations in the retrieval store "
                          "(zero-shot): every candidate comes from another cell type")  # fmt: skip
        items = []
        for label in perturbations:
            genes = parsed[label]
            if not genes:
                msg = f"{label!r} is the control label: it names no gene to perturb"
                raise ValueError(msg)
            notes = [f"gene {g!r} resolved through an alias to {resolved[g]!r}" for g in genes if resolved[g] != g]
            query = format_perturbation(resolved[g] for g in genes) if notes else label
            items.append(PredictItem(cell_type=cell_type, perturbation=label, ctrl=ctrl, batch_code=batch_code,
                                     seed=seed, query_label=query, warnings=shared + notes, cells=cells,
                                     ctrl_rows=ctrl_rows))  # fmt: skip
        return items

    def predict_items(self, items: list[PredictItem]) -> list[Prediction]:
        """Predictions for items of any cell types, control sets and batches, in the order given.

        Stage-1 retrieval runs once for all items; items with the same number of control cells S (and the same
        :attr:`PredictItem.cells`) share a forward pass (split so that no pass holds more than
        :data:`MAX_FORWARD_CELLS` cells). The serving
        micro-batcher calls this with the items of concurrent requests; an item's prediction does not depend on
        the others beside it, up to float rounding in batched matrix products.
        """
        if not items:
            return []
        G = len(self.genes)
        for it in items:
            if it.ctrl.ndim != 2 or it.ctrl.shape[1] != G:
                msg = f"control cells must be (n_cells, {G}), got {it.ctrl.shape}"
                raise ValueError(msg)
        pairs = [(it.cell_type, it.query_label or it.perturbation) for it in items]
        queries = self._retrieve(pairs, items)
        if len(queries) < len(pairs):
            dropped = sorted({p for _, p in pairs} - {p for _, p in queries.pairs})
            msg = f"perturbation(s) {dropped} have a gene without an embedding; cannot retrieve for them"
            raise KeyError(msg)
        K = queries.cand_ids.shape[1]
        pred: list[np.ndarray] = [np.empty(0, np.float32)] * len(items)
        ctrl_mean = np.zeros((len(items), G), np.float32)
        cos, scores, weights = (np.zeros((len(items), K), np.float32) for _ in range(3))
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it.ctrl.shape[0], it.cells), []).append(i)
        for (S, cells), members in groups.items():
            step = max(1, MAX_FORWARD_CELLS // S)
            for start in range(0, len(members), step):
                idx = members[start : start + step]
                out = self._forward(items, queries, idx, pool=not cells)  # (B, S or 1, G), (B, G), then (B, K) x 3
                for j, i in enumerate(idx):
                    pred[i] = out[0][j]
                ctrl_mean[idx], cos[idx], scores[idx], weights[idx] = out[1:]
        valid = queries.cand_ids >= 0
        cts, labs = np.zeros(0, object), np.zeros(0, object)
        if valid.any():  # one lookup for all items (one request to a retrieval service)
            cts, labs = self.store.entries(queries.cand_ids[valid])
        offsets = np.concatenate([[0], np.cumsum(valid.sum(1))])
        result = []
        for b, it in enumerate(items):
            v, sl = valid[b], slice(offsets[b], offsets[b + 1])
            columns = {
                "id": queries.cand_ids[b][v], "cell_type": cts[sl].astype(str), "perturbation": labs[sl].astype(str),
                "cosine": cos[b][v], "score": scores[b][v], "weight": weights[b][v], "selected": weights[b][v] > 0,
            }  # fmt: skip
            result.append(Prediction(perturbation=it.perturbation, mean=pred[b].mean(0), ctrl=it.ctrl,
                                     columns=columns, cells=pred[b] if it.cells else None,
                                     warnings=list(it.warnings), ctrl_mean=ctrl_mean[b]))  # fmt: skip
        return result

    def _retrieve(self, pairs: list[tuple[str, str]], items: list[PredictItem]) -> QuerySet:
        kw = {"cell_types": self.cell_types, "k": self.model.config.n_candidates,
              "control_label": self.config["control_label"]}  # fmt: skip
        if self.model.config.variant != "random_retrieval":
            return retrieve_candidates(self.store, pairs, **kw)
        # Random candidates (a control variant): one stream per item, keyed by its seed and pair, so that the draw
        # does not depend on the other items in the call.
        parts = [
            retrieve_candidates(self.store, [pair], random_candidates=True, **kw,
                                rng=np.random.default_rng([it.seed, zlib.crc32("\t".join(pair).encode())]))
            for pair, it in zip(pairs, items, strict=True)
        ]  # fmt: skip
        return QuerySet(
            pairs=[p for q in parts for p in q.pairs],
            cell_type=np.concatenate([q.cell_type for q in parts]),
            query=np.concatenate([q.query for q in parts]),
            cand_ids=np.concatenate([q.cand_ids for q in parts]),
        )

    def _forward(
        self, items: list[PredictItem], queries: QuerySet, idx: list[int], *, pool: bool = False
    ) -> tuple[np.ndarray, ...]:
        """One forward pass over items ``idx`` (equal S): pred (B, S, G), or (B, 1, G) with ``pool``; the control
        means (B, G); cosines, scores, weights (B, K). Precomputed control-cell tokens and candidate codes stand in
        for the encoders."""
        cand_ids = queries.cand_ids[idx]  # (B, K)
        codes = {}
        if self.cand_codes is not None:
            rows = torch.from_numpy(np.where(cand_ids >= 0, cand_ids, len(self.table.keys)))  # padding: the last row
            codes = {"cand_proj": self.cand_codes[0][rows], "cand_profile": self.cand_codes[1][rows]}  # (B, K, d)
        tokens = None
        if all(items[i].ctrl_rows is not None for i in idx):
            tokens = torch.stack([self.control_tokens[items[i].cell_type][torch.from_numpy(items[i].ctrl_rows)]
                                  for i in idx])  # (B, S, d)  # fmt: skip
        batch = Batch(
            ctrl=torch.from_numpy(np.stack([items[i].ctrl for i in idx])),  # (B, S, G)
            query=torch.from_numpy(queries.query[idx]),
            cell_type=torch.from_numpy(queries.cell_type[idx]),
            **self.table.gather(cand_ids),
            batch_id=torch.tensor([items[i].batch_code for i in idx], dtype=torch.int64) if self.batches else None,
            cell_tokens=tokens,
            **codes,
        ).to(self.device)
        with torch.inference_mode():
            pred, _, info = self.model(batch, stochastic=False, pool=pool)
        outs = (pred, info["ctrl_mean"], info["cosine"], info["scores"], info["weights"])
        return tuple(t.float().cpu().numpy() for t in outs)

    def predict(
        self,
        cell_type: str,
        perturbations: list[str],
        *,
        n_cells: int = 64,
        seed: int = 0,
        ctrl: np.ndarray | None = None,
        batch: str | None = None,
        cells: bool = True,
    ) -> list[Prediction]:
        """Predicted cells (or with ``cells=False`` only their mean) for each perturbation in ``cell_type``.

        ``ctrl`` ``(S, G)`` gives the control cells to perturb; by default ``n_cells`` are drawn (seeded) from the
        checkpoint's cached controls of ``cell_type``. The query's own (cell type, perturbation) entry is
        excluded from retrieval, as in training. ``batch`` names a technical batch the model was trained with
        (``batch_col``); the default control cells then come from that batch, and the model is told it.
        """
        return self.predict_items(self.make_items(cell_type, perturbations, n_cells=n_cells, seed=seed, ctrl=ctrl,
                                                  batch=batch, cells=cells))  # fmt: skip

    def predict_anndata(
        self, cell_type: str, perturbations: list[str], *, n_cells: int = 64, seed: int = 0, batch: str | None = None
    ) -> ad.AnnData:
        """Predicted cells as AnnData: ``obs`` gene / cell type columns named as in training, one block per
        perturbation; ``uns['ptrag_candidates'][perturbation]`` holds the candidates with their weights."""
        preds = self.predict(cell_type, perturbations, n_cells=n_cells, seed=seed, batch=batch)
        pert_col, ct_col = self.config["pert_col"], self.config["cell_type_col"]
        obs = pd.DataFrame({
            pert_col: np.repeat([p.perturbation for p in preds], n_cells),
            ct_col: cell_type,
        })  # fmt: skip
        obs.index = [f"{p}_{i}" for p in (q.perturbation for q in preds) for i in range(n_cells)]
        adata = ad.AnnData(X=np.concatenate([p.cells for p in preds]), obs=obs, var=pd.DataFrame(index=self.genes))
        adata.uns["ptrag_candidates"] = {
            p.perturbation: {c: np.asarray(v) for c, v in p.columns.items()} for p in preds
        }
        adata.uns["ptrag_predict"] = {"cell_type": cell_type, "n_cells": n_cells, "seed": seed, "batch": batch or "",
                                      "variant": self.model.config.variant}  # fmt: skip
        return adata


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, rows: int = 4096) -> torch.Tensor:
    """``fn`` over ``x`` in blocks of rows (bounded memory), concatenated: (N, ...) -> (N, ...)."""
    if len(x) == 0:
        return fn(x)
    return torch.cat([fn(x[i : i + rows]) for i in range(0, len(x), rows)])
