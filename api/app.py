"""The prediction service: ``POST /predict`` over HTTP (``ptrag serve``, or ``uvicorn api.app:app``).

Configuration comes from the environment (``PTRAG_CHECKPOINT``, ``PTRAG_INDEX_DIR`` or ``PTRAG_RETRIEVAL_URL`` with
``PTRAG_EMBEDDINGS``, ``PTRAG_API_KEY``, limits and batching; see :class:`Settings`). The checkpoint and its
retrieval store load in ``lifespan``, in a worker thread, so ``/healthz`` answers at once and ``/readyz`` says
503 until the model is loaded (or why loading failed). Inference runs on one model thread behind a micro-batcher
(:mod:`api.batching`) that puts the perturbations of concurrent requests into one forward pass.

Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /info``, ``POST /predict``; OpenAPI docs at ``/docs``.
Errors on user input are 4xx with an :class:`~api.schemas.ErrorResponse` body: an unknown gene or cell type is 422
naming it with close matches; more perturbations or cells than the limits is 413; a missing or wrong API key (when
``PTRAG_API_KEY`` is set) is 401 on ``/predict`` and ``/info``. Malformed bodies get FastAPI's validation 422.

Binary responses: ``POST /predict`` with ``Accept: application/x-npy`` returns a ``.npy`` file (``numpy.load``):
float32 deltas ``(P, G)``, or with ``return_cells`` the predicted cells ``(P, n_cells, G)``. P follows the JSON
list in the ``X-Perturbations`` header (the request's order), G the genes of ``GET /info``; ``X-Array`` says
``delta`` or ``cells``, ``X-Request-ID`` the request id, ``X-Warnings`` a JSON list of the request's warnings.

Every request gets an id (the caller's ``X-Request-ID`` when it is 1-128 visible ASCII characters, else a new
one), echoed in the ``X-Request-ID`` response header and in the body, and one JSON log line on the ``api.access``
logger: id, method, path, status, duration, number of perturbations.

Tests pass settings through ``create_app(settings)`` and a stand-in loader through ``create_app(loader=...)``.
"""

from __future__ import annotations

import asyncio
import collections
import difflib
import functools
import io
import itertools
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.affinity import claim_core
from api.batching import MicroBatcher
from api.schemas import (
    ControlCells,
    ErrorResponse,
    Health,
    Info,
    Limits,
    PredictRequest,
    PredictResponse,
    Readiness,
    ValidationErrorResponse,
)
from model.predict import CANDIDATE_COLUMNS, Prediction, PredictItem, Predictor
from retrieval_service.client import RetrievalClientError
from retrieval_service.index import UnknownGeneError
from retrieval_service.manifest import package_version

