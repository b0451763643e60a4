"""Benchmark report: bootstrap summary, best marking, Markdown, the report directory, and the PNG figures."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from model.eval.plots import (
    DeltaExample,
    plot_delta_scatter,
    plot_metric_bars,
    plot_refiner_weights,
    plot_training_curves,
)
from model.eval.report import best_models, markdown_table, summarize, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_scores(
    *,
    models: tuple[str, ...] = ("pt_rag", "knn", "control"),
    n_perts: int = 20,
    seeds: tuple[int, ...] = (0, 1),
    seed: int = 0,
) -> pd.DataFrame:
    """Rows per (model, seed, cell type, perturbation); model i scores about i on `pearson`, -i on `mse`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, model in enumerate(models):
        for s in seeds:
            for p in range(n_perts):
                rows.append(
                    {
                        "model": model,
                        "seed": s,
                        "cell_type": "k562" if p % 2 else "rpe1",
                        "perturbation": f"GENE{p:02d}",
                        "pearson": i + rng.normal(scale=0.5),
                        "mse": -i + rng.normal(scale=0.5),
                        "n_cells": 10.0,
                    }
                )
    return pd.DataFrame(rows)


DIRECTIONS = {"pearson": True, "mse": False, "n_cells": None}
METRICS = ["pearson", "mse", "n_cells"]


def row(summary: pd.DataFrame, model: str, metric: str) -> pd.Series:
    sel = summary[(summary["model"] == model) & (summary["metric"] == metric)]
    assert len(sel) == 1
    return sel.iloc[0]


# ---------------------------------------------------------------------------------------------------- summarize


def test_summary_shape_and_mean():
    scores = make_scores()
    summary = summarize(scores, metrics=METRICS, n_boot=200, rng=np.random.default_rng(0))
    assert list(summary.columns) == ["model", "metric", "mean", "lo", "hi", "n"]
    assert list(summary["model"]) == [m for m in ("pt_rag", "knn", "control") for _ in METRICS]
    knn = scores[scores["model"] == "knn"]
    r = row(summary, "knn", "pearson")
    assert r["mean"] == pytest.approx(knn["pearson"].mean())
    assert r["n"] == len(knn) == 40
    assert r["lo"] < r["mean"] < r["hi"]


def test_constant_metric_has_degenerate_interval():
    scores = make_scores()
    summary = summarize(scores, metrics=METRICS, n_boot=100, rng=np.random.default_rng(0))
    for model in ("pt_rag", "knn", "control"):
        r = row(summary, model, "n_cells")
        assert r["lo"] == r["hi"] == r["mean"] == 10.0


def test_interval_shrinks_with_more_rows():
    small = summarize(make_scores(n_perts=10), metrics=["pearson"], n_boot=500, rng=np.random.default_rng(0))
    large = summarize(make_scores(n_perts=250), metrics=["pearson"], n_boot=500, rng=np.random.default_rng(0))
    width_small = row(small, "knn", "pearson")[["lo", "hi"]].diff().iloc[-1]
    width_large = row(large, "knn", "pearson")[["lo", "hi"]].diff().iloc[-1]
    # Width scales as 1/sqrt(n): 20 -> 500 rows is a factor 5.
    assert width_large < 0.4 * width_small


def test_interval_level_matches_normal_theory():
    rng = np.random.default_rng(3)
    scores = make_scores(models=("a",), n_perts=200, seeds=(0,))
    scores["pearson"] = rng.normal(size=len(scores))
    r = row(summarize(scores, metrics=["pearson"], n_boot=2000, ci=0.9, rng=rng), "a", "pearson")
    se = scores["pearson"].std() / np.sqrt(len(scores))
    assert r["hi"] - r["lo"] == pytest.approx(2 * 1.645 * se, rel=0.15)


def test_same_seed_same_output_other_seed_differs():
    scores = make_scores()
    a = summarize(scores, metrics=METRICS, n_boot=100, rng=np.random.default_rng(7))
    b = summarize(scores, metrics=METRICS, n_boot=100, rng=np.random.default_rng(7))
    c = summarize(scores, metrics=METRICS, n_boot=100, rng=np.random.default_rng(8))
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["lo"], c["lo"])


