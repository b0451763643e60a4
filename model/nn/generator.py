"""Set generator: a transformer over [control cells; query; selected context] that predicts each cell's shift.

No positional encoding anywhere, so the output is equivariant to the order of the control cells and invariant to
the order of the context tokens. Three learned segment vectors tell the kinds of token apart instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from model.nn.ptrag import PTRAGConfig

__all__ = ["MLP", "Block", "CandidateTokens", "SelfAttention", "SetGenerator"]


class CandidateTokens(nn.Module):
    """One token per candidate: a projection of [profile code, embedding projection, cell-type embedding, cosine]."""

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * config.d_model + 1, config.d_model)

    def forward(self, profile: Tensor, cand: Tensor, cand_cell_type: Tensor, cos: Tensor) -> Tensor:
        """profile, cand, cand_cell_type (B, K, d), cos (B, K) -> tokens (B, K, d)."""
        return self.proj(torch.cat([profile, cand, cand_cell_type, cos.unsqueeze(-1)], dim=-1))  # (B, K, 3d+1)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; padded context tokens are hidden as keys."""

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """x (B, L, d), key_mask (B, L) bool with True = attend, or None -> (B, L, d)."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))  # (B, L, d)


class MLP(nn.Module):
    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d)."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class SetGenerator(nn.Module):
    """[cells (S); query (1); context (c)] -> a shift in gene space for each of the S cells.

    The head is initialised small (``config.head_init_std``), so an untrained model predicts ctrl + ~0.
    """

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.segment = nn.Parameter(torch.randn(3, config.d_model) * 0.02)  # cell / query / context
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.n_genes)
        nn.init.normal_(self.head.weight, std=config.head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, cells: Tensor, query: Tensor, context: Tensor | None, context_mask: Tensor | None, *, pool: bool = False
    ) -> Tensor:
        """cells (B, S, d), query (B, d), context (B, c, d) with context_mask (B, c) bool, or both None -> (B, S, G),
        or with ``pool`` the mean shift over the set (B, 1, G)."""
        B, S, _ = cells.shape
        parts = [cells + self.segment[0], (query + self.segment[1]).unsqueeze(1)]  # (B, S, d), (B, 1, d)
        key_mask = None
        if context is not None:
            parts.append(context + self.segment[2])  # (B, c, d)
            if context_mask is not None:
                always = context_mask.new_ones(B, S + 1)  # cells and query are never padding
                key_mask = torch.cat([always, context_mask], dim=1)  # (B, S + 1 + c)
        x = torch.cat(parts, dim=1)  # (B, L, d), L = S + 1 + c
        for block in self.blocks:
            x = block(x, key_mask)
        h = self.ln_f(x[:, :S])  # (B, S, d): only the cell positions are decoded
        if pool:  # the head is affine: decoding the mean state is the mean of the decoded cells, at 1/S the cost
            h = h.mean(1, keepdim=True)  # (B, 1, d)
        return self.head(h)  # (B, S or 1, G)
