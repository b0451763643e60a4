"""Inference from a checkpoint alone (plus its retrieval store): predicted cells as AnnData.

The checkpoint carries the model's arguments, gene vocabulary, cell types, split id and a cache of control
cells per cell type, so a :class:`Predictor` needs nothing else from training. Inference is deterministic: the
refiner takes the top-k of its scores, and control cells are drawn with the given seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch

from model.data.perturbations import parse_perturbation
from model.examples import CandidateTable, retrieve_candidates
from model.nn.batch import Batch
from model.nn.ptrag import PTRAG, PTRAGConfig
from model.train import (
    BATCHES,
    CELL_TYPES,
    CONFIG,
    CONTROL_BATCHES,
    CONTROLS,
    FEATURES,
    MODEL,
    MODEL_ARGS,
    SPLIT_ID,
    load_checkpoint,
    open_store,
)
from retrieval_service.index import UnknownGeneError
from retrieval_service.store import Store

__all__ = ["Prediction", "Predictor"]


@dataclass
class Prediction:
    """One perturbation's predicted cell set and the candidates that explain it."""

    perturbation: str
    cells: np.ndarray  # (n_cells, G) predicted cells
    ctrl: np.ndarray  # (n_cells, G) the control cells they were generated from
    candidates: pd.DataFrame  # columns: id, cell_type, perturbation, cosine, score, weight, selected

    @property
    def delta(self) -> np.ndarray:
        """(G,) predicted pseudobulk change from the control cells."""
        return self.cells.mean(0) - self.ctrl.mean(0)


class Predictor:
    """A trained PT-RAG model with its store, ready to predict."""

    def __init__(self, model: PTRAG, store: Store, ckpt: dict, *, device: torch.device) -> None:
        self.model, self.store, self.device = model.eval(), store, device
        self.genes: list[str] = list(ckpt[FEATURES])
        self.cell_types: list[str] = list(ckpt[CELL_TYPES])
        self.controls: dict[str, np.ndarray] = {k: v.numpy() for k, v in ckpt[CONTROLS].items()}
        self.batches: list[str] = list(ckpt[BATCHES])  # empty: the model takes no batch input
        self.control_batches: dict[str, np.ndarray] = {k: v.numpy() for k, v in ckpt[CONTROL_BATCHES].items()}
        self.config: dict = ckpt[CONFIG]
        self.table = CandidateTable.from_store(store, self.cell_types)

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike[str],
        *,
        index: str | os.PathLike[str] | None = None,
        retrieval_url: str | None = None,
        embeddings: str | os.PathLike[str] | None = None,
        device: str = "cpu",
    ) -> Predictor:
        """Rebuild the model from ``checkpoint``.

        Retrieval uses ``index`` (a store directory) or ``retrieval_url`` (a running service, with ``embeddings``,
        the gene table it was built from); by default whatever the checkpoint was trained with.
        """
        dev = torch.device(device)
        ckpt = load_checkpoint(checkpoint, map_location=dev)
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
        return cls(model.to(dev), store, ckpt, device=dev)

    def predict(
        self,
        cell_type: str,
        perturbations: list[str],
        *,
        n_cells: int = 64,
        seed: int = 0,
        ctrl: np.ndarray | None = None,
        batch: str | None = None,
    ) -> list[Prediction]:
        """Predicted cells for each perturbation in ``cell_type``.

        ``ctrl`` ``(S, G)`` gives the control cells to perturb; by default ``n_cells`` are drawn (seeded) from the
        checkpoint's cached controls of ``cell_type``. The query's own (cell type, perturbation) entry is
        excluded from retrieval, as in training. ``batch`` names a technical batch the model was trained with
        (``batch_col``); the default control cells then come from that batch, and the model is told it.
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
        if ctrl is None:
            pool_cells = self.controls[cell_type]
            if batch_code >= 0:
                pool_cells = pool_cells[self.control_batches[cell_type] == batch_code]
                if not len(pool_cells):
                    msg = f"no cached control cells of cell type {cell_type!r} in batch {batch!r}; pass ctrl="
                    raise ValueError(msg)
            rng = np.random.default_rng(seed)
            ctrl = pool_cells[rng.choice(len(pool_cells), size=n_cells, replace=len(pool_cells) < n_cells)]
        ctrl = np.asarray(ctrl, dtype=np.float32)
        if ctrl.ndim != 2 or ctrl.shape[1] != len(self.genes):
            msg = f"control cells must be (n_cells, {len(self.genes)}), got {ctrl.shape}"
            raise ValueError(msg)
        if not np.isfinite(ctrl).all():
            msg = "control cells contain NaN or inf"
            raise ValueError(msg)
        emb = self.store.index.embeddings
        genes = {g for p in perturbations for g in parse_perturbation(p, control_label=self.config["control_label"])}
        unknown = sorted(g for g in genes if emb.resolve(g) is None)
        if unknown:
            raise UnknownGeneError(unknown, self.store.index.suggest(unknown))
        pairs = [(cell_type, p) for p in perturbations]
        queries = retrieve_candidates(
            self.store, pairs, cell_types=self.cell_types, k=self.model.config.n_candidates,
            random_candidates=self.model.config.variant == "random_retrieval",
            control_label=self.config["control_label"], rng=np.random.default_rng(seed),
        )  # fmt: skip
        if len(queries) < len(pairs):
            dropped = sorted({p for _, p in pairs} - {p for _, p in queries.pairs})
            msg = f"perturbation(s) {dropped} have a gene without an embedding; cannot retrieve for them"
            raise KeyError(msg)
        n = len(queries)
        batch = Batch(
            ctrl=torch.from_numpy(ctrl).expand(n, -1, -1).contiguous(),
            query=torch.from_numpy(queries.query),
            cell_type=torch.from_numpy(queries.cell_type),
            **self.table.gather(queries.cand_ids),
            batch_id=torch.full((n,), batch_code, dtype=torch.int64) if self.batches else None,
        ).to(self.device)
        with torch.no_grad():
            pred, _, info = self.model(batch, stochastic=False)
        pred = pred.float().cpu().numpy()
        cos = torch.einsum("bke,be->bk", batch.cand_emb.float(), batch.query.float()).cpu().numpy()
        scores, weights = info["scores"].cpu().numpy(), info["weights"].cpu().numpy()
        out = []
        for b, (_, label) in enumerate(queries.pairs):
            valid = queries.cand_ids[b] >= 0
            cid = queries.cand_ids[b][valid]
            cts, labs = self.store.entries(cid)
            frame = pd.DataFrame({
                "id": cid, "cell_type": cts.astype(str), "perturbation": labs.astype(str),
                "cosine": cos[b][valid], "score": scores[b][valid], "weight": weights[b][valid],
            })  # fmt: skip
            frame["selected"] = frame["weight"] > 0
            out.append(Prediction(perturbation=label, cells=pred[b], ctrl=ctrl, candidates=frame))
        return out

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
            p.perturbation: {c: p.candidates[c].to_numpy() for c in p.candidates.columns} for p in preds
        }
        adata.uns["ptrag_predict"] = {"cell_type": cell_type, "n_cells": n_cells, "seed": seed, "batch": batch or "",
                                      "variant": self.model.config.variant}  # fmt: skip
        return adata
