"""Encoders from gene space (G) to model space (d): control cells to tokens, candidate deltas to profile codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from model.nn.ptrag import PTRAGConfig

__all__ = ["CellEncoder", "GeneMLP"]


class GeneMLP(nn.Module):
    """G -> d -> d: a wide linear then a small nonlinear mixing layer.

    The G -> d linear dominates the cost; it sees every leading dimension at once, so (B, S, G) input is one
    (B*S, G) @ (G, d) matmul. Used for control cells and for candidate delta profiles (separate weights).
    """

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.n_genes, config.d_model)
        self.fc_out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(..., G) -> (..., d)."""
        return self.fc_out(F.gelu(self.fc_in(x)))


class CellEncoder(nn.Module):
    """Control cells -> one token per cell and a mean-pooled summary of the set (the target cell state).

    Mean pooling keeps the summary invariant to the order of cells and to S, so sets of any size share one model.
    Only the refiner reads the summary (it normalises its inputs itself).
    """

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.mlp = GeneMLP(config)

    def forward(self, ctrl: Tensor) -> tuple[Tensor, Tensor]:
        """ctrl (B, S, G) -> tokens (B, S, d), summary (B, d)."""
        tokens = self.mlp(ctrl)  # (B, S, d)
        return tokens, tokens.mean(dim=1)  # (B, S, d), (B, d)
