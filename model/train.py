"""Training PT-RAG and its ablation variants: one loop, resumable, data-parallel when launched with torchrun.

Reading order: :class:`TrainConfig` (every field has a default and can be set from a YAML/TOML file or the
command line), :func:`train` (setup, resume, loop), then the small pieces it calls.

Reproducibility by construction: everything random in step ``t`` (which sets form the batch, which cells are
drawn, the Gumbel noise, dropout) is seeded from ``(seed, t)`` and, for cells and noise, from the set's place
in the global batch. A resumed run therefore repeats exactly what an uninterrupted one would do, and a batch
split over N processes is the batch one process would have drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from tqdm.auto import tqdm

from model.config import TrainConfig
from model.data.splits import Split
from model.examples import CandidateTable, CellPool, QuerySet, cell_pool, make_batch, retrieve_candidates
from model.losses import energy_distance
from model.nn.ptrag import PTRAG, PTRAGConfig
from retrieval_service.atomic import atomic_path, atomic_write_text, remove_stale_temporaries
from retrieval_service.store import Store

__all__ = ["CKPT_KEYS", "TrainConfig", "load_checkpoint", "train"]

logger = logging.getLogger(__name__)

# Checkpoint keys (a checkpoint is a plain dict, torch.save'd atomically).
MODEL, OPTIMIZER, MODEL_ARGS, TRAIN_STATE, CONFIG = "model", "optimizer", "model_args", "train_state", "config"
SPLIT_ID, FEATURES, CELL_TYPES, EMBEDDINGS, VERSION = "split_id", "feature_names", "cell_types", "embeddings", "version"
DATA_HASH, CONTROLS, BATCHES, CONTROL_BATCHES = "data_hash", "control_cells", "batches", "control_batches"
CKPT_KEYS = (MODEL, OPTIMIZER, MODEL_ARGS, TRAIN_STATE, CONFIG, SPLIT_ID, FEATURES, CELL_TYPES, EMBEDDINGS, VERSION,
             DATA_HASH, CONTROLS, BATCHES, CONTROL_BATCHES)  # fmt: skip
_VAL_STREAM = 10**9  # validation draws use their own seed stream, disjoint from the steps'
_N_CACHED_CONTROLS = 512  # control cells per cell type kept in the checkpoint for prediction and serving


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)


def train(config: TrainConfig) -> dict:
    """Train (or resume) into ``config.run_dir``; return the final state (step, best validation, history)."""
    device = _device(config.device)
    rank, world, device = _init_distributed(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.batch_size % world:
        msg = f"batch_size {config.batch_size} must be divisible by the {world} data-parallel processes"
        raise ValueError(msg)
    run_dir = Path(config.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(run_dir):
            logger.warning("removed %s, left by an interrupted checkpoint write", stale.name)
        atomic_write_text(run_dir / "config.json", json.dumps(asdict(config), indent=1) + "\n")

    data = _load(config)
    model_args = PTRAGConfig(
        n_genes=len(data.pool.genes),
        emb_dim=data.table.keys.shape[1],
        n_cell_types=len(data.pool.cell_types),
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_candidates=config.n_candidates,
        n_select=config.n_select,
        dropout=config.dropout,
        variant=config.variant,
        energy_weight=config.energy_weight,
        mmd_weight=config.mmd_weight,
        mse_weight=config.mse_weight,
        n_batches=len(data.pool.batches or ()),
    )
    torch.manual_seed(config.seed)
    model = PTRAG(model_args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = _State()
    last = run_dir / "last.pt"
    if last.exists():
        ckpt = load_checkpoint(last, map_location=device)
        _check_resumable(ckpt, config, data)
        model.load_state_dict(ckpt[MODEL])
        optimizer.load_state_dict(ckpt[OPTIMIZER])
        state = _State(**ckpt[TRAIN_STATE])
        logger.info("resuming %s from step %d", run_dir, state.step)
    ddp = _wrap_ddp(model, device) if world > 1 else model

    local = config.batch_size // world
    cells_per_step = config.batch_size * config.n_ctrl_cells
    bar = tqdm(total=config.max_steps, initial=state.step, disable=not (config.progress and rank == 0),
               desc=f"train {config.variant}", unit="step", dynamic_ncols=True)  # fmt: skip
    stopped_early = state.bad_evals >= config.patience > 0
    t0, steps_timed = time.perf_counter(), 0
    while state.step < config.max_steps and not stopped_early:
        state.step += 1
        step = state.step
        lr = _lr(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tau = _tau(config, step)
        rng = np.random.default_rng([config.seed, step])
        idx = rng.choice(len(data.train), size=config.batch_size, replace=len(data.train) < config.batch_size)
        mine = slice(rank * local, (rank + 1) * local)
        rngs = [np.random.default_rng([config.seed, step, j]) for j in range(config.batch_size)][mine]
        batch = make_batch(data.pool, data.train, data.table, idx[mine], n_ctrl=config.n_ctrl_cells,
                           n_target=config.n_target_cells, rngs=rngs, batch_dropout=config.batch_dropout,
                           ).to(device)  # fmt: skip
        noise = _gumbel_noise(config, step, mine, batch.cand_mask.shape[1]).to(device)
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout, the same on resume
        model.train()
        with _autocast(config, device):
            _, loss, _ = ddp(batch, tau=tau, gumbel=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss_value = _mean_over_processes(loss.detach().float(), world)
        steps_timed += 1
        rate = cells_per_step * steps_timed / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4f}", tau=f"{tau:.2f}", cells_per_s=f"{rate:,.0f}")
        bar.update(1)
        record = {"step": step, "loss": loss_value, "lr": lr, "tau": tau}
        if step % config.eval_every == 0 or step == config.max_steps:
            if len(data.val):
                val = evaluate(model, data, config, device=device)
                improved = val < state.best_val
                state.best_val, state.bad_evals = (val, 0) if improved else (state.best_val, state.bad_evals + 1)
            else:  # no validation sets: the last checkpoint is the best one, and nothing stops early
                val, improved = math.nan, True
            record["val_energy"] = val
            state.history.append(record)
            if rank == 0:
                ckpt = _checkpoint(model, optimizer, model_args, state, config, data)
                _save(ckpt, last)
                if improved:
                    _save(ckpt, run_dir / "best.pt")
                atomic_write_text(run_dir / "metrics.json", json.dumps(state.history, indent=1) + "\n")
            logger.info("step %d: loss %.4f, val energy %.4f (best %.4f)", step, loss_value, val, state.best_val)
            stopped_early = state.bad_evals >= config.patience > 0
        else:
            state.history.append(record)
    bar.close()
    if hasattr(data.store, "close"):  # a RemoteStore's HTTP connections
        data.store.close()
    if stopped_early:
        logger.info("stopped early at step %d: %d validations without improvement", state.step, state.bad_evals)
    if world > 1:
        torch.distributed.barrier()
    return {"step": state.step, "best_val": state.best_val, "history": state.history, "stopped_early": stopped_early}


@torch.no_grad()
def evaluate(model: PTRAG, data: _Data, config: TrainConfig, *, device: torch.device) -> float:
    """Mean energy distance between predicted and observed cells over the validation sets (deterministic)."""
    model.eval()
    total, n = 0.0, len(data.val)
    for start in range(0, n, config.batch_size):
        idx = np.arange(start, min(start + config.batch_size, n))
        rngs = [np.random.default_rng([config.seed, _VAL_STREAM, int(j)]) for j in idx]
        batch = make_batch(data.pool, data.val, data.table, idx, n_ctrl=config.n_ctrl_cells,
                           n_target=config.n_target_cells, rngs=rngs).to(device)  # fmt: skip
        pred, _, _ = model(batch, stochastic=False)
        total += float(energy_distance(pred.float(), batch.target.float()).sum())
    return total / n


# --- data --------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    pool: CellPool
    table: CandidateTable
    train: QuerySet
    val: QuerySet
    split: Split
    store: Store
    data_hash: str


def _load(config: TrainConfig) -> _Data:
    for name in ("data", "split"):
        if not getattr(config, name):
            msg = f"training needs --{name} (see `ptrag train --help`)"
            raise ValueError(msg)
    split = Split.load(config.split)
    store = open_store(config.index, retrieval_url=config.retrieval_url, embeddings=config.embeddings,
                       control_label=config.control_label)  # fmt: skip
    store.check_split(split.split_id, split.held_out)
    cells = ad.read_h5ad(config.data)
    data_hash = file_fingerprint(config.data)
    if config.exclude_cells:
        cells = cells[_kept_rows(config.exclude_cells, cells.n_obs)].copy()
        data_hash += "-" + file_fingerprint(config.exclude_cells)
    store.check_features(map(str, cells.var_names))
    pool = cell_pool(cells, pert_col=config.pert_col, cell_type_col=config.cell_type_col,
                     control_label=config.control_label, batch_col=config.batch_col or None)  # fmt: skip
    table = CandidateTable.from_store(store, pool.cell_types)
    random = config.variant == "random_retrieval"
    common = {"cell_types": pool.cell_types, "k": config.n_candidates, "random_candidates": random,
              "control_label": config.control_label}  # fmt: skip
    train_qs = retrieve_candidates(store, split.train, rng=np.random.default_rng([config.seed, 1]), **common)
    val_qs = retrieve_candidates(store, split.val, rng=np.random.default_rng([config.seed, 2]), **common)
    assert_no_leakage(store, split, train_qs, val_qs)
    missing = [p for p in train_qs.pairs + val_qs.pairs if p not in pool.group_rows]
    if missing:
        msg = f"{len(missing)} split pairs have no cells in {config.data}, e.g. {missing[:5]}; wrong data or split?"
        raise ValueError(msg)
    logger.info("training on %d sets, validating on %d; %d store entries", len(train_qs), len(val_qs), len(store))
    return _Data(pool=pool, table=table, train=train_qs, val=val_qs, split=split, store=store,
                 data_hash=data_hash)  # fmt: skip


def _kept_rows(exclude_path: str, n_obs: int) -> np.ndarray:
    """``(n_obs,)`` bool: the rows not listed in the ``.npy`` of row indices at ``exclude_path``."""
    try:
        excluded = np.load(exclude_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        msg = f"could not read --exclude-cells {exclude_path} ({err}); expected a .npy of integer row indices"
        raise ValueError(msg) from err
    if excluded.ndim != 1 or not np.issubdtype(excluded.dtype, np.integer):
        msg = f"--exclude-cells {exclude_path} must hold a 1-d integer array, got {excluded.dtype} {excluded.shape}"
        raise ValueError(msg)
    if excluded.size and (excluded.min() < 0 or excluded.max() >= n_obs):
        msg = f"--exclude-cells {exclude_path} has row indices outside [0, {n_obs}): wrong data file?"
        raise ValueError(msg)
    keep = np.ones(n_obs, dtype=bool)
    keep[excluded] = False
    return keep


def open_store(index: str, *, retrieval_url: str = "", embeddings: str = "", control_label: str) -> Store:
    """The in-process store at ``index``, or the retrieval service at ``retrieval_url`` behind the same interface."""
    if bool(index) == bool(retrieval_url):
        msg = "give exactly one of --index (a store directory) and --retrieval-url (a running retrieval service)"
        raise ValueError(msg)
    if index:
        return Store.open(index)
    if not embeddings:
        msg = "--retrieval-url needs --embeddings: the gene table the service was built from (for the key vectors)"
        raise ValueError(msg)
    from model.remote_store import RemoteStore
    from retrieval_service.client import RetrievalClient
    from retrieval_service.embeddings import load_embeddings

    client = RetrievalClient(retrieval_url, timeout=60.0)
    client.wait_ready(60)
    return RemoteStore(client, load_embeddings(embeddings), control_label=control_label)  # type: ignore[return-value]


def assert_no_leakage(store: Store, split: Split, *query_sets: QuerySet) -> None:
    """Raise if any candidate of any query is a held-out (cell type, perturbation) pair of the split."""
    held_out = split.held_out
    for qs in query_sets:
        ids = np.unique(qs.cand_ids[qs.cand_ids >= 0])
        cts, labels = store.entries(ids)
        leaked = [(c, p) for c, p in zip(cts, labels, strict=True) if (c, p) in held_out]
        if leaked:
            msg = f"held-out pairs are retrievable candidates: {leaked[:5]}; the store does not match the split"
            raise RuntimeError(msg)


def file_fingerprint(path: str | os.PathLike[str], *, block: int = 1 << 20) -> str:
    """sha256 of the file, or for files over 1 GiB of its size and 64 evenly spaced 1 MiB blocks (fast)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= 1 << 30:
            for chunk in iter(lambda: fh.read(block), b""):
                h.update(chunk)
        else:
            for offset in np.linspace(0, size - block, 64).astype(np.int64):
                fh.seek(int(offset))
                h.update(fh.read(block))
    return h.hexdigest()[:16]


