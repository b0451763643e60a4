"""Figures for the benchmark report, each written atomically as a PNG.

======================  =============================================================================================
plot_metric_bars        one panel per metric: a horizontal bar per model with its bootstrap CI, the best highlighted.
plot_delta_scatter      rows = (cell type, perturbation), cols = models: observed vs predicted delta, y = x, Pearson r.
plot_refiner_weights    heatmap of the refiner's weight over the K stage-1 candidates for P query perturbations.
plot_training_curves    training loss (raw and smoothed) and validation energy against step, one line per run.
======================  =============================================================================================

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so nothing depends on the backend or
global state, and no window ever opens. Every function returns the path it wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from model.eval.report import _checked_models, best_models, metric_header
from retrieval_service.atomic import atomic_path

__all__ = [
    "DeltaExample",
    "plot_delta_scatter",
    "plot_metric_bars",
    "plot_refiner_weights",
    "plot_training_curves",
]

DPI = 110
BAR_COLOR = "#9db4d0"
BEST_COLOR = "#d9822b"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    final = Path(path)
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return final


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    ncols = min(n, max_cols)
    return math.ceil(n / ncols), ncols


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_metric_bars(
    summary: pd.DataFrame,
    directions: Mapping[str, bool | None],
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str],
    model_order: Sequence[str] | None = None,
    exclude_from_best: Sequence[str] = (),
) -> Path:
    """One panel per metric: a horizontal bar per model (mean) with its CI (``lo``, ``hi``) as error bars.

    ``summary`` is the output of :func:`model.eval.report.summarize`. The best model of each directed metric is
    drawn in orange; titles carry ↑/↓. A model with no finite mean for a metric gets no bar.
    """
    metrics = list(metrics)
    if not metrics:
        msg = "no metrics to plot"
        raise ValueError(msg)
    models = _checked_models(summary, metrics, directions, model_order)
    best = best_models(summary[summary["metric"].isin(metrics)], directions, model_order=models,
                       exclude=exclude_from_best)  # fmt: skip

    nrows, ncols = _grid(len(metrics), 4)
    panel_h = max(1.8, 0.32 * len(models) + 1.0)
    fig = Figure(figsize=(3.6 * ncols + 1.0, panel_h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    y = np.arange(len(models))
    for ax, metric in zip(axes, metrics, strict=False):
        rows = summary[summary["metric"] == metric].set_index("model").reindex(models)
        mean = rows["mean"].to_numpy(np.float64)
        lo = rows["lo"].to_numpy(np.float64)
        hi = rows["hi"].to_numpy(np.float64)
        ok = np.isfinite(mean)
        colors = [BEST_COLOR if best.get(metric) == m else BAR_COLOR for m in models]
        if ok.any():
            ax.barh(y[ok], mean[ok], color=[c for c, k in zip(colors, ok, strict=True) if k], edgecolor="black", lw=0.5)
            err_ok = ok & np.isfinite(lo) & np.isfinite(hi)
            if err_ok.any():
                xerr = np.clip(np.vstack([mean - lo, hi - mean])[:, err_ok], 0.0, None)  # (2, n)
                ax.errorbar(mean[err_ok], y[err_ok], xerr=xerr, fmt="none", ecolor="black", elinewidth=1, capsize=2)
            ax.axvline(0.0, color="black", lw=0.5)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_yticks(y, [str(m) for m in models], fontsize=8)
        ax.set_ylim(len(models) - 0.5, -0.5)  # first model on top
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(metric_header(metric, directions), fontsize=10)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return _save(fig, path)


@dataclass
class DeltaExample:
    """One model's predicted and the observed pseudobulk delta (perturbed minus control mean) over G genes."""

    model: str
    cell_type: str
    perturbation: str
    predicted: np.ndarray  # (G,)
    observed: np.ndarray  # (G,)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r over the finite pairs; NaN when fewer than two or either side is constant."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    xc, yc = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denom if denom > 0 else float("nan")