def test_nan_ignored_per_metric():
    scores = make_scores()
    knn = scores["model"] == "knn"
    scores.loc[knn & (scores["perturbation"] == "GENE03"), "pearson"] = np.nan  # 2 rows (2 seeds)
    scores.loc[scores["model"] == "control", "mse"] = np.nan  # all rows
    summary = summarize(scores, metrics=METRICS, n_boot=200, rng=np.random.default_rng(0))
    r = row(summary, "knn", "pearson")
    assert r["n"] == 38
    assert r["mean"] == pytest.approx(scores.loc[knn, "pearson"].mean())  # pandas skips NaN
    assert np.isfinite([r["lo"], r["hi"]]).all()
    assert row(summary, "knn", "mse")["n"] == 40  # other metrics keep all rows
    empty = row(summary, "control", "mse")
    assert empty["n"] == 0
    assert np.isnan([empty["mean"], empty["lo"], empty["hi"]]).all()


def test_summarize_rejects_bad_input():
    scores = make_scores()
    with pytest.raises(ValueError, match="lack column"):
        summarize(scores, metrics=["nope"], rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="duplicate"):
        summarize(pd.concat([scores, scores.iloc[:1]]), metrics=METRICS, rng=np.random.default_rng(0))


def test_summarize_is_fast():
    models = tuple(f"m{i}" for i in range(12))
    scores = make_scores(models=models, n_perts=100, seeds=(0, 1, 2))  # 300 rows per model
    rng = np.random.default_rng(0)
    metrics = [f"x{j}" for j in range(20)]
    scores = pd.concat([scores, pd.DataFrame(rng.normal(size=(len(scores), 20)), columns=metrics)], axis=1)
    start = time.perf_counter()
    summary = summarize(scores, metrics=metrics, n_boot=1000, rng=rng)
    assert time.perf_counter() - start < 3.0
    assert len(summary) == 12 * 20


# ------------------------------------------------------------------------------------------ best and markdown


def test_best_respects_direction_and_skips_descriptive():
    summary = summarize(make_scores(), metrics=METRICS, n_boot=50, rng=np.random.default_rng(0))
    best = best_models(summary, DIRECTIONS)
    assert best == {"pearson": "control", "mse": "control"}  # control: highest pearson (~2), lowest mse (~-2)
    flipped = best_models(summary, {"pearson": False, "mse": True, "n_cells": None})
    assert flipped == {"pearson": "pt_rag", "mse": "pt_rag"}


def test_best_ties_go_to_first_in_model_order():
    summary = summarize(make_scores(), metrics=["n_cells"], n_boot=10, rng=np.random.default_rng(0))
    assert best_models(summary, {"n_cells": True}) == {"n_cells": "pt_rag"}
    assert best_models(summary, {"n_cells": True}, model_order=["knn"]) == {"n_cells": "knn"}


def test_best_skips_nan_models():
    scores = make_scores()
    scores.loc[scores["model"] == "control", "pearson"] = np.nan
    summary = summarize(scores, metrics=["pearson"], n_boot=50, rng=np.random.default_rng(0))
    assert best_models(summary, {"pearson": True}) == {"pearson": "knn"}


def test_markdown_rows_arrows_and_bold():
    summary = summarize(make_scores(), metrics=METRICS, n_boot=50, rng=np.random.default_rng(0))
    md = markdown_table(summary, DIRECTIONS, metrics=METRICS, model_order=["knn", "control", "pt_rag"])
    lines = md.strip().splitlines()
    assert lines[0] == "| model | pearson ↑ | mse ↓ | n_cells |"
    assert len(lines) == 2 + 3
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["knn", "control", "pt_rag"]

    def cell(model: str, col: int) -> str:
        (line,) = [x for x in lines[2:] if x.split("|")[1].strip() == model]
        return line.split("|")[col + 2].strip()

    # mse is lower-is-better: the minimum (control, ~-2) is bold, the maximum (pt_rag, ~0) is not.
    assert cell("control", 1).startswith("**") and cell("control", 1).endswith("**")
    assert not cell("pt_rag", 1).startswith("**")
    assert md.count("**") == 2 * 2  # one bold cell per directed metric, none for n_cells
    r = row(summary, "knn", "pearson")
    assert cell("knn", 0) == f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
    assert cell("knn", 2) == "10.000 [10.000, 10.000]"


