"""Benchmark report: bootstrap summaries, a Markdown table, and a report directory.

A benchmark runner scores every model on the same split for several seeds and hands over one row per
(model, seed, cell type, perturbation) with one float column per metric. This module turns those rows into

======================  =============================================================================================
:func:`summarize`       per model x metric: mean, percentile-bootstrap CI over the model's rows, and n.
:func:`best_models`     metric -> the model with the best mean, respecting each metric's direction.
:func:`markdown_table`  models x metrics, cells ``mean [lo, hi]``, the best model per metric in bold.
:func:`write_report`    ``report.md``, ``scores.csv`` and ``summary.csv`` in one directory, each written atomically.
======================  =============================================================================================

NaN scores (a metric undefined for one perturbation) are ignored per metric: they count neither in the mean nor in
``n``, and a bootstrap resample averages only its non-NaN rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval_service.atomic import atomic_write_text

__all__ = [
    "KEY_COLUMNS",
    "SUMMARY_COLUMNS",
    "best_models",
    "markdown_table",
    "metric_header",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)

KEY_COLUMNS: tuple[str, ...] = ("model", "seed", "cell_type", "perturbation")
SUMMARY_COLUMNS: tuple[str, ...] = ("model", "metric", "mean", "lo", "hi", "n")


def metric_header(metric: str, directions: Mapping[str, bool | None]) -> str:
    """``"name ↑"`` (higher is better), ``"name ↓"`` (lower is better) or ``"name"`` (descriptive metric)."""
    arrow = {True: "↑", False: "↓", None: ""}[directions[metric]]
    return f"{metric} {arrow}" if arrow else metric


def _check_scores(scores: pd.DataFrame, metrics: Sequence[str]) -> None:
    missing = [c for c in (*KEY_COLUMNS, *metrics) if c not in scores.columns]
    if missing:
        msg = f"scores lack column(s) {missing}; have {list(scores.columns)}"
        raise ValueError(msg)
    if not metrics:
        msg = "no metrics given"
        raise ValueError(msg)
    if len(set(metrics)) != len(metrics):
        msg = f"metrics contain duplicates: {list(metrics)}"
        raise ValueError(msg)
    if scores.empty:
        msg = "scores has no rows"
        raise ValueError(msg)
    dup = scores.duplicated(list(KEY_COLUMNS))
    if dup.any():
        first = scores.loc[dup, list(KEY_COLUMNS)].iloc[0].to_dict()
        msg = f"scores has {int(dup.sum())} duplicate (model, seed, cell_type, perturbation) row(s), e.g. {first}"
        raise ValueError(msg)


def _metric_values(scores: pd.DataFrame, metrics: Sequence[str]) -> np.ndarray:
    try:
        return scores[list(metrics)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = f"metric columns {list(metrics)} must be numeric: {err}"
        raise ValueError(msg) from err


def _bootstrap_one(values: np.ndarray, *, n_boot: int, q: tuple[float, float], rng: np.random.Generator):
    """Mean, CI bounds and n per column of ``values`` (n, M), resampling its rows jointly.

    Each resample is summarised as a count per row, ``counts`` (B, n), so a resample's mean of every metric is one
    matrix product. Values are centred on the point mean first, so a constant column gives lo == hi == mean exactly.
    """
    n, _ = values.shape
    valid = np.isfinite(values)  # (n, M)
    n_valid = valid.sum(axis=0)  # (M,)
    sums = np.where(valid, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_valid > 0, sums / n_valid, np.nan)  # (M,)
    centred = np.where(valid, values - mean, 0.0)  # (n, M), NaN rows contribute 0 to sums and counts

    idx = rng.integers(0, n, size=(n_boot, n))  # (B, n)
    offsets = np.arange(n_boot)[:, None] * n
    counts = np.bincount((idx + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
    boot_sum = counts @ centred  # (B, M)
    boot_n = counts @ valid.astype(np.float64)  # (B, M)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.where(boot_n > 0, mean + boot_sum / boot_n, np.nan)  # (B, M)

    lo = np.full(mean.shape, np.nan)
    hi = np.full(mean.shape, np.nan)
    complete = np.isfinite(boot).all(axis=0)
    if complete.any():
        lo[complete], hi[complete] = np.percentile(boot[:, complete], q, axis=0)
    for j in np.flatnonzero(~complete):  # rare: few valid rows, so some resamples drew none of them
        col = boot[:, j][np.isfinite(boot[:, j])]
        if col.size:
            lo[j], hi[j] = np.percentile(col, q)
    return mean, lo, hi, n_valid


def summarize(
    scores: pd.DataFrame,
    *,
    metrics: Sequence[str],
    n_boot: int = 1000,
    ci: float = 0.95,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Mean and percentile-bootstrap confidence interval of every metric for every model.

    Parameters
    ----------
    scores
        One row per (model, seed, cell_type, perturbation), with a float column per metric; NaN is ignored.
    metrics
        The metric columns to summarise.
    n_boot
        Bootstrap resamples per model.
    ci
        Confidence level of the interval, in (0, 1).
    rng
        Source of randomness; the same seed gives the same output. Each model gets its own child stream
        (``rng.spawn``), in order of first appearance.

    Returns
    -------
    A long frame with columns ``model, metric, mean, lo, hi, n`` (models in order of first appearance, metrics in
    the given order). A resample draws the model's rows (its (cell type, perturbation, seed) entries) with
    replacement, the same rows for all metrics. ``n`` counts the non-NaN rows; with ``n == 0`` the other columns
    are NaN.
    """
    metrics = list(metrics)
    _check_scores(scores, metrics)
    if n_boot < 1:
        msg = f"n_boot must be >= 1, got {n_boot}"
        raise ValueError(msg)
    if not 0.0 < ci < 1.0:
        msg = f"ci must be in (0, 1), got {ci}"
        raise ValueError(msg)
    q = (100.0 * (1.0 - ci) / 2.0, 100.0 * (1.0 + ci) / 2.0)
    values = _metric_values(scores, metrics)  # (N, M)

    models = list(pd.unique(scores["model"]))
    model_col = scores["model"].to_numpy()
    frames = []
    for model, child in zip(models, rng.spawn(len(models)), strict=True):
        mean, lo, hi, n = _bootstrap_one(values[model_col == model], n_boot=n_boot, q=q, rng=child)
        frames.append(pd.DataFrame({"model": model, "metric": metrics, "mean": mean, "lo": lo, "hi": hi, "n": n}))
    summary = pd.concat(frames, ignore_index=True)
    summary["n"] = summary["n"].astype(np.int64)
    return summary