def plot_delta_scatter(examples: Sequence[DeltaExample], path: str | os.PathLike[str]) -> Path:
    """A grid of observed (x) vs predicted (y) delta scatters: rows = (cell type, perturbation), cols = models.

    Rows and columns follow the order of first appearance in ``examples``; a missing (row, model) cell says so.
    Each panel shares one range on both axes, draws y = x, and gives Pearson r in its title.
    """
    if not examples:
        msg = "plot_delta_scatter needs at least one DeltaExample, got none"
        raise ValueError(msg)
    cells: dict[tuple[tuple[str, str], str], DeltaExample] = {}
    for ex in examples:
        pred = np.asarray(ex.predicted, dtype=np.float64)
        obs = np.asarray(ex.observed, dtype=np.float64)
        if pred.ndim != 1 or pred.shape != obs.shape:
            msg = (
                f"{ex.model}/{ex.cell_type}/{ex.perturbation}: predicted {pred.shape} and observed {obs.shape} "
                "must be the same 1-D shape (G,)"
            )
            raise ValueError(msg)
        cells[((ex.cell_type, ex.perturbation), ex.model)] = ex
    rows = list(dict.fromkeys(key for key, _ in cells))
    models = list(dict.fromkeys(model for _, model in cells))

    fig = Figure(figsize=(2.8 * len(models) + 0.6, 2.8 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(models), squeeze=False)
    for i, (cell_type, pert) in enumerate(rows):
        for j, model in enumerate(models):
            ax = axes[i, j]
            ex = cells.get(((cell_type, pert), model))
            if ex is None:
                _no_data(ax, "not predicted")
                ax.set_title(f"{model}\n{pert} ({cell_type})", fontsize=8)
                continue
            obs = np.asarray(ex.observed, dtype=np.float64)
            pred = np.asarray(ex.predicted, dtype=np.float64)
            ok = np.isfinite(obs) & np.isfinite(pred)
            if not ok.any():
                _no_data(ax)
            else:
                ax.scatter(obs[ok], pred[ok], s=4, alpha=0.5, color="tab:blue", linewidths=0)
                lo = min(obs[ok].min(), pred[ok].min())
                hi = max(obs[ok].max(), pred[ok].max())
                pad = 0.05 * (hi - lo) if hi > lo else 0.5
                lim = (lo - pad, hi + pad)
                ax.plot(lim, lim, color="black", lw=0.7, ls="--")
                ax.set_xlim(lim)
                ax.set_ylim(lim)
                ax.tick_params(labelsize=7)
            r = _pearson(obs, pred)
            r_text = "r = n/a" if not np.isfinite(r) else f"r = {r:.2f}"
            ax.set_title(f"{model}\n{pert} ({cell_type}) · {r_text}", fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("observed delta", fontsize=8)
            if j == 0:
                ax.set_ylabel("predicted delta", fontsize=8)
    return _save(fig, path)


def plot_refiner_weights(
    weights: np.ndarray,
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str],
    title: str,
) -> Path:
    """Heatmap of ``weights`` (P, K): the refiner's weight on stage-1 candidates ranked 1..K for P queries."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        msg = f"weights must be a non-empty (P, K) array, got shape {w.shape}"
        raise ValueError(msg)
    n_rows, k = w.shape
    if len(row_labels) != n_rows:
        msg = f"{len(row_labels)} row_labels for {n_rows} rows of weights"
        raise ValueError(msg)

    finite = w[np.isfinite(w)]
    vmin = 0.0 if finite.size and finite.min() >= 0 else None
    fig = Figure(figsize=(max(4.0, 0.4 * k + 2.8), max(2.4, 0.3 * n_rows + 1.4)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=vmin, interpolation="nearest")
    ax.set_xticks(np.arange(k), [str(i + 1) for i in range(k)], fontsize=7)
    ax.set_yticks(np.arange(n_rows), [str(s) for s in row_labels], fontsize=7)
    ax.set_xlabel("stage-1 rank")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="weight")
    return _save(fig, path)


def _smooth(y: np.ndarray) -> np.ndarray:
    """Trailing moving average over ~5% of the points (window 1..50)."""
    window = max(1, min(50, y.size // 20))
    if window == 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    out[window - 1 :] = (c[window:] - c[:-window]) / window
    out[: window - 1] = c[1:window] / np.arange(1, window)  # shorter windows at the start
    return out


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` over the records that have a finite one; a record without "step" uses its index."""
    steps, values = [], []
    for i, rec in enumerate(history):
        v = rec.get(key)
        if v is not None and np.isfinite(v):
            steps.append(float(rec.get("step", i + 1)))
            values.append(float(v))
    return np.asarray(steps), np.asarray(values)


def plot_training_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike[str],
) -> Path:
    """Two panels against step: training ``loss`` (light raw, bold smoothed) and ``val_energy``, one colour per run.

    ``histories`` maps a run name to its records (``{"step": 1, "loss": 2.77, ...}``, ``val_energy`` on some).
    Records without a finite value of a key are skipped for that panel.
    """
    if not histories:
        msg = "plot_training_curves needs at least one history, got none"
        raise ValueError(msg)
    series = {name: (_series(h, "loss"), _series(h, "val_energy")) for name, h in histories.items()}
    if not any(loss[0].size or val[0].size for loss, val in series.values()):
        msg = f"no history in {list(histories)} has a finite 'loss' or 'val_energy' record"
        raise ValueError(msg)

    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    for i, (name, ((s_loss, loss), (s_val, val))) in enumerate(series.items()):
        color = f"C{i % 10}"
        if loss.size:
            order = np.argsort(s_loss, kind="stable")
            ax_loss.plot(s_loss[order], loss[order], color=color, alpha=0.25, lw=0.8)
            ax_loss.plot(s_loss[order], _smooth(loss[order]), color=color, lw=1.6, label=name)
        if val.size:
            order = np.argsort(s_val, kind="stable")
            ax_val.plot(s_val[order], val[order], color=color, lw=1.6, marker="o", ms=3, label=name)
    for ax, ylabel, title in ((ax_loss, "loss", "training loss"), (ax_val, "energy distance", "validation energy")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            _no_data(ax, "no records")
    return _save(fig, path)
