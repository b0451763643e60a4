"""Request and response models of the prediction service (``api.app``).

These field names are the contract that clients (``api.batch_client``) are written against. Expression values
are log-normalised, one list per cell, in the model's gene order (``GET /info`` ``genes``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Candidate",
    "ControlCells",
    "ErrorResponse",
    "Health",
    "Info",
    "Limits",
    "PerturbationPrediction",
    "PredictRequest",
    "PredictResponse",
    "Readiness",
    "TopGene",
    "ValidationErrorResponse",
    "ValidationIssue",
]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ControlCells(_Strict):
    """The caller's own control cells: ``values`` is (cells, genes), one row per cell, columns as ``genes``."""

    genes: list[str] = Field(min_length=1, description="Gene symbols of the columns of ``values``.")
    values: list[list[FiniteFloat]] = Field(
        min_length=1, description="Log-normalised expression, one row per cell, each as long as ``genes``."
    )

    @model_validator(mode="after")
    def _rectangular(self) -> ControlCells:
        lengths = sorted({len(row) for row in self.values})
        if lengths != [len(self.genes)]:
            msg = f"every row of 'values' must have {len(self.genes)} entries (one per gene), got lengths {lengths}"
            raise ValueError(msg)
        if len(set(self.genes)) != len(self.genes):
            dup = sorted({g for g in self.genes if self.genes.count(g) > 1})[:10]
            msg = f"'genes' names a gene more than once: {dup}"
            raise ValueError(msg)
        return self


class PredictRequest(_Strict):
    """``POST /predict``: perturbations of one cell type (limits: ``GET /info`` ``limits``; above them, 413)."""

    cell_type: str = Field(description="A cell type of the model (``GET /info`` ``cell_types``).")
    perturbations: list[str] = Field(
        min_length=1, description="Perturbation labels: 'TP53', or 'A+B' for a double perturbation."
    )
    n_cells: int = Field(
        64, ge=1, description="Control cells drawn (seeded) from the model's cache; ignored with control_cells."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the control-cell draw.")
    control_cells: ControlCells | None = Field(
        None,
        description="Your own control cells instead of the cached ones. Genes the model has but these lack are "
        "filled from the cell type's cached control mean; genes the model lacks are ignored (both reported in "
        "warnings).",
    )
    return_cells: bool = Field(default=False, description="Also return the predicted cells and the control cells.")
    top_n: int = Field(20, ge=0, description="Genes in top_up and top_down (at most the number of genes).")
    batch: str | None = Field(None, description="Technical batch, for a model trained with one.")


class TopGene(BaseModel):
    gene: str
    delta: float


class Candidate(BaseModel):
    """A retrieved training perturbation; ``selected`` ones make up the context, with ``weight`` summing to 1."""

    id: int
    cell_type: str
    perturbation: str
    cosine: float = Field(description="Stage-1 cosine of its key to the query's.")
    score: float = Field(description="Refiner score (ptrag) or the stage-1 cosine (other variants).")
    weight: float
    selected: bool


class PerturbationPrediction(BaseModel):
    perturbation: str
    delta: list[float] = Field(description="(G,) predicted mean change from the control cells.")
    profile: list[float] = Field(description="(G,) predicted mean expression.")
    cells: list[list[float]] | None = Field(None, description="(n_cells, G) predicted cells, with return_cells.")
    top_up: list[TopGene]
    top_down: list[TopGene]
    candidates: list[Candidate]
    warnings: list[str]


class PredictResponse(BaseModel):
    request_id: str
    cell_type: str
    model_variant: str
    genes: list[str] = Field(description="The model's genes: the column order of every array.")
    n_cells: int
    control_cells: list[list[float]] | None = Field(None, description="The control cells used, with return_cells.")
    predictions: list[PerturbationPrediction]
    warnings: list[str] = Field(description="About the request as a whole (control genes filled or ignored).")


class Limits(BaseModel):
    max_perturbations: int
    max_cells: int
    batch_wait_ms: float
    batch_grace_ms: float
    batch_max_items: int


class Info(BaseModel):
    model_variant: str
    cell_types: list[str]
    zero_shot_cell_types: list[str] = Field(description="Cell types without training entries in the store.")
    n_known_genes: int = Field(description="Genes that can be perturbed: the size of the gene embedding table.")
    embedding_source: str
    n_genes: int = Field(description="Genes the model predicts (len(genes)).")
    genes: list[str]
    batches: list[str]
    split_id: str
    split_kind: str | None
    checkpoint_step: int
    validation_metric: str
    validation_value: float | None = Field(description="The checkpoint's best validation value (null: none).")
    retrieval: str = Field(description="The index directory or the retrieval service URL.")
    device: str
    limits: Limits
    batcher: dict[str, int] = Field(description="Micro-batcher counters since start (calls, items, multi_request).")
    worker: dict[str, int | None] = Field(
        default_factory=dict, description="The process answering: pid, and cpu_core it is pinned to (null: not pinned)."
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="'ready', 'loading', 'failed' or 'unconfigured'.")
    detail: str | None = None


class ErrorResponse(BaseModel):
    """Body of every error the service raises itself (malformed bodies get FastAPI's validation 422)."""

    error: str = Field(
        description="'unknown_gene', 'unknown_cell_type', 'unknown_batch', 'invalid_request', 'too_large', "
        "'unauthorized', 'not_ready' or 'retrieval_unavailable'."
    )
    detail: str
    request_id: str | None = None
    unknown: list[str] | None = None
    suggestions: dict[str, list[str]] | None = None


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="Where: e.g. ['body', 'control_cells', 'values', 0, 1].")
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """The 422 body of a request that does not match the schema (FastAPI's, without echoing the input)."""

    detail: list[ValidationIssue]
    request_id: str | None = None
