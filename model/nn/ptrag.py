"""PT-RAG: refine the retrieved candidates for this cell state, then generate the perturbed cell set.

One module, four variants that share the code and the data (``PTRAGConfig.variant``):

- ``ptrag``: the refiner scores all K candidates and Gumbel top-k keeps k of them as k context tokens.
- ``vanilla_rag``: stage 1 only. The first k valid candidates (best cosine) averaged into ONE context token.
- ``no_retrieval``: no context, only the query token (a STATE-like baseline).
- ``random_retrieval``: the first k valid candidates as k context tokens, no refiner. The model does nothing
  random itself: the data side hands this variant K randomly drawn training perturbations instead of the
  nearest ones, so "first k" is a random k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import VARIANTS
from model.losses import combined_loss
from model.nn.batch import Batch
from model.nn.encoder import CellEncoder, GeneMLP
from model.nn.generator import CandidateTokens, SetGenerator
from model.nn.refiner import Refiner, first_k, gumbel_topk

__all__ = ["PTRAG", "VARIANTS", "PTRAGConfig"]


@dataclass(kw_only=True)
class PTRAGConfig:
    """Every size and weight of the model; a checkpoint stores ``dataclasses.asdict`` of it."""

    n_genes: int = 2000  # G, genes in every expression and delta profile
    emb_dim: int = 1536  # E, perturbation-embedding size (GenePT with ada-002 is 1536)
    n_cell_types: int = 8  # rows of the cell-type embedding table; indices must be < this
    d_model: int = 128  # d
    n_layers: int = 4  # generator transformer blocks
    n_heads: int = 4
    mlp_ratio: int = 4  # hidden width of the transformer MLP, in units of d
    n_candidates: int = 32  # K the data side retrieves; a default for it, the model itself accepts any K
    n_select: int = 8  # k kept by the refiner (or taken from stage 1 by the baselines)
    refiner_cos_scale: float = 10.0  # initial (learned) weight of the stage-1 cosine in the refiner score
    refiner_max_correction: float = 3.0  # bound on the refiner's learned change to that score (see Refiner)
    dropout: float = 0.0
    variant: str = "ptrag"  # one of VARIANTS
    energy_weight: float = 1.0  # loss = energy * ED + mmd * MMD^2 + mse * pseudobulk MSE
    mmd_weight: float = 0.0
    mse_weight: float = 0.0
    head_init_std: float = 1e-3  # output projection init: small, so an untrained model predicts ~control
    n_batches: int = 0  # rows of the technical-batch embedding (e.g. gem groups); 0: no batch input

    def __post_init__(self) -> None:
        for name in ("n_genes", "emb_dim", "n_cell_types", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.n_batches < 0:
            msg = f"n_batches must be >= 0, got {self.n_batches}"
            raise ValueError(msg)
        if self.d_model % self.n_heads:
            msg = f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            raise ValueError(msg)
        if not 1 <= self.n_select <= self.n_candidates:
            msg = f"need 1 <= n_select <= n_candidates, got n_select={self.n_select}, n_candidates={self.n_candidates}"
            raise ValueError(msg)
        if not 0.0 <= self.dropout < 1.0:
            msg = f"dropout must be in [0, 1), got {self.dropout}"
            raise ValueError(msg)
        if self.variant not in VARIANTS:
            msg = f"variant must be one of {VARIANTS}, got {self.variant!r}"
            raise ValueError(msg)
        weights = (self.energy_weight, self.mmd_weight, self.mse_weight)
        if min(weights) < 0 or max(weights) == 0:
            msg = f"loss weights must be >= 0 and not all 0, got energy/mmd/mse = {weights}"
            raise ValueError(msg)
        if self.refiner_max_correction <= 0:
            msg = f"refiner_max_correction must be > 0, got {self.refiner_max_correction}"
            raise ValueError(msg)
        if self.head_init_std < 0:
            msg = f"head_init_std must be >= 0, got {self.head_init_std}"
            raise ValueError(msg)


class PTRAG(nn.Module):
    """Control cells + query + K candidates -> predicted perturbed cells (see the module docstring for variants)."""

    def __init__(self, config: PTRAGConfig) -> None:
        super().__init__()
        self.config = config
        d, uses_context = config.d_model, config.variant != "no_retrieval"
        self.cells = CellEncoder(config)
        self.emb = nn.Linear(config.emb_dim, d)  # query and candidates live in one embedding space: one projection
        self.cell_type = nn.Embedding(config.n_cell_types, d)
        self.batch = nn.Embedding(config.n_batches, d) if config.n_batches else None
        self.profiles = GeneMLP(config) if uses_context else None  # candidate delta -> d
        self.candidates = CandidateTokens(config) if uses_context else None
        self.refiner = Refiner(config) if config.variant == "ptrag" else None
        self.generator = SetGenerator(config)
        # Copy path: the kept candidates' mean delta, scaled by a learned gain (starting at 0, so an untrained
        # model still predicts ~control). It gives retrieval a direct route to the output that the d-wide token
        # bottleneck would otherwise have to learn to reproduce, and it is what the refiner's choice acts on.
        self.copy_gain = nn.Parameter(torch.zeros(())) if uses_context else None

    def forward(
        self,
        batch: Batch,
        *,
        tau: float = 1.0,
        stochastic: bool | None = None,
        generator: torch.Generator | None = None,
        gumbel: Tensor | None = None,
        pool: bool = False,
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor | dict[str, Tensor]]]:
        """Predict the perturbed cells for each set; the loss only when ``batch.target`` is given.

        Parameters
        ----------
        batch
            See `Batch`. K may differ from ``config.n_candidates``.
        tau
            Gumbel-Softmax temperature (ptrag only; the trainer anneals it).
        stochastic
            Gumbel noise in the selection; None means ``self.training``. False gives the deterministic top-k.
        generator
            RNG for the Gumbel noise (on the batch's device); None uses the global one.
        gumbel
            (B, K) Gumbel noise to use instead of drawing it (see `gumbel_topk`).
        pool
            Predict only the mean of the cells (inference without a target): pred is (B, 1, G), equal to the mean
            over S of the unpooled pred, for ~1/3 less work at S=64 (no (B, S, G) output).

        Returns
        -------
        pred
            (B, S, G) predicted perturbed cells, one per control cell: ctrl + predicted shift; (B, 1, G) with pool.
        loss
            Scalar `combined_loss`, or None without a target.
        info
            ``scores`` (B, K): refiner scores (ptrag) or stage-1 cosines (others), -inf on padded candidates.
            ``selection`` (B, k, K): the k selection rows, forward values (all zero for no_retrieval; vanilla_rag
            averages its rows into its one context token).
            ``selected`` (B, k) int64: indices of the kept candidates in draw order, -1 for empty slots.
            ``weights`` (B, K): each candidate's share of the context, 0 unless kept, summing to 1 over the kept
            ones: uniform for the baselines; for ptrag softmax(scores / tau) over the kept ones (its generator sees
            every kept candidate as a full token, so this is the refiner's relevance, for explanation).
            ``cosine`` (B, K): the stage-1 cosine of each candidate's key to the query (padding included).
            ``ctrl_mean`` (B, G): the mean of each set's control cells (what a predicted delta is measured from),
            only without a target (inference; training has no use for it).
            ``loss_terms``: ``{name: (B,)}`` per-set loss components, only when a target is given.
        """
        cfg = self.config
        G, E = batch.ctrl.shape[-1], batch.query.shape[-1]
        assert (G, E) == (cfg.n_genes, cfg.emb_dim), f"batch has G={G}, E={E}; config has {cfg.n_genes}, {cfg.emb_dim}"
        stochastic = self.training if stochastic is None else stochastic
        assert not (pool and batch.target is not None), "the loss needs every predicted cell: pool only at inference"
        mask = batch.cand_mask  # (B, K)

        if batch.cell_tokens is None:
            cells, state = self.cells(batch.ctrl)  # (B, S, d), (B, d)
        else:
            cells, state = batch.cell_tokens, batch.cell_tokens.mean(dim=1)  # (B, S, d), (B, d)
        query = self.emb(batch.query)  # (B, d)
        cell_type = self.cell_type(batch.cell_type)  # (B, d)
        # float32 even under autocast: GenePT cosines differ in the third digit, finer than bf16 resolves.
        with torch.autocast(device_type=batch.query.device.type, enabled=False):
            cos = torch.einsum("bke,be->bk", batch.cand_emb.float(), batch.query.float())  # (B, K)
        scores = cos
        if self.profiles is None:  # no_retrieval
            context = selection = used = copied = None
        else:
            if batch.cand_proj is None:
                cand, profile = self.encode_candidates(batch.cand_emb, batch.cand_delta)  # (B, K, d) each
            else:
                cand, profile = batch.cand_proj, batch.cand_profile
            cand_cell_type = self.cell_type(batch.cand_cell_type)  # (B, K, d)
            tokens = self.candidates(profile, cand, cand_cell_type, cos)  # (B, K, d)
            if self.refiner is not None:
                scores = self.refiner(state, query, cell_type, cand, cand_cell_type, profile, cos)  # (B, K)
                selection = gumbel_topk(
                    scores, cfg.n_select, tau=tau, mask=mask, stochastic=stochastic, generator=generator, gumbel=gumbel
                )
            else:
                selection = first_k(mask, cfg.n_select)  # (B, k, K)
            used = selection.detach().sum(-1) > 0.5  # (B, k) slots holding a candidate
            rows = selection
            if cfg.variant == "vanilla_rag":
                rows = selection.sum(1, keepdim=True) / used.sum(1).clamp_min(1)[:, None, None]  # (B, 1, K)
                used = used.any(1, keepdim=True)  # (B, 1)
            context = rows.to(tokens.dtype) @ tokens  # (B, c, d)
            copied = rows.to(batch.cand_delta.dtype) @ batch.cand_delta  # (B, c, G)
            copied = (copied * used[..., None]).sum(1) / used.sum(1, keepdim=True).clamp_min(1)  # (B, G)

        cond = query + cell_type  # (B, d): the query token
        if self.batch is not None and batch.batch_id is not None:
            known = (batch.batch_id >= 0).unsqueeze(-1)  # (B, 1); -1 = unknown batch, no embedding added
            cond = cond + self.batch(batch.batch_id.clamp(min=0)) * known
        ctrl_mean = batch.ctrl.mean(dim=1, keepdim=True) if pool or batch.target is None else None  # (B, 1, G)
        ctrl = ctrl_mean if pool else batch.ctrl  # (B, 1 or S, G)
        pred = ctrl + self.generator(cells, cond, context, used, pool=pool)  # (B, 1 or S, G)
        if self.copy_gain is not None:
            pred = pred + self.copy_gain * copied[:, None, :]  # (B, 1 or S, G)
        info = self._explain(scores, selection, mask, tau=tau)
        info["cosine"] = cos.detach()
        if ctrl_mean is not None:
            info["ctrl_mean"] = ctrl_mean.detach().squeeze(1)  # (B, G)
        loss = None
        if batch.target is not None:
            loss, info["loss_terms"] = combined_loss(pred, batch.target, cfg)
        return pred, loss, info

    def encode_candidates(self, cand_emb: Tensor, cand_delta: Tensor) -> tuple[Tensor, Tensor]:
        """cand_emb (..., E), cand_delta (..., G) -> their projection and profile code, (..., d) each.

        A function of the candidate alone (shared by the refiner and the context tokens), so inference can
        compute it once per store entry and pass it in the batch (``Batch.cand_proj``, ``Batch.cand_profile``).
        """
        assert self.profiles is not None, "no_retrieval has no candidate encoder"
        return self.emb(cand_emb), self.profiles(cand_delta)

    @torch.no_grad()
    def _explain(self, scores: Tensor, selection: Tensor | None, mask: Tensor, *, tau: float) -> dict[str, Tensor]:
        """scores (B, K), selection (B, k, K) or None, mask (B, K) -> the ``info`` dict of `forward`."""
        B, K = scores.shape
        scores = scores.float().masked_fill(~mask, float("-inf"))  # (B, K)
        if selection is None:
            selection = scores.new_zeros(B, self.config.n_select, K)
        selection = selection.float()
        kept = selection.sum(1) > 0.5  # (B, K)
        selected = torch.where(selection.sum(-1) > 0.5, selection.argmax(-1), -1)  # (B, k)
        if self.config.variant == "ptrag":
            weights = (scores / tau).masked_fill(~kept, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, K)
        else:
            weights = kept.float() / kept.sum(-1, keepdim=True).clamp_min(1)  # (B, K)
        return {"scores": scores, "selection": selection, "selected": selected, "weights": weights}

    def num_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_cell(self, n_cells: int = 64, *, n_candidates: int | None = None) -> float:
        """Matmul FLOPs of one forward pass per control cell, for sets of ``n_cells`` (S) cells and K candidates.

        Per-set work (candidate encoding, refiner, query and context tokens) is spread over the set's S cells.
        Counts 2 * m * n * k per (m, k) @ (k, n) product, including attention scores and values; elementwise ops,
        norms and the loss are left out. A backward pass costs about twice this (less: no input gradient is
        needed for the first layers). K defaults to ``config.n_candidates``.
        """
        cfg = self.config
        G, E, d, S = cfg.n_genes, cfg.emb_dim, cfg.d_model, n_cells
        K = cfg.n_candidates if n_candidates is None else n_candidates
        k = min(cfg.n_select, K)
        gene_mlp = 2 * G * d + 2 * d * d  # GeneMLP, per row
        per_set = 2 * E * d  # query projection
        n_context = 0
        if cfg.variant != "no_retrieval":
            per_set += K * (2 * E * d + 2 * E + gene_mlp + 2 * (3 * d + 1) * d)  # projection, cosine, profile, token
            n_context = 1 if cfg.variant == "vanilla_rag" else k
            per_set += 2 * n_context * K * d  # selection @ tokens
        if cfg.variant == "ptrag":
            per_set += K * (2 * (7 * d + 1) * d + 2 * d)  # refiner MLP
        L = S + 1 + n_context
        per_token = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * cfg.mlp_ratio * d  # qkv, out proj, MLP
        per_set += cfg.n_layers * L * (per_token + 2 * 2 * L * d)  # + q @ k^T and attn @ v
        per_cell = gene_mlp + 2 * d * G  # cell encoder and head
        return per_cell + per_set / S