def _models_in_order(summary: pd.DataFrame, model_order: Sequence[str] | None) -> list[str]:
    present = list(pd.unique(summary["model"]))
    if model_order is None:
        return present
    unknown = [m for m in model_order if m not in present]
    if unknown:
        msg = f"model_order names model(s) {unknown} absent from the summary (have {present})"
        raise ValueError(msg)
    ordered = list(dict.fromkeys(model_order))
    return ordered + [m for m in present if m not in ordered]


def _means(summary: pd.DataFrame, metric: str, models: Sequence[str]) -> pd.Series:
    rows = summary[summary["metric"] == metric].set_index("model")
    return rows["mean"].reindex(list(models)).astype(np.float64)


def _check_directions(metrics: Sequence[str], directions: Mapping[str, bool | None]) -> None:
    missing = [m for m in metrics if m not in directions]
    if missing:
        msg = f"no direction for metric(s) {missing}; give True (higher is better), False or None (descriptive)"
        raise ValueError(msg)


def _checked_models(
    summary: pd.DataFrame,
    metrics: Sequence[str],
    directions: Mapping[str, bool | None],
    model_order: Sequence[str] | None,
) -> list[str]:
    """The summary's models in display order, once every metric is in the summary and has a direction."""
    missing = [m for m in metrics if m not in set(summary["metric"])]
    if missing:
        msg = f"metric(s) {missing} not in the summary"
        raise ValueError(msg)
    _check_directions(metrics, directions)
    return _models_in_order(summary, model_order)