def test_markdown_lower_is_better_bolds_minimum_of_hand_values():
    summary = pd.DataFrame(
        {
            "model": ["a", "b", "c"],
            "metric": "mse",
            "mean": [0.5, 0.2, np.nan],
            "lo": [0.4, 0.1, np.nan],
            "hi": [0.6, 0.3, np.nan],
            "n": [10, 10, 0],
        }
    )
    md = markdown_table(summary, {"mse": False}, metrics=["mse"], digits=2)
    assert "| b | **0.20 [0.10, 0.30]** |" in md
    assert "| a | 0.50 [0.40, 0.60] |" in md
    assert "| c | – |" in md


def test_markdown_unknown_metric_raises():
    summary = summarize(make_scores(), metrics=["pearson"], n_boot=10, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="not in the summary"):
        markdown_table(summary, DIRECTIONS, metrics=["mse"])
    with pytest.raises(ValueError, match="no direction"):
        markdown_table(summary, {}, metrics=["pearson"])


# ---------------------------------------------------------------------------------------------- write_report


def test_write_report(tmp_path: Path):
    scores = make_scores()
    scores.loc[0, "pearson"] = np.nan
    fig = tmp_path / "out" / "figures" / "bars.png"
    fig.parent.mkdir(parents=True)
    fig.write_bytes(PNG_SIGNATURE)
    meta = {
        "command": "ptrag bench --split cell_type",
        "data": "perturbench_devel.h5ad",
        "split": {"kind": "cell_type", "ids": {"0": "abc123", "1": "def456"}},
        "seeds": [0, 1],
        "control reference": "per-cell-type control mean",
        "training steps": 2000,
    }
    report = write_report(
        tmp_path / "out",
        scores,
        directions=DIRECTIONS,
        metrics=METRICS,
        meta=meta,
        figures={"Metric bars": fig},
        labels={"pearson": "Pearson r of predicted vs observed delta"},
        n_boot=50,
        extra_sections=[("Notes", "Baselines fell back 3 times.")],
    )
    out = tmp_path / "out"
    assert report == out / "report.md"
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.md", "scores.csv", "summary.csv"]
    assert list((out / "figures").iterdir()) == [fig]  # no temporaries left anywhere

    reread = pd.read_csv(out / "scores.csv", float_precision="round_trip")
    pd.testing.assert_frame_equal(reread, scores)
    summary = pd.read_csv(out / "summary.csv")
    expected = summarize(scores, metrics=METRICS, n_boot=50, rng=np.random.default_rng(0))
    pd.testing.assert_frame_equal(summary, expected, check_exact=False)

    text = report.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert "## Setup" in text
    assert "- **command**: `ptrag bench --split cell_type`" in text
    assert "- **seeds**: 0, 1" in text
    assert "    - 1: def456" in text  # nested split ids
    assert "- **training steps**: 2000" in text
    assert "| model | pearson ↑ | mse ↓ | n_cells |" in text
    assert "- **pearson** (↑ higher is better): Pearson r of predicted vs observed delta" in text
    assert "- **mse** (↓ lower is better)" in text
    assert "- **n_cells** (descriptive)" in text
    assert "![Metric bars](figures/bars.png)" in text
    assert text.index("## Notes") > text.index("## Figures")
    assert text.rstrip().endswith("Baselines fell back 3 times.")


def test_write_report_missing_figure_writes_nothing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="bars"):
        write_report(
            tmp_path / "out",
            make_scores(),
            directions=DIRECTIONS,
            metrics=METRICS,
            meta={},
            figures={"bars": tmp_path / "missing.png"},
            n_boot=10,
        )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- plots


