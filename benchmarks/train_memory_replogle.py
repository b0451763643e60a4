"""Peak memory of training on simulated Replogle-Nadig-scale data (4 lines x 2,000 knockdowns x 75 cells x 2,000
genes, ~630k cells), against the size of the expression matrix.

Steps: simulate (streamed to disk), run the main job on it (profiles, few-shot split, index), then train the
default model for a few steps in a child process and read that process's peak RSS (ru_maxrss).

Usage: python benchmarks/train_memory_replogle.py [--work /tmp/ptrag_rn] [--steps 20] [--fraction 1.0]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad

from model.data.simulator import SimulatorConfig, simulate_to_h5ad
from model.pipeline import RunConfig, run_main_job


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ptrag_rn")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=1.0, help="scale the number of perturbations (quick checks)")
    ap.add_argument("--out", default="benchmarks/results/train_memory_replogle.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    full = SimulatorConfig.replogle_scale()
    n_pert = max(10, int(full.n_perturbations * args.fraction))
    sim = SimulatorConfig.replogle_scale(n_perturbations=n_pert, n_perturbation_pool=n_pert)
    data, emb = work / "rn.h5ad", work / "rn.embeddings.npz"
    t0 = time.perf_counter()
    if not data.exists():
        simulate_to_h5ad(sim, data, seed=0, n_workers=2, embeddings_path=emb)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = work / "run"
    summary = run_main_job(RunConfig(out=run, data=data, embeddings=emb, target_cell_type="rpe1", stop_after="index"))
    t_job = time.perf_counter() - t0
    main_job_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cells = ad.read_h5ad(run / "cells.h5ad", backed="r")
    n_cells, n_genes = cells.shape
    x = cells.X
    nnz = x.group["data"].shape[0] if hasattr(x, "group") else x.nnz
    csr_bytes = nnz * 4 + nnz * 4 + (n_cells + 1) * 8
    dense_bytes = n_cells * n_genes * 4
    cells.file.close()

    cmd = [sys.executable, "-m", "api.cli", "train", "--no-progress", "--data", str(run / "cells.h5ad"),
           "--split", str(run / "split.json"), "--index", str(run / "index"), "--run-dir", str(work / "train"),
           "--max-steps", str(args.steps), "--eval-every", str(args.steps)]  # fmt: skip
    shutil.rmtree(work / "train", ignore_errors=True)  # a fresh run, not a resume
    # ru_maxrss of a child forked from this (by now large) process would count the pages it inherited before
    # exec; a small launcher process forks the trainer instead and reports its peak.
    launcher = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", launcher, *cmd], check=True, capture_output=True, text=True)
    t_train = time.perf_counter() - t0
    train_rss = int(done.stdout.strip().splitlines()[-1]) * 1024

    gib = 2**30
    lines = [
        "# Training memory at Replogle-Nadig scale (simulated)",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"{n_cells:,} cells x {n_genes:,} genes, {summary['n_groups']:,} (cell line, perturbation) groups, "
        f"split {summary['split']['id']} ({summary['split']['train']} train pairs). Training: default model, "
        f"{args.steps} steps, B=16 x S=64, in a child process.",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| expression matrix X, CSR float32 in memory | {csr_bytes / gib:.2f} GiB "
        f"({nnz / (n_cells * n_genes):.1%} non-zero) |",
        f"| the same, dense float32 | {dense_bytes / gib:.2f} GiB |",
        f"| **peak RSS of the training process** | **{train_rss / gib:.2f} GiB** |",
        f"| training peak / X (CSR) | {train_rss / csr_bytes:.2f}x |",
        f"| training peak / X (dense) | {train_rss / dense_bytes:.2f}x |",
        f"| peak RSS of the main job (read, prepare, profiles, index) | {main_job_rss / gib:.2f} GiB |",
        f"| time: simulate / main job / train ({args.steps} steps incl. loading) "
        f"| {t_sim:.0f} s / {t_job:.0f} s / {t_train:.0f} s |",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