def best_models(
    summary: pd.DataFrame,
    directions: Mapping[str, bool | None],
    *,
    model_order: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, str]:
    """Metric -> the model with the best mean (ties: the first in model order), ``exclude`` left out (e.g. the
    split-half ceiling, a reference rather than a contender).

    Metrics whose direction is None, and metrics with no finite mean, get no entry. Model order is
    ``model_order`` (then the remaining models), else the order of first appearance in ``summary``.
    """
    metrics = list(pd.unique(summary["metric"]))
    _check_directions(metrics, directions)
    models = [m for m in _models_in_order(summary, model_order) if m not in set(exclude)]
    best = {}
    for metric in metrics:
        higher = directions[metric]
        if higher is None:
            continue
        means = _means(summary, metric, models).to_numpy()
        finite = np.isfinite(means)
        if not finite.any():
            continue
        target = np.max(means[finite]) if higher else np.min(means[finite])
        best[metric] = models[int(np.flatnonzero(finite & (means == target))[0])]
    return best


def _number_format(means: np.ndarray, digits: int) -> str:
    """``digits`` decimals, or ``digits`` significant digits for a column whose largest mean would print as zero."""
    scale = np.max(np.abs(means[np.isfinite(means)]), initial=0.0)
    return f".{max(digits, 1)}g" if 0 < scale < 0.5 * 10.0**-digits else f".{digits}f"


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if np.isfinite(x) else "–"