def assert_png(path: Path, *, min_side: int = 100) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3
    assert min(image.shape[:2]) >= min_side
    assert image.std() > 0  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left


def test_plot_metric_bars(tmp_path: Path):
    scores = make_scores()
    scores.loc[scores["model"] == "knn", "mse"] = np.nan  # all NaN for one model: no bar, no crash
    summary = summarize(scores, metrics=METRICS, n_boot=50, rng=np.random.default_rng(0))
    path = plot_metric_bars(summary, DIRECTIONS, tmp_path / "bars.png", metrics=METRICS)
    assert path == tmp_path / "bars.png"
    assert_png(path)


def test_plot_metric_bars_one_model_and_all_nan_metric(tmp_path: Path):
    scores = make_scores(models=("only",))
    scores["mse"] = np.nan
    summary = summarize(scores, metrics=METRICS, n_boot=20, rng=np.random.default_rng(0))
    assert_png(plot_metric_bars(summary, DIRECTIONS, tmp_path / "one.png", metrics=METRICS))


def test_plot_delta_scatter(tmp_path: Path):
    rng = np.random.default_rng(0)
    observed = rng.normal(size=50)
    examples = [
        DeltaExample(model, "k562", pert, observed + rng.normal(scale=noise, size=50), observed)
        for pert in ("GENE01", "GENE02")
        for model, noise in (("pt_rag", 0.3), ("knn", 1.0))
    ]
    examples.append(DeltaExample("control", "k562", "GENE01", np.zeros(50), observed))  # constant: r undefined
    assert_png(plot_delta_scatter(examples, tmp_path / "scatter.png"))


def test_plot_delta_scatter_rejects_empty_and_bad_shapes(tmp_path: Path):
    with pytest.raises(ValueError, match="at least one"):
        plot_delta_scatter([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="same 1-D shape"):
        plot_delta_scatter([DeltaExample("m", "k562", "G", np.zeros(3), np.zeros(4))], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_plot_refiner_weights(tmp_path: Path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 16))
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = [f"GENE{i:02d}" for i in range(6)]
    assert_png(plot_refiner_weights(weights, tmp_path / "w.png", row_labels=labels, title="refiner weights"))
    with pytest.raises(ValueError, match="row_labels"):
        plot_refiner_weights(weights, tmp_path / "w.png", row_labels=labels[:2], title="x")


def test_plot_training_curves(tmp_path: Path):
    rng = np.random.default_rng(0)

    def history(scale: float) -> list[dict[str, float]]:
        records = []
        for step in range(1, 201):
            rec = {"step": step, "loss": scale * (3.0 / np.sqrt(step)) + rng.normal(scale=0.05), "lr": 2e-5}
            if step % 50 == 0:
                rec["val_energy"] = scale / np.sqrt(step)
            records.append(rec)
        return records

    path = plot_training_curves({"run_a": history(1.0), "run_b": history(1.5)}, tmp_path / "curves.png")
    assert_png(path)
    with pytest.raises(ValueError, match="at least one"):
        plot_training_curves({}, tmp_path / "empty.png")


def test_plot_training_curves_without_validation(tmp_path: Path):
    path = plot_training_curves({"run": [{"step": s, "loss": 1.0 / s} for s in range(1, 30)]}, tmp_path / "c.png")
    assert_png(path)


def test_best_models_can_leave_out_a_reference_row():
    summary = pd.DataFrame({"model": ["a", "ceiling", "b"], "metric": "r", "mean": [0.2, 0.9, 0.5],
                            "lo": [0.1, 0.8, 0.4], "hi": [0.3, 1.0, 0.6], "n": 3})  # fmt: skip
    assert best_models(summary, {"r": True}) == {"r": "ceiling"}
    assert best_models(summary, {"r": True}, exclude=["ceiling"]) == {"r": "b"}
    table = markdown_table(summary, {"r": True}, metrics=["r"], exclude_from_best=["ceiling"])
    assert "**0.500 [0.400, 0.600]**" in table and "**0.900" not in table
