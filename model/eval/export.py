"""Export predictions for cell-eval (Arc Institute, PyPI ``cell-eval``), the Virtual Cell Challenge evaluator.

``cell-eval run -ap pred.h5ad -ar real.h5ad --pert-col COL --control-pert LABEL [--celltype-col CT]`` (checked
against cell-eval 0.8.2, ``cell_eval/_cli/_run.py`` and ``_types/_anndata.py``) reads two AnnData files that must
have:

- the same ``var_names`` in the same order;
- ``obs[pert_col]`` in both, with the same set of perturbation labels in both, and the control label among them:
  cell-eval computes each file's deltas and DE against that file's own control cells;
- log1p-normalised ``X`` (values in [0, 15); float16 is cast to float32, negative values are an error);
- with ``--celltype-col``, the same cell types in both; each cell type is evaluated separately and its results are
  written as ``<celltype>_results.csv`` / ``<celltype>_agg_results.csv`` (``/`` in a name becomes ``-``) instead of
  ``results.csv`` / ``agg_results.csv``.

To keep the control-noise trap out (see :mod:`model.eval.metrics`), put the control cells the model perturbed
(its input, the model half) in ``pred`` and the held-out evaluation half in ``real``.

cell-eval is optional: :func:`run_cell_eval` runs it only where it is importable and returns None otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from retrieval_service.atomic import atomic_path

__all__ = ["PRED_FILE", "REAL_FILE", "RESULTS_DIR", "cell_eval_command", "export_cell_eval", "run_cell_eval"]

logger = logging.getLogger(__name__)

PRED_FILE = "pred.h5ad"
REAL_FILE = "real.h5ad"
RESULTS_DIR = "cell_eval"  # where run_cell_eval lets cell-eval write, inside out_dir
LOG1P_MAX = 15.0  # cell-eval's guess_is_lognorm rejects data with values >= 15 (raw counts)


def _labels(adata: ad.AnnData, col: str, which: str) -> np.ndarray:
    if col not in adata.obs.columns:
        msg = f"column {col!r} not in {which}.obs; available: {list(adata.obs.columns)}"
        raise ValueError(msg)
    return adata.obs[col].astype(str).to_numpy()


def _check_labels(pred: np.ndarray, real: np.ndarray, control_label: str, where: str) -> None:
    p, r = set(pred), set(real)
    problems = []
    if p != r:
        problems.append(f"only in pred: {sorted(p - r)[:10]}, only in real: {sorted(r - p)[:10]}")
    for name, labels in (("pred", p), ("real", r)):
        if control_label not in labels:
            problems.append(f"{name} has no control cells labelled {control_label!r}")
    if problems:
        detail = "; ".join(problems)
        msg = f"cell-eval needs the same perturbations, control included, in pred and real{where}: {detail}"
        raise ValueError(msg)


def _x(adata: ad.AnnData, genes: pd.Index) -> np.ndarray | sp.csr_matrix:
    """A float32 copy of X with the columns of ``genes``, in that order; dense stays dense, sparse becomes CSR."""
    x = adata.X if adata.var_names.equals(genes) else adata[:, genes].X
    return sp.csr_matrix(x, dtype=np.float32, copy=True) if sp.issparse(x) else np.array(x, dtype=np.float32)


def _check_log1p(x: np.ndarray | sp.csr_matrix, which: str) -> None:
    values = x.data if sp.issparse(x) else x
    if not np.isfinite(values).all():
        msg = f"{which}.X contains NaN or inf"
        raise ValueError(msg)
    if values.size and (values.min() < 0 or values.max() >= LOG1P_MAX):
        msg = (f"{which}.X spans [{values.min():.2f}, {values.max():.2f}]; cell-eval expects log1p data in "
               f"[0, {LOG1P_MAX:g})")  # fmt: skip
        raise ValueError(msg)


def _minimal(x: np.ndarray | sp.csr_matrix, obs: dict[str, np.ndarray], names: pd.Index, genes: pd.Index) -> ad.AnnData:
    obs_names = names.astype(str) if names.is_unique else pd.Index([f"cell{i}" for i in range(len(names))])
    frame = pd.DataFrame({k: pd.Categorical(v) for k, v in obs.items()}, index=obs_names)
    return ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=genes.astype(str)))


def export_cell_eval(
    pred: ad.AnnData,
    real: ad.AnnData,
    out_dir: str | os.PathLike[str],
    *,
    pert_col: str,
    control_label: str,
    celltype_col: str | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/pred.h5ad`` and ``out_dir/real.h5ad`` (atomically) in the layout ``cell-eval run`` reads.

    Parameters
    ----------
    pred, real
        Predicted and observed cells, log-normalised, each including control cells labelled ``control_label``
        (pred: the control cells the model perturbed; real: held-out controls).
    pert_col, control_label, celltype_col
        The perturbation column, the control label, and optionally the cell-type column (results per cell type).

    Returns
    -------
    (pred_path, real_path). Both files hold only ``X`` (float32, dense or CSR as given), ``obs[pert_col]``
    (and ``obs[celltype_col]``) as categorical strings, and ``var`` indexed by real's genes in real's order. pred's
    genes are reordered to match; genes only in pred are dropped with a warning; genes of real missing from pred
    are an error. Negative predicted values (cell-eval rejects them) are clipped to 0 with a warning. Duplicate
    obs names are replaced by ``cell0, cell1, ...``.
    """
    genes = pd.Index(real.var_names.astype(str))
    if not genes.is_unique:
        msg = "real.var_names must be unique"
        raise ValueError(msg)
    pred_genes = pd.Index(pred.var_names.astype(str))
    missing = genes.difference(pred_genes)
    if len(missing):
        msg = f"{len(missing)} genes of real are missing from pred, e.g. {list(missing[:10])}"
        raise ValueError(msg)
    extra = pred_genes.difference(genes)
    if len(extra):
        warnings.warn(f"dropping {len(extra)} pred genes not in real, e.g. {list(extra[:10])}", stacklevel=2)

    p_labels, r_labels = _labels(pred, pert_col, "pred"), _labels(real, pert_col, "real")
    p_obs, r_obs = {pert_col: p_labels}, {pert_col: r_labels}
    if celltype_col is None:
        _check_labels(p_labels, r_labels, control_label, "")
    else:
        p_ct, r_ct = _labels(pred, celltype_col, "pred"), _labels(real, celltype_col, "real")
        if set(p_ct) != set(r_ct):
            only_p, only_r = sorted(set(p_ct) - set(r_ct)), sorted(set(r_ct) - set(p_ct))
            msg = f"cell types differ between pred and real: only in pred {only_p}, only in real {only_r}"
            raise ValueError(msg)
        for ct in sorted(set(r_ct)):
            _check_labels(p_labels[p_ct == ct], r_labels[r_ct == ct], control_label, f" (cell type {ct!r})")
        p_obs[celltype_col], r_obs[celltype_col] = p_ct, r_ct

    pred_x = _x(pred, genes)
    values = pred_x.data if sp.issparse(pred_x) else pred_x
    n_neg = int((values < 0).sum())
    if n_neg:
        warnings.warn(f"clipping {n_neg} negative predicted values to 0 (cell-eval rejects them)", stacklevel=2)
        np.maximum(values, 0, out=values)
    real_x = _x(real, genes)
    _check_log1p(pred_x, "pred")
    _check_log1p(real_x, "real")

    out = Path(out_dir)
    pred_ad = _minimal(pred_x, p_obs, pred.obs_names, genes)
    real_ad = _minimal(real_x, r_obs, real.obs_names, genes)
    paths = out / PRED_FILE, out / REAL_FILE
    for adata, path in zip((pred_ad, real_ad), paths, strict=True):
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    logger.info("wrote %s (%d cells) and %s (%d cells)", paths[0], pred_ad.n_obs, paths[1], real_ad.n_obs)
    return paths


