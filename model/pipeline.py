"""The main job: from a Perturb-seq file (or the embedded simulated default) to everything PT-RAG needs.

Steps: data (simulate or read, prepare) -> profiles -> split -> embeddings -> retrieval index -> the serving
model (``train/ptrag/``, trained on everything the split allows) -> the benchmark (``benchmark/``: every model
on the same split for each seed, with held-out control halves; :mod:`model.eval.benchmark`) and its report.
Each step writes its artifact into the run directory atomically and is skipped when the artifact is already
there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from model.data.perturbations import parse_perturbations
from model.data.preprocess import load_prepared
from model.data.profiles import compute_profiles
from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL
from model.data.splits import SPLIT_KINDS, Split, make_split
from model.index_build import build_perturbation_index
from retrieval_service.atomic import atomic_path, atomic_write_text
from retrieval_service.embeddings import GeneEmbeddings, load_embeddings

__all__ = ["DEFAULT_TARGET_CELL_TYPE", "STOP_AFTER", "RunConfig", "cached_h5ad", "run_main_job"]

logger = logging.getLogger(__name__)

DEFAULT_TARGET_CELL_TYPE = "rpe1"  # of the simulated default's lines k562, rpe1, jurkat, hepg2
STOP_AFTER = ("index", "train", "benchmark")


@dataclass(kw_only=True)
class RunConfig:
    """Settings of one run of the main job; saved as ``config.json`` in the run directory."""

    out: Path = Path("artifacts/default")
    """Run directory; artifacts already in it are reused."""
    data: Path | None = None
    """A Perturb-seq ``.h5ad``; ``None`` simulates the embedded default dataset."""
    embeddings: Path | None = None
    """Gene embeddings (GenePT pickle, CSV or npz); the simulated default brings its own."""
    seed: int = 0
    pert_col: str = DEFAULT_PERT_COL
    cell_type_col: str = DEFAULT_CELL_TYPE_COL
    control_label: str = DEFAULT_CONTROL_LABEL
    layer: str | None = None
    obsm_key: str | None = None
    n_top_genes: int | None = 2000
    n_sample_cells: int = 16
    split_kind: str = "fewshot_celltype"
    target_cell_type: str | None = None
    """Target of the cell-type protocols; defaults to ``rpe1`` for the simulated data."""
    test_frac: float = 0.3
    val_frac: float = 0.05
    simulator: dict = field(default_factory=dict)
    """Overrides of :class:`model.data.simulator.SimulatorConfig` fields for the simulated default."""
    stop_after: str = "benchmark"
    """Last step to run: ``index`` (data only), ``train`` (plus the serving model) or ``benchmark`` (everything)."""
    train_steps: int = 200
    """Training steps of the serving model (``train/ptrag/best.pt``)."""
    train: dict = field(default_factory=dict)
    """Other :class:`~model.config.TrainConfig` fields for every model trained (serving and benchmark)."""
    bench_seeds: tuple[int, ...] = (0,)
    """Benchmark seeds; one keeps the main job within 10 minutes on 2 cores (``--seeds 0 1 2`` for three)."""
    bench_steps: int = 120
    """Training steps of each neural variant in the benchmark: brief, so the main job fits in minutes."""
    bench_models: tuple[str, ...] = ()
    """Models to benchmark (default: every variant and baseline)."""
    command: str = ""
    """The command line that started the run (recorded in the report)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.data = None if self.data is None else Path(self.data)
        self.embeddings = None if self.embeddings is None else Path(self.embeddings)
        if self.stop_after not in STOP_AFTER:
            msg = f"stop_after must be one of {STOP_AFTER}, got {self.stop_after!r}"
            raise ValueError(msg)
        if self.split_kind not in SPLIT_KINDS:
            msg = f"unknown split kind {self.split_kind!r}; choose one of {SPLIT_KINDS}"
            raise ValueError(msg)
        if self.data is not None and self.embeddings is None:
            msg = "with --data, also pass --embeddings (a GenePT pickle/CSV/npz, or `ptrag embed-genes` output)"
            raise ValueError(msg)
        if self.target_cell_type is None and self.data is None:
            self.target_cell_type = DEFAULT_TARGET_CELL_TYPE

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=1)


