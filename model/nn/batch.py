"""The tensors one PT-RAG step consumes: a batch of B cell sets, each with its K retrieved candidates."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

__all__ = ["Batch"]


@dataclass
class Batch:
    """B query cell sets with their retrieved candidates (the data side builds it; the model only reads it).

    Attributes
    ----------
    ctrl
        (B, S, G) float32: S control cells of the target cell type, log-normalised expression.
    query
        (B, E) float32: query perturbation embedding, L2-normalised (for A+B, the normalised sum of A and B).
    cell_type
        (B,) int64: target cell-type index.
    cand_emb
        (B, K, E) float32: candidate key embeddings, L2-normalised.
    cand_cell_type
        (B, K) int64: candidate cell-type index.
    cand_delta
        (B, K, G) float32: candidate pseudobulk delta profiles (mean change vs control).
    cand_mask
        (B, K) bool: True for real candidates, False for padding. Candidates are sorted by stage-1 cosine, best
        first; padded ones are never selected and never weighted.
    target
        (B, T, G) float32 observed perturbed cells, or None at inference. T may differ from S.
    batch_id
        (B,) int64 technical batch (e.g. gem group) the set's cells come from, -1 where unknown; or None.
    cell_tokens
        (B, S, d) the control cells already encoded (``PTRAG.cells``), or None to encode ``ctrl``. Inference
        precomputes them for the checkpoint's cached control cells: the encoder works cell by cell.
    cand_proj, cand_profile
        (B, K, d) each: the candidates already encoded (``PTRAG.encode_candidates``), or None to encode
        ``cand_emb`` and ``cand_delta``. Inference precomputes them once per store entry.
    """

    ctrl: Tensor
    query: Tensor
    cell_type: Tensor
    cand_emb: Tensor
    cand_cell_type: Tensor
    cand_delta: Tensor
    cand_mask: Tensor
    target: Tensor | None = None
    batch_id: Tensor | None = None
    cell_tokens: Tensor | None = None
    cand_proj: Tensor | None = None
    cand_profile: Tensor | None = None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (``non_blocking`` pairs with pinned host memory)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = None if value is None else value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def validate(self) -> Batch:
        """Assert shapes, dtypes and the mask agree with one another; returns self so calls can chain."""
        assert self.ctrl.dim() == 3, f"ctrl must be (B, S, G), got {tuple(self.ctrl.shape)}"
        B, S, G = self.ctrl.shape
        assert self.cand_emb.dim() == 3, f"cand_emb must be (B, K, E), got {tuple(self.cand_emb.shape)}"
        K, E = self.cand_emb.shape[1:]
        expected = {
            "ctrl": (B, S, G),
            "query": (B, E),
            "cell_type": (B,),
            "cand_emb": (B, K, E),
            "cand_cell_type": (B, K),
            "cand_delta": (B, K, G),
            "cand_mask": (B, K),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            assert got == shape, f"{name} has shape {got}, expected {shape} (B={B}, S={S}, G={G}, K={K}, E={E})"
        for name in ("ctrl", "query", "cand_emb", "cand_delta"):
            assert getattr(self, name).is_floating_point(), f"{name} must be float, got {getattr(self, name).dtype}"
        for name in ("cell_type", "cand_cell_type"):
            assert getattr(self, name).dtype == torch.int64, f"{name} must be int64, got {getattr(self, name).dtype}"
        assert self.cand_mask.dtype == torch.bool, f"cand_mask must be bool, got {self.cand_mask.dtype}"
        if self.batch_id is not None:
            assert tuple(self.batch_id.shape) == (B,) and self.batch_id.dtype == torch.int64, (
                f"batch_id must be int64 (B={B},), got {self.batch_id.dtype} {tuple(self.batch_id.shape)}"
            )
        if self.cell_tokens is not None:
            assert tuple(self.cell_tokens.shape[:2]) == (B, S), f"cell_tokens must be (B={B}, S={S}, d)"
        assert (self.cand_proj is None) == (self.cand_profile is None), "cand_proj and cand_profile come together"
        if self.cand_proj is not None:
            for name in ("cand_proj", "cand_profile"):
                got = tuple(getattr(self, name).shape[:2])
                assert got == (B, K), f"{name} must be (B={B}, K={K}, d), got {got}"
        if self.target is not None:
            assert self.target.dim() == 3 and self.target.shape[0] == B and self.target.shape[2] == G, (
                f"target must be (B={B}, T, G={G}), got {tuple(self.target.shape)}"
            )
        return self

    @property
    def n_sets(self) -> int:
        """B, the number of cell sets."""
        return self.ctrl.shape[0]

    @property
    def n_cells(self) -> int:
        """B * S, the number of control cells (the unit of throughput)."""
        return self.ctrl.shape[0] * self.ctrl.shape[1]
