"""The benchmark: every model on the same split, for several seeds, scored with the full metric panel.

For each seed (which seeds the split, the control halves, training and every sample drawn):

1. Control halves. Each cell type's control cells are split in two: the *model half* is everything a model may
   see (its input cells, the reference of the training profiles, the baselines' deltas); the *evaluation half*
   is only the reference of the observed deltas. Shared control noise can then not inflate a correlation of
   deltas (the control-noise trap: a train-mean predictor scored Pearson 0.40 on no-signal perturbations
   against a shared control mean, 0.00 against disjoint halves).
2. Profiles from the model-half cells, a split of them, and a retrieval store of the split's training pairs.
3. Neural variants are trained on the model-half cells (``TrainConfig.exclude_cells``); baselines are fitted on
   the training profiles.
4. Every test pair: the same control cells (drawn from the model half, as many as observed cells, capped) are
   perturbed by every model, and each prediction is scored against the pair's observed cells with the
   evaluation-half controls as reference. A split-half ceiling (half the observed cells predicting the other
   half) is scored the same way.

Results land in ``out/seed<N>/``: ``exclude_cells.npy``, ``profiles.h5ad``, ``split.json``, ``index/``,
``train/<variant>/`` and ``scores/<model>.csv`` (plus ``examples/<model>.npz``: deltas of a few test pairs and,
for the retrieval variants, refiner weights). A finished (model, seed) is not redone, so an interrupted
benchmark resumes. :func:`write_benchmark_report` then writes ``out/report/`` (Markdown, CSVs, PNGs).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from model.baselines import BASELINES, make_baseline
from model.config import VARIANTS, TrainConfig
from model.data.perturbations import parse_perturbation
from model.data.profiles import compute_profiles, group_means
from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL
from model.data.splits import SPLIT_KINDS, Split, make_split
from model.eval.metrics import (
    METRICS,
    CellTypeReference,
    PCABasis,
    cell_type_reference,
    control_halves,
    fit_pca,
    observe,
    score,
    split_half,
)
from model.index_build import build_perturbation_index
from model.pipeline import cached_h5ad
from retrieval_service.atomic import atomic_path, atomic_write_text
from retrieval_service.embeddings import GeneEmbeddings, load_embeddings

__all__ = ["CEILING", "MODELS", "BenchmarkConfig", "run_benchmark", "write_benchmark_report"]

logger = logging.getLogger(__name__)

CEILING = "ceiling"  # the split-half positive control, scored with every benchmark
MODELS: tuple[str, ...] = VARIANTS + BASELINES
N_EXAMPLES = 4  # test pairs per (model, seed) whose deltas are kept for the scatter plot
_SEED_STREAMS = {"halves": 1, "cells": 2, "pca": 3, "score": 4, "profiles": 5}


@dataclass(kw_only=True)
class BenchmarkConfig:
    """One benchmark: data, split protocol, models, seeds; saved as ``config.json`` in ``out``."""

    out: Path
    data: Path
    """Prepared cells (``ptrag run`` writes ``cells.h5ad``), log-normalised."""
    embeddings: Path
    split_kind: str = "fewshot_celltype"
    target_cell_type: str | None = None
    test_frac: float = 0.3
    val_frac: float = 0.05
    cell_types: tuple[str, ...] = ()
    """Restrict the benchmark to these cell types (default: all)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    models: tuple[str, ...] = MODELS
    pert_col: str = DEFAULT_PERT_COL
    cell_type_col: str = DEFAULT_CELL_TYPE_COL
    control_label: str = DEFAULT_CONTROL_LABEL
    steps: int = 300
    """Training steps of each neural variant."""
    train: dict[str, Any] = field(default_factory=dict)
    """Other :class:`~model.config.TrainConfig` fields for the neural variants (e.g. ``d_model``)."""
    max_pred_cells: int = 256
    """Predicted set size: the observed group's size, capped here."""
    max_cells: int = 2000
    """Most cells per set in the distributional metrics (subsampled, seeded)."""
    n_pcs: int = 50
    n_sample_cells: int = 16
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        self.out, self.data, self.embeddings = Path(self.out), Path(self.data), Path(self.embeddings)
        self.seeds, self.models, self.cell_types = tuple(self.seeds), tuple(self.models), tuple(self.cell_types)
        problems = []
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            problems.append(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
        if not self.models:
            problems.append("no models to benchmark")
        if not self.seeds:
            problems.append("no seeds")
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds repeat: {self.seeds}")
        if self.split_kind not in SPLIT_KINDS:
            problems.append(f"unknown split kind {self.split_kind!r}; choose one of {SPLIT_KINDS}")
        for name in ("steps", "max_pred_cells", "max_cells", "n_pcs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        known = {f for f in TrainConfig.__dataclass_fields__}
        owned = {"run_dir", "data", "split", "index", "variant", "seed", "max_steps", "exclude_cells"}
        bad = sorted(set(self.train) - (known - owned))
        if bad:
            problems.append(f"train overrides {bad} are not TrainConfig fields the benchmark leaves open")
        for path in (self.data, self.embeddings):
            if not path.exists():
                problems.append(f"{path} does not exist")
        if problems:
            msg = "invalid benchmark config: " + "; ".join(problems)
            raise ValueError(msg)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=1)


@dataclass
class _Context:
    """What every (model, seed) of one benchmark shares."""

    config: BenchmarkConfig
    cells: ad.AnnData  # prepared cells (restricted to config.cell_types)
    data_path: Path  # the file the neural variants train on (cells, in this row order)
    embeddings: GeneEmbeddings
    cell_type: np.ndarray  # (n_obs,) str
    pert: np.ndarray  # (n_obs,) str
    references: dict[str, CellTypeReference]
    group_rows: dict[tuple[str, str], np.ndarray]  # (cell type, perturbation) -> row indices


@dataclass
class _Seed:
    """One seed's split, profiles and scoring inputs."""

    seed: int
    dir: Path
    split: Split
    profiles: ad.AnnData
    model_controls: dict[str, np.ndarray]  # cell type -> row indices of its model-half controls
    eval_controls: dict[str, np.ndarray]  # cell type -> row indices of its evaluation-half controls
    pca: PCABasis | None = None
    observed: dict[tuple[str, str], Any] = field(default_factory=dict)  # pair -> ObservedGroup, shared by the models
    ctrl_eval: dict[str, np.ndarray] = field(default_factory=dict)  # cell type -> (e, G) dense evaluation controls


def run_benchmark(config: BenchmarkConfig) -> pd.DataFrame:
    """Train and score every model for every seed (resuming finished work); return all per-pair scores."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json() + "\n")
    ctx = _context(config)
    frames = []
    for seed in config.seeds:
        state = _prepare_seed(ctx, seed)
        for name in (*config.models, CEILING):
            path = state.dir / "scores" / f"{name}.csv"
            if not path.exists():
                started = time.perf_counter()
                frame = _score_model(ctx, state, name)
                frame["seconds"] = time.perf_counter() - started
                with atomic_path(path) as tmp:
                    frame.to_csv(tmp, index=False)
            frames.append(pd.read_csv(path, keep_default_na=True))
    scores = pd.concat(frames, ignore_index=True)
    with atomic_path(out / "scores.csv") as tmp:
        scores.to_csv(tmp, index=False)
    return scores


# --- setup -----------------------------------------------------------------------------------------------------


def _context(config: BenchmarkConfig) -> _Context:
    cells = all_cells = ad.read_h5ad(config.data)
    for col in (config.pert_col, config.cell_type_col):
        if col not in cells.obs.columns:
            msg = f"column {col!r} not in {config.data}; available: {list(cells.obs.columns)}"
            raise ValueError(msg)
    data_path = config.data
    if config.cell_types:
        present = set(cells.obs[config.cell_type_col].astype(str))
        missing = sorted(set(config.cell_types) - present)
        if missing:
            msg = f"cell type(s) {missing} not in {config.data}; present: {sorted(present)}"
            raise ValueError(msg)
        keep = cells.obs[config.cell_type_col].astype(str).isin(config.cell_types).to_numpy()
        data_path = config.out / "cells.h5ad"
        cells = cached_h5ad(data_path, lambda: all_cells[keep].copy())
    embeddings = load_embeddings(config.embeddings)
    cell_type = cells.obs[config.cell_type_col].astype(str).to_numpy()
    pert = cells.obs[config.pert_col].astype(str).to_numpy()
    group_rows = pd.DataFrame({"c": cell_type, "p": pert}).groupby(["c", "p"], sort=False).indices
    return _Context(config=config, cells=cells, data_path=data_path, embeddings=embeddings, cell_type=cell_type,
                    pert=pert, references=_references(cells, cell_type, pert, config.control_label),
                    group_rows={k: np.asarray(v) for k, v in group_rows.items()})  # fmt: skip


def _references(cells: ad.AnnData, cell_type: np.ndarray, pert: np.ndarray, control: str) -> dict[str, Any]:
    """Per cell type: the observed mean of every perturbation (all cells; used only to score, never to predict)."""
    perturbed = np.flatnonzero(pert != control)
    codes, uniques = pd.MultiIndex.from_arrays([cell_type[perturbed], pert[perturbed]]).factorize(sort=True)
    means = group_means(cells.X[perturbed], codes, len(uniques))  # (n_groups, G)
    genes = np.asarray(cells.var_names.astype(str))
    cts = np.asarray(uniques.get_level_values(0), dtype=str)
    labels = np.asarray(uniques.get_level_values(1), dtype=str)
    return {ct: cell_type_reference(genes, labels[cts == ct], means[cts == ct]) for ct in np.unique(cts)}


def _prepare_seed(ctx: _Context, seed: int) -> _Seed:
    config, cells = ctx.config, ctx.cells
    seed_dir = config.out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    is_control = ctx.pert == config.control_label
    rng = np.random.default_rng([seed, _SEED_STREAMS["halves"]])
    model_controls, eval_controls = {}, {}
    for ct in np.unique(ctx.cell_type):
        rows = np.flatnonzero(is_control & (ctx.cell_type == ct))
        if rows.size < 4:
            msg = f"cell type {ct!r} has {rows.size} control cells; the benchmark needs >= 4 to halve them"
            raise ValueError(msg)
        keep = control_halves(rows.size, rng)
        model_controls[ct], eval_controls[ct] = rows[keep], rows[~keep]
    excluded = np.sort(np.concatenate(list(eval_controls.values())))
    excl_path = seed_dir / "exclude_cells.npy"
    if excl_path.exists():
        if not np.array_equal(np.load(excl_path), excluded):
            msg = f"{excl_path} differs from this run's control halves: {seed_dir} holds another benchmark"
            raise ValueError(msg)
    else:
        with atomic_path(excl_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, excluded)
    columns = {"pert_col": config.pert_col, "cell_type_col": config.cell_type_col}
    model_cells = np.ones(cells.n_obs, dtype=bool)
    model_cells[excluded] = False
    profiles = cached_h5ad(
        seed_dir / "profiles.h5ad",
        lambda: compute_profiles(
            cells[model_cells], control_label=config.control_label, n_sample_cells=config.n_sample_cells,
            rng=np.random.default_rng([seed, _SEED_STREAMS["profiles"]]), **columns,
        ),
    )  # fmt: skip
    split_path = seed_dir / "split.json"
    if split_path.exists():
        split = Split.load(split_path)
    else:
        split = make_split(
            profiles, kind=config.split_kind, target_cell_type=config.target_cell_type, test_frac=config.test_frac,
            val_frac=config.val_frac, seed=seed, control_label=config.control_label, **columns,
        )  # fmt: skip
        split.save(split_path)
    index_dir = seed_dir / "index"
    if not index_dir.exists():
        build_perturbation_index(profiles, ctx.embeddings, split, index_dir, control_label=config.control_label,
                                 **columns)  # fmt: skip
    return _Seed(seed=seed, dir=seed_dir, split=split, profiles=profiles, model_controls=model_controls,
                 eval_controls=eval_controls)  # fmt: skip


def _pca(ctx: _Context, state: _Seed) -> PCABasis:
    """PCA of the training cells (training pairs and model-half controls): no test cell shapes the space."""
    if state.pca is None:
        train = set(state.split.train)
        rows = np.flatnonzero([(c, p) in train for c, p in zip(ctx.cell_type, ctx.pert, strict=True)])
        rows = np.concatenate([rows, *state.model_controls.values()])
        rng = np.random.default_rng([state.seed, _SEED_STREAMS["pca"]])
        state.pca = fit_pca(ctx.cells.X[np.sort(rows)], n_components=ctx.config.n_pcs, rng=rng)
    return state.pca


# --- models ----------------------------------------------------------------------------------------------------


def _predictor(ctx: _Context, state: _Seed, variant: str) -> Any:
    from model.predict import Predictor
    from model.train import train

    config = ctx.config
    run_dir = state.dir / "train" / variant
    train_config = TrainConfig(
        run_dir=str(run_dir), data=str(ctx.data_path), exclude_cells=str(state.dir / "exclude_cells.npy"),
        split=str(state.dir / "split.json"), index=str(state.dir / "index"), variant=variant, seed=state.seed,
        max_steps=config.steps, pert_col=config.pert_col, cell_type_col=config.cell_type_col,
        control_label=config.control_label, progress=config.progress,
        **{"eval_every": max(config.steps // 4, 1), "patience": 0, **config.train},
    )  # fmt: skip
    train(train_config)
    return Predictor.load(run_dir / "best.pt")


def _score_model(ctx: _Context, state: _Seed, name: str) -> pd.DataFrame:
    """Score one model on every test pair of one seed; write its examples; return one row per pair."""
    config = ctx.config
    predictor, baseline = None, None
    if name in VARIANTS:
        predictor = _predictor(ctx, state, name)
    elif name in BASELINES:
        baseline = make_baseline(name).fit(state.profiles, train_pairs=state.split.train, embeddings=ctx.embeddings,
                                           pert_col=config.pert_col, cell_type_col=config.cell_type_col,
                                           control_label=config.control_label)  # fmt: skip
    pca = _pca(ctx, state)
    group_rows = ctx.group_rows
    rows, examples, weights, weight_labels = [], [], [], []
    test = [p for p in state.split.test if p in group_rows]
    if len(test) < len(state.split.test):
        logger.warning("%d test pairs have no cells; skipped", len(state.split.test) - len(test))
    for i, (ct, pert) in enumerate(tqdm(test, desc=f"seed {state.seed} {name}", disable=not config.progress)):
        # One stream per (seed, pair): every model perturbs the same control cells and is scored on the same
        # subsamples, whatever the order models run in or which of them are resumed.
        rng = np.random.default_rng([state.seed, _SEED_STREAMS["cells"], i])
        observed_rows = group_rows[(ct, pert)]
        n = min(observed_rows.size, config.max_pred_cells)
        pool = state.model_controls[ct]
        ctrl = _dense(ctx.cells.X[np.sort(rng.choice(pool, size=n, replace=pool.size < n))])  # (n, G)
        observed = _dense(ctx.cells.X[observed_rows])  # (m, G)
        if ct not in state.ctrl_eval:  # the same cells for every pair of the cell type: densified once
            state.ctrl_eval[ct] = _dense(ctx.cells.X[state.eval_controls[ct]])
        ctrl_eval = state.ctrl_eval[ct]  # (e, G)
        split_rng = np.random.default_rng([state.seed, _SEED_STREAMS["cells"], i, 1])
        candidates = None
        reference = ctx.references[ct]
        if name == CEILING:
            half_a, half_b = split_half(observed, split_rng)
            observed, pred = half_b, half_a
            # The true perturbation's reference row must not contain the predicting half, or discrimination
            # would reward the overlap: the ceiling is ranked against half b's mean, as models are against all cells.
            reference = _replace_row(reference, pert, half_b.mean(0))
        elif predictor is not None:
            prediction = predictor.predict(ct, [pert], ctrl=ctrl)[0]
            pred, candidates = prediction.cells, prediction.candidates
        else:
            pred = baseline.predict_cells(ctrl, ct, pert)
        genes = parse_perturbation(pert, control_label=config.control_label)
        obs = None if name == CEILING else state.observed.get((ct, pert))
        if obs is None:  # the same for every model but the ceiling (which observes half the cells): computed once
            obs = observe(observed, ctrl_eval, perturbation=pert, reference=reference, pca=pca,
                          target_genes=genes, max_cells=config.max_cells,
                          rng=np.random.default_rng([state.seed, _SEED_STREAMS["score"], i]))  # fmt: skip
            if name != CEILING:
                state.observed[(ct, pert)] = obs
        values = score(pred, ctrl, obs, max_cells=config.max_cells,
                       rng=np.random.default_rng([state.seed, _SEED_STREAMS["score"], i, 1]))  # fmt: skip
        category = state.split.categories.get(f"{ct}|{pert}", "")
        rows.append({"model": name, "seed": state.seed, "cell_type": ct, "perturbation": pert, "category": category,
                     "n_observed": int(observed.shape[0]), "n_pred": int(pred.shape[0]), **values})  # fmt: skip
        if i < N_EXAMPLES:
            examples.append((ct, pert, pred.mean(0) - ctrl.mean(0), observed.mean(0) - ctrl_eval.mean(0)))
        if candidates is not None and name != "no_retrieval":
            weights.append(_stage1_weights(candidates, predictor.model.config.n_candidates))
            weight_labels.append(f"{ct}|{pert}")
    _save_examples(state.dir / "examples" / f"{name}.npz", examples, weights, weight_labels)
    if baseline is not None:
        atomic_write_text(state.dir / "scores" / f"{name}.explain.txt", baseline.explain() + "\n")
    return pd.DataFrame(rows)


def _replace_row(reference: CellTypeReference, label: str, mean: np.ndarray) -> CellTypeReference:
    """A copy of ``reference`` whose row for ``label`` is ``mean`` (G,)."""
    means = reference.means.copy()
    means[reference.row(label)] = mean
    return cell_type_reference(reference.genes, reference.labels, means)


def _stage1_weights(candidates: pd.DataFrame, k: int) -> np.ndarray:
    """(K,) the refiner's weight of each candidate, in stage-1 order (best cosine first); NaN where none."""
    cand = candidates.sort_values("cosine", ascending=False)
    out = np.full(k, np.nan, dtype=np.float32)
    out[: len(cand)] = cand["weight"].to_numpy()
    return out


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _save_examples(path: Path, examples: list, weights: list, weight_labels: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "cell_type": np.array([e[0] for e in examples], dtype=str),
        "perturbation": np.array([e[1] for e in examples], dtype=str),
        "predicted": np.stack([e[2] for e in examples]) if examples else np.zeros((0, 0), np.float32),
        "observed": np.stack([e[3] for e in examples]) if examples else np.zeros((0, 0), np.float32),
        "weights": np.stack(weights) if weights else np.zeros((0, 0), np.float32),
        "weight_labels": np.array(weight_labels, dtype=str),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


# --- report ----------------------------------------------------------------------------------------------------


def write_benchmark_report(config: BenchmarkConfig, scores: pd.DataFrame) -> Path:
    """``out/report/``: report.md with the table (mean and 95% bootstrap CI), CSVs and PNG plots."""
    from model.eval.plots import (
        DeltaExample,
        plot_delta_scatter,
        plot_metric_bars,
        plot_refiner_weights,
        plot_training_curves,
    )
    from model.eval.report import summarize, write_report

    out = config.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRICS if m in scores.columns and scores[m].notna().any()]
    directions = {m: METRICS[m].higher_is_better for m in metrics}
    labels = {m: METRICS[m].description for m in metrics}
    order = [m for m in (*config.models, CEILING) if m in set(scores["model"])]
    summary = summarize(scores, metrics=metrics, rng=np.random.default_rng(0))
    figures: dict[str, Path] = {}
    headline = [m for m in _HEADLINE if m in metrics]
    figures["Metrics (mean, 95% bootstrap CI)"] = plot_metric_bars(
        summary, directions, out / "metrics.png", metrics=headline, model_order=order, exclude_from_best=(CEILING,)
    )
    seed0 = config.out / f"seed{config.seeds[0]}"
    examples = []
    for name in order:
        path = seed0 / "examples" / f"{name}.npz"
        if path.exists() and name in _SCATTER_MODELS:
            with np.load(path) as z:
                for j in range(min(3, len(z["perturbation"]))):
                    examples.append(DeltaExample(model=name, cell_type=str(z["cell_type"][j]),
                                                 perturbation=str(z["perturbation"][j]), predicted=z["predicted"][j],
                                                 observed=z["observed"][j]))  # fmt: skip
    if examples:
        figures[f"Predicted vs observed delta (seed {config.seeds[0]})"] = plot_delta_scatter(
            examples, out / "delta_scatter.png"
        )
    ptrag_examples = seed0 / "examples" / "ptrag.npz"
    if ptrag_examples.exists():
        with np.load(ptrag_examples) as z:
            if z["weights"].size:
                figures["Refiner weights over the stage-1 candidates (ptrag)"] = plot_refiner_weights(
                    z["weights"][:40], out / "refiner_weights.png", row_labels=list(z["weight_labels"][:40]),
                    title=f"ptrag refiner weight by stage-1 rank, seed {config.seeds[0]}",
                )  # fmt: skip
    histories = {}
    for name in order:
        metrics_path = seed0 / "train" / name / "metrics.json"
        if metrics_path.exists():
            histories[name] = json.loads(metrics_path.read_text())
    if histories:
        figures[f"Training curves (seed {config.seeds[0]})"] = plot_training_curves(
            histories, out / "training_curves.png"
        )
    meta = _meta(config, scores)
    sections = _extra_sections(config, scores, summary)
    return write_report(out, scores, directions=directions, metrics=metrics, meta=meta, figures=figures,
                        labels=labels, model_order=order, extra_sections=sections,
                        exclude_from_best=(CEILING,))  # fmt: skip


_HEADLINE = ("pearson_delta", "pearson_delta_top20", "pearson_delta_systema", "mse_mean", "discrimination",
             "de_overlap_20", "w1_pca", "w2_pca", "mmd_pca", "energy_pca")  # fmt: skip
_SCATTER_MODELS = ("ptrag", "vanilla_rag", "knn", "ridge", "train_mean", "transfer", "additive", CEILING)


def _meta(config: BenchmarkConfig, scores: pd.DataFrame) -> dict[str, Any]:
    splits = {}
    for seed in config.seeds:
        path = config.out / f"seed{seed}" / "split.json"
        if path.exists():
            s = Split.load(path)
            splits[seed] = f"`{s.split_id}` ({len(s.train)} train / {len(s.val)} val / {len(s.test)} test pairs)"
    n_pairs = scores.groupby("seed")["perturbation"].nunique().to_dict()
    return {
        "command": config.command or "(library call)",
        "data": f"`{config.data}`" + (f", cell types {list(config.cell_types)}" if config.cell_types else ""),
        "embeddings": f"`{config.embeddings}`",
        "split": f"{config.split_kind}"
        + (f", target `{config.target_cell_type}`" if config.target_cell_type else "")
        + f", test_frac {config.test_frac}, val_frac {config.val_frac}",
        "seeds": ", ".join(f"{k}: {v}" for k, v in splits.items()),
        "scored test pairs per seed": n_pairs,
        "control reference": "observed deltas are taken against a held-out half of each cell type's control cells "
        "that no model saw (not as input cells, not in training profiles); predicted deltas against the model-half "
        "control cells each model perturbed (the same cells for every model)",
        "ceiling": "split-half positive control: half of the observed cells scored against the other half",
        "neural training": f"{config.steps} steps, best validation checkpoint; overrides {config.train or 'none'}",
        "cells": f"predicted sets of min(observed, {config.max_pred_cells}) cells; distributional metrics in a "
        f"{config.n_pcs}-PC PCA fitted on training cells, at most {config.max_cells} cells per set",
    }


def _extra_sections(config: BenchmarkConfig, scores: pd.DataFrame, summary: pd.DataFrame) -> list[tuple[str, str]]:
    sections = []
    headline = ["pearson_delta", "pearson_delta_top20", "mse_mean", "energy_pca"]
    if scores["category"].fillna("").astype(str).str.len().gt(0).any() and config.split_kind == "unseen_perturbation":
        table = scores.groupby(["category", "model"], sort=False)[headline].mean().round(3)
        counts = scores[scores["model"] == CEILING].groupby("category").size()
        body = "Mean over test pairs and seeds, by split category (pairs per category, all seeds: "
        body += ", ".join(f"{k} {v}" for k, v in counts.items()) + ").\n\n" + _markdown(table.reset_index())
        sections.append(("By perturbation category", body))
    shift = scores.groupby("model", sort=False)[["pred_shift_l2", "obs_shift_l2", "n_de_observed"]].mean()
    body = (
        "L2 norm of each model's predicted mean shift (`pred_shift_l2`) beside the observed one (`obs_shift_l2`, "
        "observed cells vs held-out controls; for the ceiling, half the cells) and the number of observed DE genes "
        "at FDR 0.05. On perturbations without effect a calibrated model predicts a shift near zero; the observed and "
        "ceiling shifts then measure only sampling noise (fewer cells, more noise).\n\n"
        + _markdown(shift.round(3).reset_index())
    )
    sections.append(("Predicted shift size", body))
    seed0 = config.out / f"seed{config.seeds[0]}" / "scores"
    notes = {m: (seed0 / f"{m}.explain.txt").read_text().strip() for m in config.models
             if (seed0 / f"{m}.explain.txt").exists()}  # fmt: skip
    if notes:
        sections.append(
            (f"Baseline fallbacks (seed {config.seeds[0]})", "\n".join(f"- `{m}`: {t}" for m, t in notes.items()))
        )
    seconds = scores.groupby(["model", "seed"])["seconds"].first().groupby("model").mean().round(1)
    sections.append(("Time per model and seed (s, training included)", _markdown(seconds.reset_index())))
    return sections


def _markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, quoted for a shell (recorded in every report)."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)