class _Step:
    """Logs a step's start and duration; the run summary records the durations."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        logger.info("%s ...", self.name)

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.start, 3)
        logger.info("%s finished in %.1fs", self.name, self.timings[self.name])


def run_main_job(config: RunConfig) -> dict:
    """Run every stage of the main job into ``config.out``; return (and write) the summary."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json() + "\n")
    timings: dict[str, float] = {}
    columns = {"pert_col": config.pert_col, "cell_type_col": config.cell_type_col}

    with _Step(timings, "data"):
        data_path, emb_path = _dataset(config, out)
        cells = cached_h5ad(
            out / "cells.h5ad",
            lambda: load_prepared(
                data_path, layer=config.layer, obsm_key=config.obsm_key, n_top_genes=config.n_top_genes,
                control_label=config.control_label, **columns,
            ),
        )  # fmt: skip

    with _Step(timings, "profiles"):
        profiles = cached_h5ad(
            out / "profiles.h5ad",
            lambda: compute_profiles(
                cells, control_label=config.control_label, n_sample_cells=config.n_sample_cells,
                rng=np.random.default_rng(config.seed), **columns,
            ),
        )  # fmt: skip

    with _Step(timings, "split"):
        split_path = out / "split.json"
        if split_path.exists():
            split = Split.load(split_path)
        else:
            split = make_split(
                profiles,
                kind=config.split_kind,
                target_cell_type=config.target_cell_type,
                test_frac=config.test_frac,
                val_frac=config.val_frac,
                seed=config.seed,
                control_label=config.control_label,
                **columns,
            )
            split.save(split_path)

    with _Step(timings, "embeddings"):
        embeddings = load_embeddings(emb_path)
        labels = profiles.obs.loc[~profiles.obs["is_control"], config.pert_col].astype(str).unique()
        genes = sorted(
            {g for gs in parse_perturbations(labels, control_label=config.control_label).values() for g in gs}
        )
        coverage = embeddings.coverage(genes)

    with _Step(timings, "index"):
        index_dir = out / "index"
        if not index_dir.exists():
            build_perturbation_index(
                profiles, embeddings, split, index_dir, control_label=config.control_label, **columns
            )

    checkpoint = report = None
    if config.stop_after in ("train", "benchmark"):
        with _Step(timings, "train"):
            checkpoint = _train_serving_model(config, out)
    if config.stop_after == "benchmark":
        with _Step(timings, "benchmark"):
            report = _benchmark(config, out, emb_path)

    summary = _summary(config, cells, profiles, split, embeddings, coverage, timings)
    summary["checkpoint"] = str(checkpoint) if checkpoint else None
    summary["report"] = str(report) if report else None
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _train_serving_model(config: RunConfig, out: Path) -> Path:
    """The model ``ptrag serve`` and ``docker compose`` serve: ``ptrag`` on the run's split and index."""
    from model.config import TrainConfig
    from model.train import train

    run_dir = out / "train" / "ptrag"
    train(TrainConfig(run_dir=str(run_dir), data=str(out / "cells.h5ad"), split=str(out / "split.json"),
                      index=str(out / "index"), max_steps=config.train_steps, seed=config.seed,
                      eval_every=max(config.train_steps // 5, 1), patience=0, pert_col=config.pert_col,
                      cell_type_col=config.cell_type_col, control_label=config.control_label,
                      **config.train))  # fmt: skip
    return run_dir / "best.pt"


def _benchmark(config: RunConfig, out: Path, emb_path: Path) -> Path:
    from model.eval.benchmark import MODELS, BenchmarkConfig, run_benchmark, write_benchmark_report

    bench = BenchmarkConfig(
        out=out / "benchmark", data=out / "cells.h5ad", embeddings=emb_path, split_kind=config.split_kind,
        target_cell_type=config.target_cell_type, test_frac=config.test_frac, val_frac=config.val_frac,
        seeds=config.bench_seeds, models=config.bench_models or MODELS, steps=config.bench_steps,
        pert_col=config.pert_col, cell_type_col=config.cell_type_col, control_label=config.control_label,
        command=config.command, train=config.train,
    )  # fmt: skip
    return write_benchmark_report(bench, run_benchmark(bench))


def cached_h5ad(path: Path, make: Callable[[], ad.AnnData]) -> ad.AnnData:
    """The AnnData at ``path`` if a previous run wrote it, else ``make()`` written there atomically."""
    if path.exists():
        return ad.read_h5ad(path)
    adata = make()
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return adata


def _dataset(config: RunConfig, out: Path) -> tuple[Path, Path]:
    """The data and embedding paths: the user's, or the simulated default (generated once)."""
    if config.data is not None:
        return config.data, config.embeddings
    from model.data.simulator import SimulatorConfig, simulate_to_h5ad

    data_path = out / "simulated.h5ad"
    emb_path = config.embeddings or out / "simulated.embeddings.npz"
    if not (data_path.exists() and emb_path.exists()):
        sim_config = SimulatorConfig(**config.simulator)
        simulate_to_h5ad(sim_config, data_path, seed=config.seed, embeddings_path=emb_path)
    return data_path, emb_path


def _summary(
    config: RunConfig,
    cells: ad.AnnData,
    profiles: ad.AnnData,
    split: Split,
    embeddings: GeneEmbeddings,
    coverage: object,
    timings: dict[str, float],
) -> dict:
    obs = profiles.obs
    per_type = obs[~obs["is_control"]].groupby(config.cell_type_col, observed=True).size().astype(int).to_dict()
    return {
        "run_dir": str(config.out),
        "data": str(config.data) if config.data else "simulated default",
        "n_cells": int(cells.n_obs),
        "n_genes": int(cells.n_vars),
        "preprocess": dict(cells.uns["ptrag_preprocess"]),
        "cell_types": sorted(map(str, obs[config.cell_type_col].unique())),
        "perturbations_per_cell_type": per_type,
        "n_groups": int((~obs["is_control"]).sum()),
        "split": {
            "kind": split.kind,
            "id": split.split_id,
            "seed": split.seed,
            "target_cell_type": split.params.get("target_cell_type"),
            "train": len(split.train),
            "val": len(split.val),
            "test": len(split.test),
        },
        "embeddings": {
            "source": embeddings.source,
            "dim": embeddings.dim,
            "n_genes": len(embeddings),
            "coverage": coverage.summary(),
        },
        "timings_s": timings,
    }
