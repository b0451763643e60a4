"""Stage 2 of retrieval: score the K stage-1 candidates in context and keep k of them.

``Refiner`` scores; ``gumbel_topk`` turns scores into a (B, k, K) selection matrix, differentiably in training
(Gumbel-Softmax top-k, straight-through) and as a plain top-k at inference; ``first_k`` is the stage-1-only
selection (the k best-cosine valid candidates) used by the baselines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from model.nn.ptrag import PTRAGConfig

__all__ = ["Refiner", "first_k", "gumbel_topk"]


class Refiner(nn.Module):
    """Score each candidate: stage 1's cosine plus a bounded learned correction from cell state, query and candidate.

    score = scale * cos + b * tanh(MLP(features) / b), b = ``config.refiner_max_correction``.

    - Training starts from stage 1's ranking: the MLP's output layer is zero and ``scale`` (learned) starts at
      ``config.refiner_cos_scale``. From a random scorer the generator would rarely see a useful candidate, never
      learn to use one, and give the refiner no signal in return.
    - The correction is bounded. Straight-through gradients are biased and Adam turns weak but consistent ones into
      full-size steps: in one of our synthetic setups an unbounded MLP drifted (towards small deltas, which hedge)
      until it overrode stage 1, and a candidate whose probability has saturated near 0 gets no gradient to come
      back. With cosines spread over ~0.2 (GenePT) and scale 10, a bound of 3 still allows any re-ordering of the K.
    - q * c sits beside the raw cosine so the MLP can learn a similarity in projected space (which dimensions of
      the embedding matter for this cell state). Inputs are layer-normalised: they come from encoders that the
      generator trains, and their scale drifts.
    """

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        d = config.d_model
        self.scale = nn.Parameter(torch.tensor(float(config.refiner_cos_scale)))
        self.bound = config.refiner_max_correction
        self.mlp = nn.Sequential(nn.LayerNorm(7 * d + 1), nn.Linear(7 * d + 1, d), nn.GELU(), nn.Linear(d, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(
        self,
        state: Tensor,
        query: Tensor,
        cell_type: Tensor,
        cand: Tensor,
        cand_cell_type: Tensor,
        profile: Tensor,
        cos: Tensor,
    ) -> Tensor:
        """Per-set features state, query, cell_type (B, d); per-candidate cand, cand_cell_type, profile (B, K, d) and
        cos (B, K) -> scores (B, K)."""
        K = cand.shape[1]
        per_set = torch.cat([state, query, cell_type], dim=-1).unsqueeze(1).expand(-1, K, -1)  # (B, K, 3d)
        per_cand = torch.cat([cand, cand_cell_type, profile, query.unsqueeze(1) * cand, cos.unsqueeze(-1)], -1)
        correction = self.mlp(torch.cat([per_set, per_cand], dim=-1)).squeeze(-1)  # (B, K, 7d+1) -> (B, K)
        return self.scale * cos + self.bound * torch.tanh(correction / self.bound)  # (B, K)


def gumbel_topk(
    scores: Tensor,
    k: int,
    *,
    tau: float,
    mask: Tensor | None = None,
    hard: bool = True,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    gumbel: Tensor | None = None,
) -> Tensor:
    """Select k of K candidates as k successive softmax draws without replacement.

    One Gumbel sample perturbs the scores; draw i is the softmax at temperature ``tau`` over the candidates not yet
    drawn. The hard draws are then exactly the top-k of the perturbed scores, i.e. a sample of k candidates without
    replacement from softmax(scores) (the Gumbel-top-k trick), while the soft rows give the gradient.

    Parameters
    ----------
    scores
        (B, K) candidate scores (computed in float32 whatever their dtype).
    k
        Number of draws (rows of the result).
    tau
        Softmax temperature (> 0) of the relaxation; the trainer anneals it.
    mask
        (B, K) bool, True for candidates that may be drawn; None means all. With fewer than k valid candidates the
        remaining rows are all zero.
    hard
        True: straight-through, the forward value of each row is the one-hot draw and the backward pass uses the
        soft probabilities. False: the soft probabilities themselves.
    stochastic
        False: no noise, so the hard rows are the deterministic top-k of ``scores`` in descending order (inference).
    generator
        Source of the Gumbel noise, on the device of ``scores``; None uses the global RNG.
    gumbel
        (B, K) standard Gumbel noise to use instead of drawing it (stochastic only). The trainer draws it per set
        from the set's own seed, so a batch split over data-parallel processes gets the noise one process would.

    Returns
    -------
    (B, k, K) float32 selection matrix: row i is draw i; rows are distinct and zero on masked candidates.
    """
    if tau <= 0:
        msg = f"tau must be > 0, got {tau}"
        raise ValueError(msg)
    K = scores.shape[-1]
    logits = scores.float()
    if stochastic and gumbel is not None:
        assert gumbel.shape == logits.shape, f"gumbel noise {tuple(gumbel.shape)} != scores {tuple(logits.shape)}"
        logits = logits + gumbel.to(logits)
    elif stochastic:
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_min(
            torch.finfo(torch.float32).tiny
        )
        logits = logits - torch.log(-torch.log(u))  # + Gumbel(0, 1)
    logits = logits / tau
    available = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.clone()  # (B, K)
    rows = []
    for _ in range(k):
        any_left = available.any(dim=-1, keepdim=True)  # (B, 1); False once the valid candidates run out
        masked = logits.masked_fill(~available, float("-inf")).masked_fill(~any_left, 0.0)  # no all -inf rows: NaN
        soft = masked.softmax(dim=-1)  # (B, K)
        onehot = F.one_hot(masked.argmax(dim=-1), K).to(soft.dtype)  # (B, K)
        row = onehot + (soft - soft.detach()) if hard else soft  # forward value exactly the one-hot
        rows.append(row * any_left)
        available = available & ~onehot.bool()
    return torch.stack(rows, dim=1)  # (B, k, K)


def first_k(mask: Tensor, k: int) -> Tensor:
    """Stage-1-only selection: the first k valid candidates (they arrive sorted by cosine, best first).

    mask (B, K) bool -> (B, k, K) float32 one-hot rows, zero rows where fewer than k are valid.
    """
    position = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)  # (K,)
    scores = -position.expand(mask.shape)  # (B, K): earlier is better
    return gumbel_topk(scores, k, tau=1.0, mask=mask, stochastic=False).detach()