def markdown_table(
    summary: pd.DataFrame,
    directions: Mapping[str, bool | None],
    *,
    metrics: Sequence[str],
    model_order: Sequence[str] | None = None,
    digits: int = 3,
    exclude_from_best: Sequence[str] = (),
) -> str:
    """A Markdown table: one row per model, one column per metric, cells ``mean [lo, hi]``.

    Headers carry the direction (``name ↑``, ``name ↓``, or just ``name`` for a descriptive metric); the best model
    of each directed metric (:func:`best_models`) is in **bold**. Missing or all-NaN cells print as ``–``. Numbers
    get ``digits`` decimals, or ``digits`` significant digits in a column whose largest mean would round to zero.
    """
    metrics = list(metrics)
    models = _checked_models(summary, metrics, directions, model_order)
    sub = summary[summary["metric"].isin(metrics)]
    best = best_models(sub, directions, model_order=models, exclude=exclude_from_best)
    cells = sub.set_index(["model", "metric"])

    lines = [
        "| model | " + " | ".join(metric_header(m, directions) for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    specs = {m: _number_format(_means(sub, m, models).to_numpy(), digits) for m in metrics}
    for model in models:
        row = []
        for metric in metrics:
            if (model, metric) not in cells.index:
                row.append("–")
                continue
            r, spec = cells.loc[(model, metric)], specs[metric]
            text = _fmt(r["mean"], spec)
            if np.isfinite(r["mean"]):
                text += f" [{_fmt(r['lo'], spec)}, {_fmt(r['hi'], spec)}]"
            row.append(f"**{text}**" if best.get(metric) == model else text)
        name = str(model).replace("|", r"\|")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _render_value(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return f"`{text}`" if key == "command" else text


def _render_meta(meta: Mapping[str, Any], indent: int = 0) -> list[str]:
    """Bullet list; mappings and long or nested sequences become nested bullets."""
    pad = "  " * indent
    lines = []
    for key, value in meta.items():
        label = f"**{key}**" if indent == 0 else str(key)
        if isinstance(value, Mapping):
            lines.append(f"{pad}- {label}:")
            lines.extend(_render_meta(value, indent + 1))
        elif isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes):
            items = list(value)
            if len(items) <= 12 and not any(isinstance(v, Mapping | list | tuple) for v in items):
                lines.append(f"{pad}- {label}: " + ", ".join(_render_value(str(key), v) for v in items))
            else:
                lines.append(f"{pad}- {label}:")
                lines.extend(_render_meta({str(i): v for i, v in enumerate(items)}, indent + 1))
        else:
            lines.append(f"{pad}- {label}: {_render_value(str(key), value)}")
    return lines


def write_report(
    out_dir: str | os.PathLike[str],
    scores: pd.DataFrame,
    *,
    directions: Mapping[str, bool | None],
    metrics: Sequence[str],
    meta: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    labels: Mapping[str, str] | None = None,
    model_order: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    extra_sections: Sequence[tuple[str, str]] = (),
    title: str = "PT-RAG benchmark report",
    ci: float = 0.95,
    exclude_from_best: Sequence[str] = (),
) -> Path:
    """Write ``report.md``, ``scores.csv`` and ``summary.csv`` into ``out_dir`` (created if needed).

    Parameters
    ----------
    scores
        Per-perturbation rows (see :func:`summarize`); written unchanged to ``scores.csv``.
    directions
        Metric -> higher is better (None: descriptive, never bold). Every metric in ``metrics`` needs an entry.
    meta
        The run's setup (command, data, split kind and ids per seed, seeds, control reference, training steps, ...),
        rendered in order as a bullet list; nested mappings become nested bullets.
    figures
        Caption -> path of an existing PNG; linked from the report by a path relative to ``out_dir``.
    labels
        Metric -> short description for the legend under the table.
    extra_sections
        ``(title, markdown body)`` pairs appended at the end.

    Returns
    -------
    The path of ``report.md``. Each file is written atomically; ``report.md`` last, so its presence means the
    directory is complete. The bootstrap uses ``np.random.default_rng(seed)``.
    """
    out = Path(out_dir)
    metrics = list(metrics)
    _check_directions(metrics, directions)
    figures = dict(figures or {})
    labels = dict(labels or {})
    for caption, fig in figures.items():
        if not Path(fig).is_file():
            msg = f"figure {caption!r} not found at {fig}"
            raise FileNotFoundError(msg)

    summary = summarize(scores, metrics=metrics, n_boot=n_boot, ci=ci, rng=np.random.default_rng(seed))
    models = _models_in_order(summary, model_order)
    summary = summary.sort_values(
        "model", key=lambda s: s.map({m: i for i, m in enumerate(models)}), kind="stable", ignore_index=True
    )
    n_seeds = scores["seed"].nunique()
    n_pairs = len(scores[["cell_type", "perturbation"]].drop_duplicates())

    lines = [f"# {title}", "", "## Setup", "", *_render_meta(meta), ""]
    lines += [
        "## Results",
        "",
        f"{len(models)} model(s), {n_pairs} (cell type, perturbation) pair(s), {n_seeds} seed(s). Cells are "
        f"`mean [lo, hi]`: the mean over (cell type, perturbation, seed) rows and its {ci:.0%} percentile-bootstrap "
        f"interval ({n_boot} resamples of the rows, seed {seed}). The best model per metric is in **bold**"
        + (f" ({', '.join(exclude_from_best)} not competing)." if exclude_from_best else "."),
        "",
        markdown_table(summary, directions, metrics=metrics, model_order=models, exclude_from_best=exclude_from_best),
        "### Metrics",
        "",
    ]
    for metric in metrics:
        higher = directions[metric]
        how = {True: "↑ higher is better", False: "↓ lower is better", None: "descriptive"}[higher]
        desc = f": {labels[metric]}" if metric in labels else ""
        lines.append(f"- **{metric}** ({how}){desc}")
    lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for caption, fig in figures.items():
            rel = Path(os.path.relpath(Path(fig).resolve(), out.resolve())).as_posix()
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    for section_title, body in extra_sections:
        lines += [f"## {section_title}", "", body.rstrip("\n"), ""]

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.csv", scores.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    logger.info("wrote %s (%d models x %d metrics)", report, len(models), len(metrics))
    return report