__all__ = ["Service", "Settings", "app", "create_app", "get_service", "get_settings", "load_predictor"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("api.access")

NPY = "application/x-npy"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe to echo in a header and a log line


class Settings(BaseSettings):
    """Service settings, read from ``PTRAG_*`` environment variables (``ptrag serve`` passes its flags here)."""

    # env_ignore_empty: `PTRAG_API_KEY=` (as compose passes an unset host variable) means no key, not "".
    model_config = SettingsConfigDict(env_prefix="PTRAG_", extra="ignore", env_ignore_empty=True)

    checkpoint: Path | None = Field(None, description="Checkpoint to serve, RUN_DIR/best.pt (PTRAG_CHECKPOINT).")
    index_dir: Path | None = Field(None, description="Retrieval store directory; default: the checkpoint's own.")
    retrieval_url: str | None = Field(None, description="A running retrieval service instead of index_dir.")
    embeddings: Path | None = Field(None, description="With retrieval_url: the gene table it was built from.")
    aliases: Path | None = Field(None, description="Gene alias map {old: new} (JSON, CSV or TSV) for requests.")
    api_key: SecretStr | None = Field(None, description="When set, /predict and /info need 'Bearer <key>'.")
    max_perturbations: int = Field(64, ge=1, description="Most perturbations per request; more is a 413.")
    max_cells: int = Field(4096, ge=1, description="Most control cells per request; more is a 413.")
    batch_wait_ms: float = Field(
        10.0,
        ge=0,
        description="Most the batcher waits for more requests after taking one; it waits only while requests that "
        "could join are in the server (or, for batch_grace_ms, for clients that just had their answer), so a lone "
        "request never waits.",
    )
    batch_grace_ms: float = Field(
        2.0,
        ge=0,
        description="How long the batcher waits, once no request is in the server, for as many as its previous call "
        "held (closed-loop clients between two requests); see api.batching.MicroBatcher.",
    )
    batch_max_items: int = Field(64, ge=1, description="Most perturbations per forward pass of the batcher.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_threads: int | None = Field(
        None,
        ge=1,
        description="torch, BLAS and OpenMP threads for inference; null keeps the libraries' defaults (one per "
        "core). On a small machine shared with other jobs, 1 avoids threads spinning against each other, and "
        "leaves the other cores to request handling while the model runs.",
    )
    load_in_background: bool = Field(default=True, description="Serve /healthz while the model loads; else fail fast.")
    pin_cores: bool = Field(
        default=False,
        description="Pin this worker's threads to one core no sibling worker holds (see api.affinity); for one "
        "worker per core (ptrag serve --workers N turns it on when N <= cores).",
    )


@lru_cache
def load_settings() -> Settings:
    """The environment's settings, read once."""
    return Settings()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_predictor(settings: Settings) -> Predictor:
    """The default loader: :meth:`Predictor.load` with the settings' options."""
    if settings.checkpoint is None:
        msg = "no checkpoint configured: set PTRAG_CHECKPOINT"
        raise ValueError(msg)
    return Predictor.load(
        settings.checkpoint,
        index=settings.index_dir,
        retrieval_url=settings.retrieval_url,
        embeddings=settings.embeddings,
        device=resolve_device(settings.device),
        aliases=settings.aliases,
    )


class ServiceError(Exception):
    """An error answered with ``status`` and an :class:`ErrorResponse` body."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra


# --- the loaded model --------------------------------------------------------------------------------------


class Service:
    """A loaded :class:`Predictor`, its micro-batcher, and what ``/info`` reports about it."""

    def __init__(self, predictor: Predictor, settings: Settings, *, in_server: Callable[[], int] | None = None) -> None:
        self.predictor, self.settings = predictor, settings
        self.control_mean = {ct: cells.mean(0).astype(np.float32) for ct, cells in predictor.controls.items()}
        self.gene_column = {g: j for j, g in enumerate(predictor.genes)}
        self._undo_threads: Callable[[], object] = lambda: None
        self.batcher: MicroBatcher = MicroBatcher(
            predictor.predict_items,
            max_items=settings.batch_max_items,
            max_wait_s=settings.batch_wait_ms / 1000,
            init=self._limit_threads,
            # /predict requests in the server and not in the batcher: being read and checked, or being answered
            # (whose clients, under load, often send their next request at once). Measured with 16 clients on two
            # workers, this count with the grace and a 10 ms cap against the first kind only with a 2 ms cap: passes
            # of 6-7.5 perturbations instead of ~4, 218-332 vs 196-257 requests/s (benchmarks/predict_load.py).
            expected=None if in_server is None else lambda: in_server() - self.batcher.outstanding,
            grace_s=settings.batch_grace_ms / 1000,
            name="ptrag-model",
        )
        self.static_info = self._static_info()

    def _static_info(self) -> dict[str, Any]:
        p, s = self.predictor, self.settings
        best = p.train_state.get("best_val")
        return {
            "model_variant": p.model.config.variant,
            "cell_types": list(p.cell_types),
            "zero_shot_cell_types": [c for c in p.cell_types if c not in p.store_cell_types],
            "n_known_genes": len(p.store.index.embeddings),
            "embedding_source": p.embedding_source,
            "n_genes": len(p.genes),
            "genes": list(p.genes),
            "batches": list(p.batches),
            "split_id": p.split_id,
            "split_kind": _split_kind(p),
            "checkpoint_step": int(p.train_state.get("step", 0)),
            "validation_metric": "val_energy_distance",
            "validation_value": float(best) if best is not None and np.isfinite(best) else None,
            "retrieval": str(getattr(p.store, "directory", None) or s.retrieval_url or s.index_dir),
            "device": str(p.device),
            "limits": Limits(
                max_perturbations=s.max_perturbations,
                max_cells=s.max_cells,
                batch_wait_ms=s.batch_wait_ms,
                batch_grace_ms=s.batch_grace_ms,
                batch_max_items=s.batch_max_items,
            ),
        }

    def info(self, cpu_core: int | None = None) -> Info:
        worker = {"pid": os.getpid(), "cpu_core": cpu_core}
        return Info(**self.static_info, batcher=dict(self.batcher.stats), worker=worker)

    def _limit_threads(self) -> None:
        """On the model thread (OpenMP's thread count is per calling thread; torch's and BLAS's are global)."""
        n = self.settings.model_threads
        if n is None:
            return
        import torch
        from threadpoolctl import threadpool_limits

        torch_threads = torch.get_num_threads()
        blas = threadpool_limits(limits=n)  # numpy's BLAS (retrieval's matrix products) and OpenMP
        torch.set_num_threads(n)
        self._undo_threads = lambda: (blas.restore_original_limits(), torch.set_num_threads(torch_threads))

    def close(self) -> None:
        self.batcher.close()
        self._undo_threads()
        close_store = getattr(self.predictor.store, "close", None)  # a RemoteStore's HTTP connections
        if callable(close_store):
            close_store()


def _split_kind(predictor: Predictor) -> str | None:
    store = predictor.store
    try:  # a local Store has its attrs; a RemoteStore asks the service
        attrs = store.attrs if hasattr(store, "attrs") else store.client.attrs  # type: ignore[attr-defined]
    except (AttributeError, RetrievalClientError):
        return None
    kind = attrs.get("split_kind")
    return str(kind) if kind is not None else None


# --- dependencies ------------------------------------------------------------------------------------------


async def get_settings(request: Request) -> Settings:
    """The app's settings (fixed by ``create_app(settings)``, else the environment's)."""
    return request.app.state.settings


async def get_service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        reason = getattr(request.app.state, "load_error", None) or "the model is still loading"
        raise ServiceError(503, "not_ready", f"model not loaded: {reason}")
    return service


_bearer = HTTPBearer(auto_error=False, description="Needed when the service has PTRAG_API_KEY set.")


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if settings.api_key is None:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    if not secrets.compare_digest(given, settings.api_key.get_secret_value().encode()):
        raise ServiceError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]


# --- lifespan ----------------------------------------------------------------------------------------------


def _load(app: FastAPI, settings: Settings) -> None:
    loader: Callable[[Settings], Predictor] = app.state.loader
    try:
        service = Service(loader(settings), settings, in_server=app.state.predict_requests.count)
    except Exception as err:  # reported by /readyz; the process keeps answering /healthz
        app.state.load_error = f"{type(err).__name__}: {err}"
        logger.exception("could not load the model %s", settings.checkpoint)
        if not settings.load_in_background:
            raise
        return
    if app.state.closing:  # the app stopped while this thread was loading
        service.close()
        return
    app.state.service = service
    logger.info("serving %s (%s, %d genes)", settings.checkpoint, service.static_info["model_variant"],
                service.static_info["n_genes"])  # fmt: skip


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings = app.state.fixed_settings or load_settings()
    app.state.service, app.state.load_error, app.state.closing = None, None, False
    # Before the model loads: the threads it starts (batcher, torch's) inherit the pinning.
    # One claim space per machine (not per server): two servers' workers then take different cores.
    claim = app.state.core_claim = claim_core("workers") if settings.pin_cores else None
    if claim is not None:
        logger.info("worker %d pinned to core %d", os.getpid(), claim.core)
    task = None
    if settings.checkpoint is None:
        app.state.load_error = "no checkpoint configured: set PTRAG_CHECKPOINT"
        logger.warning("prediction service started without a model (PTRAG_CHECKPOINT is unset)")
    elif settings.load_in_background:
        task = asyncio.create_task(asyncio.to_thread(_load, app, settings))
    else:
        await asyncio.to_thread(_load, app, settings)
    try:
        yield
    finally:
        app.state.closing = True
        if task is not None and not task.done():
            task.cancel()  # the loading thread finishes on its own and then closes what it built
        service, app.state.service = app.state.service, None
        if service is not None:
            service.close()
        if claim is not None:
            claim.release()


# --- endpoints ---------------------------------------------------------------------------------------------

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (only when PTRAG_API_KEY is set)."},
    413: {"model": ErrorResponse, "description": "More perturbations or cells than the limits (GET /info)."},
    422: {
        "model": ErrorResponse | ValidationErrorResponse,
        "description": "Unknown gene, cell type or batch (with close matches), or an "
        "invalid request; malformed bodies get FastAPI's validation error.",
    },
    503: {"model": ErrorResponse, "description": "The model is not loaded (yet), or the retrieval service is down."},
}