def cell_eval_command(
    out_dir: str | os.PathLike[str],
    *,
    pert_col: str,
    control_label: str,
    celltype_col: str | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    profile: str = "full",
    num_threads: int = 1,
    executable: Sequence[str] = ("cell-eval",),
) -> list[str]:
    """The documented ``cell-eval run`` command for the files :func:`export_cell_eval` wrote to ``out_dir``.

    Results go to ``results_dir`` (default ``out_dir/cell_eval``). ``executable`` is the program to call, e.g.
    ``(sys.executable, "-m", "cell_eval")`` to use the cell-eval of this interpreter.
    """
    out = Path(out_dir)
    cmd = [
        *executable, "run",
        "-ap", str(out / PRED_FILE),
        "-ar", str(out / REAL_FILE),
        "--pert-col", pert_col,
        "--control-pert", control_label,
        "-o", str(Path(results_dir) if results_dir is not None else out / RESULTS_DIR),
        "--num-threads", str(num_threads),
        "--profile", profile,
    ]  # fmt: skip
    if celltype_col is not None:
        cmd += ["--celltype-col", celltype_col]
    return cmd


def _cell_eval_available() -> bool:
    return importlib.util.find_spec("cell_eval") is not None


def run_cell_eval(
    out_dir: str | os.PathLike[str],
    *,
    pert_col: str,
    control_label: str,
    celltype_col: str | None = None,
    profile: str = "full",
    num_threads: int = 1,
    aggregate: bool = True,
    timeout: float | None = None,
) -> pd.DataFrame | None:
    """Run ``cell-eval run`` on the exported files if cell-eval is importable; None (and a log line) if it is not.

    Returns cell-eval's aggregate table (``agg_results.csv``: one row per statistic, one column per metric) or,
    with ``aggregate=False``, its per-perturbation table (``results.csv``). With ``celltype_col`` the per-cell-type
    tables are concatenated under a leading ``cell_type`` column. Raises ``subprocess.CalledProcessError`` if
    cell-eval fails.
    """
    if not _cell_eval_available():
        logger.info("cell-eval is not installed; skipping (pip install cell-eval to run it)")
        return None
    out = Path(out_dir)
    results_dir = out / RESULTS_DIR
    cmd = cell_eval_command(out, pert_col=pert_col, control_label=control_label, celltype_col=celltype_col,
                            results_dir=results_dir, profile=profile, num_threads=num_threads,
                            executable=(sys.executable, "-m", "cell_eval"))  # fmt: skip
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True, timeout=timeout)
    basename = "agg_results.csv" if aggregate else "results.csv"
    if celltype_col is None:
        return pd.read_csv(results_dir / basename)
    real = ad.read_h5ad(out / REAL_FILE, backed="r")
    try:
        cell_types = sorted(real.obs[celltype_col].astype(str).unique())
    finally:
        real.file.close()
    frames = []
    for ct in cell_types:
        frame = pd.read_csv(results_dir / f"{ct.replace('/', '-')}_{basename}")
        frames.append(frame.assign(cell_type=ct)[["cell_type", *frame.columns]])
    return pd.concat(frames, ignore_index=True)
