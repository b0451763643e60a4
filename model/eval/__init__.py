"""Evaluation: the metric panel (:mod:`model.eval.metrics`) and the cell-eval export (:mod:`model.eval.export`)."""

from model.eval.export import cell_eval_command, export_cell_eval, run_cell_eval
from model.eval.metrics import (
    METRICS,
    CellTypeReference,
    MetricSpec,
    ObservedGroup,
    PCABasis,
    cell_type_reference,
    control_halves,
    fit_pca,
    observe,
    score,
    split_half,
    split_half_ceiling,
)

__all__ = [
    "METRICS",
    "CellTypeReference",
    "MetricSpec",
    "ObservedGroup",
    "PCABasis",
    "cell_eval_command",
    "cell_type_reference",
    "control_halves",
    "export_cell_eval",
    "fit_pca",
    "observe",
    "run_cell_eval",
    "score",
    "split_half",
    "split_half_ceiling",
]
