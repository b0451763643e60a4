"""First comparison of the PT-RAG variants and the non-neural baselines on the simulated default (few-shot).

Runs the main job (simulate, profiles, split, index) if its run directory is missing, trains each variant
briefly (resumable: finished runs are reused), and scores every model on the split's test pairs with the same
control cells: energy distance between predicted and observed cells, Pearson correlation of the predicted vs
observed mean change, and MSE of the means. The full metric panel, control halves and seeds are the
evaluation issue's; this table is the model issue's first look.

Usage: python benchmarks/variants_table.py [--run artifacts/default] [--steps 300] [--out ...md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from tqdm.auto import tqdm

from model.baselines import BASELINES, make_baseline
from model.config import VARIANTS, TrainConfig
from model.data.splits import Split
from model.losses import energy_distance
from model.pipeline import RunConfig, run_main_job
from model.predict import Predictor
from model.train import train
from retrieval_service.embeddings import load_embeddings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="artifacts/default")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-cells", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/variants_table.md")
    args = ap.parse_args()
    run = Path(args.run)
    summary = run_main_job(RunConfig(out=run, seed=args.seed, stop_after="index"))
    cells = ad.read_h5ad(run / "cells.h5ad")
    profiles = ad.read_h5ad(run / "profiles.h5ad")
    split = Split.load(run / "split.json")
    embeddings = load_embeddings(next(run.glob("*.embeddings.npz")))

    models: dict[str, object] = {}
    for variant in VARIANTS:
        cfg = TrainConfig(run_dir=str(run / "train" / variant), data=str(run / "cells.h5ad"),
                          split=str(run / "split.json"), index=str(run / "index"), variant=variant,
                          max_steps=args.steps, eval_every=100, seed=args.seed, patience=0)  # fmt: skip
        train(cfg)
        models[variant] = Predictor.load(Path(cfg.run_dir) / "best.pt")
    for name in BASELINES:
        models[name] = make_baseline(name).fit(profiles, train_pairs=split.train, embeddings=embeddings)

    obs_ct = cells.obs["cell_line"].astype(str).to_numpy()
    obs_pert = cells.obs["gene"].astype(str).to_numpy()
    rng = np.random.default_rng(args.seed)
    scores: dict[str, dict[str, list[float]]] = {m: {"energy": [], "pearson_delta": [], "mse_mean": []} for m in models}
    for ct, pert in tqdm(split.test, desc="scoring test pairs"):
        ctrl_rows = np.flatnonzero((obs_ct == ct) & (obs_pert == "non-targeting"))
        ctrl = cells.X[rng.choice(ctrl_rows, size=args.n_cells, replace=False)].toarray()
        observed = cells.X[np.flatnonzero((obs_ct == ct) & (obs_pert == pert))].toarray()
        true_delta = observed.mean(0) - ctrl.mean(0)
        for name, model in models.items():
            if isinstance(model, Predictor):
                pred = model.predict(ct, [pert], ctrl=ctrl)[0].cells
            else:
                pred = model.predict_cells(ctrl, ct, pert)
            delta = pred.mean(0) - ctrl.mean(0)
            s = scores[name]
            s["energy"].append(float(energy_distance(torch.from_numpy(pred)[None], torch.from_numpy(observed)[None])))
            s["pearson_delta"].append(float(np.corrcoef(delta, true_delta)[0, 1]) if delta.std() > 0 else 0.0)
            s["mse_mean"].append(float(np.mean((pred.mean(0) - observed.mean(0)) ** 2)))

    def cell(values: list[float]) -> str:
        v = np.asarray(values)
        return f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}"

    best = {m: (min if m != "pearson_delta" else max)(scores, key=lambda n, m=m: np.mean(scores[n][m]))
            for m in ("energy", "pearson_delta", "mse_mean")}  # fmt: skip
    lines = [
        "# PT-RAG variants and baselines on the simulated default (few-shot cell-type transfer)",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Split `{split.kind}` id `{split.split_id}`, seed {split.seed}, target `{split.params['target_cell_type']}`: "
        f"{len(split.train)} train / {len(split.val)} val / {len(split.test)} test pairs; "
        f"{summary['n_cells']:,} cells x {summary['n_genes']} genes. Neural variants: {args.steps} steps, default "
        f"model (d=128, 4 layers, K=32, k=8, B=16 x S=64), best validation checkpoint. Every model perturbs the same "
        f"{args.n_cells} control cells per test pair (seed {args.seed}); mean ± s.e.m. over test pairs; best in bold.",
        "",
        "| model | energy distance ↓ | Pearson delta ↑ | MSE of means ↓ |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in models:
        row = []
        for m in ("energy", "pearson_delta", "mse_mean"):
            text = cell(scores[name][m])
            row.append(f"**{text}**" if best[m] == name else text)
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