@router.get("/healthz", tags=["health"])
async def healthz() -> Health:
    """The process is up (always 200)."""
    return Health(status="ok")


@router.get("/readyz", tags=["health"], response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> Any:
    """200 once the model is loaded; 503 with the reason before (or when loading failed)."""
    if getattr(request.app.state, "service", None) is not None:
        return Readiness(status="ready")
    error = getattr(request.app.state, "load_error", None)
    status = "loading" if error is None else ("unconfigured" if "PTRAG_CHECKPOINT" in error else "failed")
    body = Readiness(status=status, detail=error or "the model is loading")
    return JSONResponse(status_code=503, content=body.model_dump())


@router.get("/info", tags=["model"], responses=_ERRORS, dependencies=[Depends(require_api_key)])
async def info(service: ServiceDep, request: Request) -> Info:
    """The served model: variant, cell types, genes (the column order of every array), split, limits; and the
    worker process that answered."""
    claim = getattr(request.app.state, "core_claim", None)
    return service.info(cpu_core=None if claim is None else claim.core)


@router.post(
    "/predict",
    tags=["model"],
    response_model=PredictResponse,
    responses={**_ERRORS, 200: {"content": {NPY: {}}, "description": "JSON, or .npy with Accept: " + NPY}},
    dependencies=[Depends(require_api_key)],
)
async def predict(body: PredictRequest, request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """Predicted response of ``cell_type`` to each perturbation: mean change, profile, top genes, and the
    retrieved training perturbations that explain it (optionally the predicted cells)."""
    request.state.n_perturbations = len(body.perturbations)
    _check_limits(body, settings)
    # A plain request (cells drawn from the cache, no cells returned) takes ~0.5 ms of Python before and after the
    # model: on the event loop, that is cheaper than two threadpool round trips and a thread blocked per request
    # (under load, 16 of them contended for the GIL with the model thread). Caller-sent or returned cell matrices
    # can take milliseconds to align or encode, and an unknown name a fuzzy match over the gene table (~0.1 s at
    # 20k genes): those go to the threadpool.
    heavy = (
        body.control_cells is not None
        or body.return_cells
        or not service.predictor.knows(body.cell_type, body.perturbations, body.batch)
    )
    prepare = functools.partial(_prepare, body, service)
    items, warnings = await run_in_threadpool(prepare) if heavy else prepare()
    predictions = await service.batcher.run(items)
    render = functools.partial(_render, body, request, service.predictor, items, predictions, warnings)
    return await run_in_threadpool(render) if heavy else render()


def _prepare(body: PredictRequest, service: Service) -> tuple[list[PredictItem], list[str]]:
    """The request's items for the batcher (names checked, control cells drawn or aligned), and its warnings."""
    predictor = service.predictor
    _check_names(body, predictor)
    ctrl, warnings = None, []
    if body.control_cells is not None:
        ctrl, warnings = _align_controls(body.control_cells, service, body.cell_type)
    try:
        items = predictor.make_items(body.cell_type, body.perturbations, n_cells=body.n_cells, seed=body.seed,
                                     ctrl=ctrl, batch=body.batch, cells=body.return_cells)  # fmt: skip
    except UnknownGeneError as err:
        raise ServiceError(422, "unknown_gene", str(err), unknown=err.genes, suggestions=err.suggestions) from None
    except ValueError as err:  # a malformed label, the control label, control cells that overflow float32
        raise ServiceError(422, "invalid_request", str(err)) from None
    return items, warnings


def _render(
    body: PredictRequest,
    request: Request,
    predictor: Predictor,
    items: list[PredictItem],
    predictions: list[Prediction],
    warnings: list[str],
) -> Response:
    """The response: JSON (a ``PredictResponse`` written by orjson, see :func:`_prediction`) or ``.npy``."""
    if NPY in request.headers.get("accept", ""):
        return _npy_response(predictions, warnings, return_cells=body.return_cells)
    response = {
        "request_id": request.state.request_id,
        "cell_type": body.cell_type,
        "model_variant": predictor.model.config.variant,
        "genes": predictor.genes,
        "n_cells": items[0].ctrl.shape[0],
        "control_cells": np.ascontiguousarray(items[0].ctrl, dtype=np.float32) if body.return_cells else None,
        "predictions": [
            _prediction(p, predictor.genes, top_n=body.top_n, cells=body.return_cells) for p in predictions
        ],
        "warnings": warnings,
    }
    return Response(content=orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _check_limits(body: PredictRequest, settings: Settings) -> None:
    n_pert = len(body.perturbations)
    if n_pert > settings.max_perturbations:
        detail = f"{n_pert} perturbations; at most {settings.max_perturbations} per request"
        raise ServiceError(413, "too_large", detail)
    n_cells = len(body.control_cells.values) if body.control_cells is not None else body.n_cells
    if n_cells > settings.max_cells:
        raise ServiceError(413, "too_large", f"{n_cells} cells; at most {settings.max_cells} per request")


def _close_matches(name: str, known: list[str]) -> list[str]:
    same_case = [k for k in known if k.lower() == name.lower()]
    return list(dict.fromkeys(same_case + difflib.get_close_matches(name, known, n=3, cutoff=0.5)))[:3]


def _check_names(body: PredictRequest, predictor: Predictor) -> None:
    for value, known, what in ((body.cell_type, predictor.cell_types, "cell type"),
                               (body.batch, predictor.batches, "batch")):  # fmt: skip
        if value is not None and value not in known:
            close = _close_matches(value, known)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            detail = f"unknown {what} {value!r}{hint}; the model knows {known[:20] or 'none'}"
            error = "unknown_" + what.replace(" ", "_")
            raise ServiceError(422, error, detail, unknown=[value], suggestions={value: close})


def _align_controls(cells: ControlCells, service: Service, cell_type: str) -> tuple[np.ndarray, list[str]]:
    """The caller's control cells in the model's gene order: genes they lack are filled with the cell type's
    cached control mean, genes the model lacks are dropped; both are reported."""
    genes = service.predictor.genes
    values = np.asarray(cells.values, dtype=np.float64)  # (S, g)
    if np.abs(values).max() > np.finfo(np.float32).max:
        raise ServiceError(422, "invalid_request", "control_cells values overflow float32 (log-normalised data?)")
    cols = np.array([service.gene_column.get(g, -1) for g in cells.genes])  # (g,) model column of each given gene
    known = cols >= 0
    if not known.any():
        detail = (f"none of the {len(cells.genes)} control_cells genes is a model gene (e.g. {cells.genes[:5]}); "
                  f"the model's genes are listed by GET /info")  # fmt: skip
        raise ServiceError(422, "invalid_request", detail)
    ctrl = np.repeat(service.control_mean[cell_type][None], values.shape[0], axis=0)  # (S, G)
    ctrl[:, cols[known]] = values[:, known]
    warnings = []
    if (~known).any():
        ignored = [g for g, k in zip(cells.genes, known, strict=True) if not k]
        warnings.append(f"{len(ignored)} control_cells genes are not model genes and were ignored: "
                        f"{_names(ignored)}")  # fmt: skip
    if known.sum() < len(genes):
        given = set(cols[known].tolist())
        filled = [g for j, g in enumerate(genes) if j not in given]
        warnings.append(f"{len(filled)} model genes missing from control_cells were filled with the cached "
                        f"control mean of {cell_type!r}: {_names(filled)}")  # fmt: skip
    return ctrl, warnings


def _names(names: list[str], n: int = 20) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _prediction(p: Prediction, genes: list[str], *, top_n: int, cells: bool) -> dict[str, Any]:
    """One ``PerturbationPrediction`` as a dict for orjson. Arrays stay float32 numpy: orjson writes each value
    as the shortest decimal that reads back as the same float32 (``0.1``, not ``0.10000000149011612``), which
    halves the response and, with orjson, made encoding it ~5x faster than pydantic's ``model_dump_json``."""
    delta = p.delta.astype(np.float32, copy=False)  # (G,)
    up, down = _top_genes(delta, top_n)
    # Float columns stay float32 for orjson's shortest decimals; the others become native Python values.
    cols = {c: v.astype(np.float32) if v.dtype.kind == "f" else v.tolist() for c, v in p.columns.items()}
    return {
        "perturbation": p.perturbation,
        "delta": delta,
        "profile": p.mean.astype(np.float32, copy=False),
        "cells": np.ascontiguousarray(p.cells, dtype=np.float32) if cells and p.cells is not None else None,
        "top_up": [{"gene": genes[j], "delta": delta[j]} for j in up],
        "top_down": [{"gene": genes[j], "delta": delta[j]} for j in down],
        "candidates": [{c: cols[c][i] for c in CANDIDATE_COLUMNS} for i in range(len(cols["id"]))],
        "warnings": p.warnings,
    }


def _top_genes(delta: np.ndarray, top_n: int) -> tuple[list[int], list[int]]:
    """Columns of the ``top_n`` largest positive and most negative values of ``delta``, largest change first, ties in
    the order a stable sort gives (the higher column first among equal increases, as reversing a stable sort does).
    Partitions first: sorting all G values per prediction was a visible share of the response time."""
    n = min(top_n, delta.size)
    if n == 0:
        return [], []
    cols = np.arange(delta.size)
    top = np.argpartition(-delta, n - 1)[:n] if n < delta.size else cols
    bottom = np.argpartition(delta, n - 1)[:n] if n < delta.size else cols
    # Ties at the cut: take every column equal to the n-th value, so the stable order below decides among them.
    top = np.union1d(top, np.flatnonzero(delta == delta[top].min()))
    bottom = np.union1d(bottom, np.flatnonzero(delta == delta[bottom].max()))
    up = top[np.lexsort((-top, -delta[top]))][:n]  # descending delta, higher column first among ties
    down = bottom[np.lexsort((bottom, delta[bottom]))][:n]  # ascending delta, lower column first among ties
    return [int(j) for j in up if delta[j] > 0], [int(j) for j in down if delta[j] < 0]


def _npy_response(predictions: list[Prediction], warnings: list[str], *, return_cells: bool) -> Response:
    arr = np.stack([p.cells if return_cells else p.delta for p in predictions]).astype(np.float32, copy=False)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    every = list(dict.fromkeys([*warnings, *(w for p in predictions for w in p.warnings)]))
    headers = {
        "X-Array": "cells" if return_cells else "delta",
        "X-Perturbations": json.dumps([p.perturbation for p in predictions]),  # ASCII-escaped: safe in a header
        "X-Warnings": json.dumps(every),
    }
    return Response(content=buf.getvalue(), media_type=NPY, headers=headers)


# --- request ids and access logs ---------------------------------------------------------------------------


class Gauge:
    """A thread-safe count of things in progress."""

    def __init__(self) -> None:
        self._n, self._lock = 0, threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self._n += delta

    def count(self) -> int:
        return self._n


class RequestContext:
    """ASGI middleware: a request id per request (echoed as ``X-Request-ID``), one JSON access-log line, and the
    count of ``POST /predict`` requests in the server (``predict_requests``: from arrival until the last part of
    the response is handed to the server, which the micro-batcher reads to decide whether more work is on its
    way)."""

    def __init__(self, app: Any, predict_requests: Gauge) -> None:
        self.app, self.predict_requests = app, predict_requests

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else _new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        counted = scope["method"] == "POST" and scope["path"] == "/predict"
        if counted:
            self.predict_requests.add(1)

        async def send_with_id(message: dict) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif counted and not message.get("more_body", False):
                # Before the send: once the client can have its answer, its next request must not find this one
                # still counted (a lone client would wait for itself).
                counted = False
                self.predict_requests.add(-1)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if counted:  # no complete response was sent
                self.predict_requests.add(-1)
            line = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                "n_perturbations": state.get("n_perturbations"),
            }
            access_logger.info(_JSONLine(line))


_ID_PREFIX = secrets.token_hex(8)  # per process: ids stay unique across uvicorn workers and restarts
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    """32 hex characters like a uuid4's, without its ``os.urandom`` call per request: a system call on the event
    loop releases the GIL to the model thread and then waits to get it back."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class _JSONLine:
    """A log message rendered as JSON only when a handler formats it (on the writer thread), not on the loop."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __str__(self) -> str:
        return json.dumps(self.data)


class _BatchedLineHandler(logging.Handler):
    """Keeps records in a deque; a daemon thread formats them and writes them in one write every ``interval`` s.

    Logging on the event loop costs one ``deque.append``. A handler that wrote on the loop released the GIL to the
    model thread and waited to get it back (a fifth of the loop's time per request under load); a queue with a
    listener thread woke that thread once per line, a GIL hand-off per request. Lines reach the stream at most
    ``interval`` late; :meth:`close` (at exit, through logging's shutdown) writes what is left.
    """

    def __init__(self, stream: Any, *, interval: float = 0.1) -> None:
        super().__init__()
        self.stream, self.interval = stream, interval
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._closed = threading.Event()
        self._writer = threading.Thread(target=self._write_every, name="ptrag-access-log", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self._records.append(record)  # atomic: no handler lock on the loop
            return True
        return False

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)

    def _write_every(self) -> None:
        while not self._closed.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        lines = []
        while self._records:
            record = self._records.popleft()
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
        if lines:
            with self.lock:  # flush can run on the writer thread and at close
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # a closed or broken stream: report it, keep the writer alive
                    self.handleError(record)

    def close(self) -> None:
        self._closed.set()
        self._writer.join(timeout=2 * self.interval + 1)
        self.flush()
        super().close()


def _configure_access_log() -> None:
    """JSON lines on stderr, written off the event loop (see `_BatchedLineHandler`), unless the host application
    already gave ``api.access`` a handler."""
    if not access_logger.handlers:
        handler = _BatchedLineHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(handler)
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False


# --- the app -----------------------------------------------------------------------------------------------


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _error(request: Request, status: int, body: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    body.request_id = _request_id(request)
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True), headers=headers)


def create_app(settings: Settings | None = None, *, loader: Callable[[Settings], Predictor] | None = None) -> FastAPI:
    """Build the service.

    Parameters
    ----------
    settings
        Fixed settings; None reads the environment (``PTRAG_*``) when the app starts.
    loader
        ``settings -> Predictor``; default :func:`load_predictor`. Tests pass one that waits or fails.
    """
    app = FastAPI(
        title="PT-RAG prediction service",
        version=package_version(),
        summary="Predicted single-cell responses to genetic perturbations, explained by retrieved training ones.",
        lifespan=lifespan,
    )
    app.state.fixed_settings = settings
    app.state.settings = settings  # replaced at startup by the environment's when None
    app.state.loader = loader or load_predictor
    app.include_router(router)
    app.state.predict_requests = Gauge()
    app.add_middleware(RequestContext, predict_requests=app.state.predict_requests)
    _configure_access_log()

    @app.exception_handler(RequestValidationError)
    def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        # Without the offending input: it may be a large array, or hold a NaN that JSON cannot carry.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in err.errors()]
        return JSONResponse(status_code=422, content={"detail": errors, "request_id": _request_id(request)})

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code == 400:  # FastAPI could not parse the body at all (not UTF-8, not JSON): malformed, 422
            body = ErrorResponse(error="invalid_request", detail=f"{err.detail}: send a JSON PredictRequest body")
            return _error(request, 422, body)
        return JSONResponse(status_code=err.status_code, content={"detail": err.detail}, headers=err.headers)

    @app.exception_handler(ServiceError)
    def _service_error(request: Request, err: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(request, err.status, ErrorResponse(error=err.error, detail=err.detail, **err.extra), headers)

    @app.exception_handler(RetrievalClientError)
    def _retrieval_down(request: Request, err: RetrievalClientError) -> JSONResponse:
        return _error(request, 503, ErrorResponse(error="retrieval_unavailable", detail=f"retrieval service: {err}"))

    return app


app = create_app()
