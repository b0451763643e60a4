"""Run configuration of training: a plain dataclass, importable without torch (the CLI builds its flags from it)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL

__all__ = ["VARIANTS", "TrainConfig", "read_config_file"]

VARIANTS = ("ptrag", "vanilla_rag", "no_retrieval", "random_retrieval")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; saved in every checkpoint."""

    run_dir: str = "runs/ptrag"  # checkpoints (last.pt, best.pt), config, metrics; resumed from when present
    data: str = ""  # prepared cells .h5ad (log-normalised, the profiles' genes): `ptrag run` writes cells.h5ad
    exclude_cells: str = ""  # .npy of obs row indices of --data never used (the evaluation's held-out controls)
    split: str = ""  # split JSON (`ptrag split`)
    index: str = ""  # retrieval store directory (`ptrag index build`), built from the same split
    retrieval_url: str = ""  # a running retrieval service instead of --index (then --embeddings is needed)
    embeddings: str = ""  # with --retrieval-url: the gene embedding table the service was built from
    pert_col: str = DEFAULT_PERT_COL
    cell_type_col: str = DEFAULT_CELL_TYPE_COL
    control_label: str = DEFAULT_CONTROL_LABEL
    batch_col: str = ""  # obs column of technical batches (e.g. gem_group): the model's optional batch input
    batch_dropout: float = 0.2  # share of training sets given an unknown batch, so prediction without one works
    # model
    variant: str = "ptrag"  # ptrag | vanilla_rag | no_retrieval | random_retrieval
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_candidates: int = 32  # K, stage-1 candidates per query
    n_select: int = 8  # k, kept by the refiner
    dropout: float = 0.0
    energy_weight: float = 1.0
    mmd_weight: float = 0.0
    mse_weight: float = 0.0
    # optimisation
    seed: int = 0
    batch_size: int = 16  # cell sets per step, global (split across data-parallel processes)
    n_ctrl_cells: int = 64  # S, control cells per set (drawn with replacement when fewer)
    n_target_cells: int = 64  # T, observed perturbed cells per set for the loss
    max_steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    tau_start: float = 1.0  # Gumbel-Softmax temperature, annealed geometrically to tau_end
    tau_end: float = 0.1
    eval_every: int = 100  # steps between validations (and checkpoints)
    patience: int = 5  # validations without improvement before stopping early; 0 never stops
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    bf16: bool = False  # bf16 autocast on CUDA
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("batch_size", "n_ctrl_cells", "n_target_cells", "max_steps", "eval_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.batch_dropout <= 1.0:
            problems.append(f"batch_dropout must be in [0, 1], got {self.batch_dropout}")
        if not 0 < self.tau_end <= self.tau_start:
            problems.append(f"need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if problems:
            msg = "invalid training config: " + "; ".join(problems)
            raise ValueError(msg)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; ``overrides`` win over it."""
        values = read_config_file(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"unknown field(s) {unknown} in {path}; known fields: {sorted(known)}"
            raise ValueError(msg)
        return cls(**{**values, **overrides})


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    msg = f"config {path} must be .yaml, .yml or .toml"
    raise ValueError(msg)