# --- pieces ------------------------------------------------------------------------------------------------


def _lr(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr`` at ``max_steps``."""
    if step <= config.warmup_steps:
        return config.lr * step / max(config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _tau(config: TrainConfig, step: int) -> float:
    """Geometric annealing from ``tau_start`` to ``tau_end`` over the run."""
    frac = min(step / config.max_steps, 1.0)
    return config.tau_start * (config.tau_end / config.tau_start) ** frac


def _gumbel_noise(config: TrainConfig, step: int, mine: slice, k: int) -> torch.Tensor:
    """(local B, K) standard Gumbel noise, seeded per set so data-parallel splits draw what one process would."""
    rows = [np.random.default_rng([config.seed, step, j, 7]).gumbel(size=k) for j in range(config.batch_size)]
    return torch.from_numpy(np.stack(rows[mine]).astype(np.float32))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        msg = "device=cuda but no CUDA device is visible; use device=auto or cpu"
        raise ValueError(msg)
    return torch.device(name)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins the process group when torchrun started several processes.

    The backend follows the device, not what the machine has: ``device=cpu`` on a GPU machine trains with gloo.
    On CUDA each process takes the GPU of its local rank, so there must be one GPU per process on the node.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        n_gpus = torch.cuda.device_count()
        if per_node > n_gpus:
            msg = (
                f"torchrun started {per_node} processes on this node but {n_gpus} GPU(s) are visible; "
                f"use --nproc-per-node {n_gpus} (one process per GPU) or train on CPU with --device cpu"
            )
            raise ValueError(msg)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _wrap_ddp(model: PTRAG, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_processes(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return float(value)


def _checkpoint(model: PTRAG, optimizer: torch.optim.Optimizer, model_args: PTRAGConfig, state: _State,
                config: TrainConfig, data: _Data) -> dict:  # fmt: skip
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("ptrag")
    except PackageNotFoundError:
        pkg_version = "unknown"
    rng = np.random.default_rng([config.seed, 3])
    controls, control_batches = {}, {}
    for ct, rows in data.pool.control_rows.items():
        pick = np.sort(rng.choice(rows, size=min(rows.size, _N_CACHED_CONTROLS), replace=False))
        controls[ct] = torch.from_numpy(data.pool.X[pick].toarray())
        codes = data.pool.batch_codes
        control_batches[ct] = torch.from_numpy(codes[pick]) if codes is not None else torch.full((pick.size,), -1)
    return {
        MODEL: model.state_dict(),
        OPTIMIZER: optimizer.state_dict(),
        MODEL_ARGS: asdict(model_args),
        TRAIN_STATE: asdict(state),
        CONFIG: asdict(config),
        SPLIT_ID: data.split.split_id,
        FEATURES: list(data.pool.genes),
        CELL_TYPES: list(data.pool.cell_types),
        EMBEDDINGS: data.store.manifest.embedding_source,
        VERSION: pkg_version,
        DATA_HASH: data.data_hash,
        CONTROLS: controls,
        BATCHES: list(data.pool.batches or ()),
        CONTROL_BATCHES: control_batches,
    }


def _save(ckpt: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`train`, refusing one that lacks any of :data:`CKPT_KEYS`."""
    path = Path(path)
    if not path.exists():
        msg = f"no checkpoint at {path}"
        raise FileNotFoundError(msg)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        msg = f"could not read checkpoint {path} ({type(err).__name__}: {err}); retrain or use best.pt/last.pt"
        raise ValueError(msg) from err
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        msg = f"{path} is not a PT-RAG checkpoint (missing {missing})"
        raise ValueError(msg)
    return ckpt


def _check_resumable(ckpt: dict, config: TrainConfig, data: _Data) -> None:
    """A run directory resumes only the run it holds: same model, split and data."""
    saved = ckpt[CONFIG]
    fixed = ("variant", "d_model", "n_layers", "n_heads", "n_candidates", "n_select", "seed", "batch_size", "batch_col")
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in fixed if saved.get(k) != getattr(config, k)]
    if ckpt[SPLIT_ID] != data.split.split_id:
        changed.append(f"split: {ckpt[SPLIT_ID]} -> {data.split.split_id}")
    if ckpt[DATA_HASH] != data.data_hash:
        changed.append("data file contents")
    if changed:
        msg = f"{config.run_dir} holds another run ({'; '.join(changed)}); use a new --run-dir or delete it"
        raise ValueError(msg)
