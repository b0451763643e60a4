"""The retrieval service over HTTP: ``uvicorn retrieval_service.app:app``.

Configuration comes from the environment (``PTRAG_INDEX_DIR``, ``PTRAG_MAX_BATCH``, ``PTRAG_MAX_K``...; see
:class:`Settings`). The store is opened in ``lifespan``, by default in a worker thread so that ``/healthz``
answers at once and ``/readyz`` says 503 until the store is loaded (or says why it failed). Endpoints that
touch the store are plain ``def``: FAISS and numpy block, so FastAPI runs them in its threadpool. ``/search`` is
the exception, measured: it is ``async`` and runs a search estimated under ~0.3 ms (a few thousand keys, exact)
on the event loop, because the threadpool round trip cost more than that; anything larger, any GPU search and
any query with an unknown gene (a fuzzy match over the gene table) still goes to the threadpool.

The request path is kept lean for a one-query round trip of a few milliseconds: JSON bodies are parsed by
pydantic-core (5x faster than ``json.loads`` on 1536 floats), query vectors may come as base64 float32 (what
the client sends), the response is serialised once, and the thread settings are applied once per thread.

Endpoints: ``GET /healthz``, ``GET /readyz``, ``GET /info`` (the manifest), ``GET /attrs``,
``POST /search``, ``POST /profiles``, ``POST /entries``, ``POST /ids``, ``GET /extras/{name}``.
Errors on user input are 4xx with an :class:`~retrieval_service.schemas.ErrorResponse` body: an unknown gene
is 422 naming it with close matches; a batch above ``PTRAG_MAX_BATCH`` is 413.

Tests swap the store through ``app.dependency_overrides[get_loaded_store]``, the settings through
``create_app(settings)`` (or ``dependency_overrides[get_settings]``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic_core
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool

from retrieval_service.index import InvalidQueryError, UnknownGeneError
from retrieval_service.manifest import package_version
from retrieval_service.schemas import (
    ArrayPayload,
    EntriesRequest,
    EntriesResponse,
    ErrorResponse,
    ExtraResponse,
    Health,
    IdsRequest,
    IdsResponse,
    ProfilesRequest,
    ProfilesResponse,
    Readiness,
    SearchRequest,
    SearchResponse,
)
from retrieval_service.store import Store

__all__ = ["Settings", "app", "create_app", "get_loaded_store", "get_settings", "get_store"]

logger = logging.getLogger(__name__)


class Settings(BaseSettings):
    """Service settings, read from ``PTRAG_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PTRAG_", extra="ignore")

    index_dir: Path | None = Field(None, description="Index directory to serve (PTRAG_INDEX_DIR).")
    max_batch: int = Field(1024, ge=1, description="Most queries per /search request; more is a 413.")
    max_k: int = Field(1024, ge=1, description="Largest k per request.")
    max_profile_rows: int = Field(65_536, ge=1, description="Most profile rows (queries x k) per request.")
    verify_checksums: bool = Field(default=True, description="sha256 every file at load (sizes are always checked).")
    backend: Literal["auto", "numpy", "faiss"] = "auto"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    nprobe: int | None = Field(None, ge=1, description="Override the store's ivf nprobe.")
    ef_search: int | None = Field(None, ge=1, description="Override the store's hnsw efSearch.")
    prefilter: bool | None = Field(
        None,
        description="Exact 8-bit prefilter of one-query flat searches: unset builds it from 8,192 keys up (~1.5-2x "
        "faster searches; N x d bytes more memory and a few seconds more to load at 200k keys); false never.",
    )
    load_in_background: bool = Field(default=True, description="Serve /healthz while the store loads; else fail fast.")
    search_threads: int | None = Field(
        None,
        ge=1,
        description="BLAS and OpenMP threads per search in this process; null keeps the libraries' defaults. "
        "Idle BLAS threads spin after each call; on a small machine shared with other jobs, 1 (one thread "
        "per request, concurrency across requests) gave a lower p50, on an idle one the default did.",
    )


@lru_cache
def load_settings() -> Settings:
    """The environment's settings, read once."""
    return Settings()


async def get_settings(request: Request) -> Settings:
    """The app's settings: fixed by ``create_app(settings)``, else the environment's.

    async: no threadpool round trip per request. Tests may still override it; ``create_app(settings)`` does not,
    because FastAPI re-inspects an overridden dependency's signature on every request (~0.1 ms).
    """
    return getattr(request.app.state, "settings", None) or load_settings()


def open_from_settings(settings: Settings) -> Store:
    """The default loader: :meth:`Store.open` with the settings' options."""
    return Store.open(
        settings.index_dir,
        verify=settings.verify_checksums,
        backend=settings.backend,
        device=settings.device,
        nprobe=settings.nprobe,
        ef_search=settings.ef_search,
        prefilter=settings.prefilter,
    )


class ServiceError(Exception):
    """An error answered with ``status`` and an :class:`ErrorResponse` body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


# --- dependencies ------------------------------------------------------------------------------------------


async def get_loaded_store(request: Request) -> Store | None:
    """The store once loaded, else None. Override this one in tests to serve an in-memory store."""
    # async (here and in get_store): trivial and non-blocking, so FastAPI runs them on the event loop instead
    # of a threadpool round trip per request.
    return getattr(request.app.state, "store", None)


async def get_store(store: Annotated[Store | None, Depends(get_loaded_store)], request: Request) -> Store:
    if store is None:
        reason = getattr(request.app.state, "load_error", None) or "the index is still loading"
        raise ServiceError(503, "not_ready", f"index not loaded: {reason}")
    return store


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


# --- lifespan ----------------------------------------------------------------------------------------------


async def _settings_for(app: FastAPI) -> Settings:
    override = app.dependency_overrides.get(get_settings)
    if override is None:
        return getattr(app.state, "settings", None) or load_settings()
    settings = override()
    return await settings if inspect.isawaitable(settings) else settings


def _load(app: FastAPI, settings: Settings) -> None:
    loader: Callable[[Settings], Store] = app.state.loader
    try:
        app.state.store = loader(settings)
    except Exception as err:  # reported by /readyz; the process keeps answering /healthz
        app.state.load_error = f"{type(err).__name__}: {err}"
        logger.exception("could not open the index %s", settings.index_dir)
        if not settings.load_in_background:
            raise


def _limit_blas_threads(n: int | None) -> Callable[[], None]:
    """Cap BLAS threads process-wide (via threadpoolctl, when installed); returns the undo."""
    if n is None:
        return lambda: None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # then BLAS keeps its own thread count (OPENBLAS_NUM_THREADS etc.)
        logger.warning("threadpoolctl is not installed: BLAS threads not limited to %d", n)
        return lambda: None
    return threadpool_limits(limits=n, user_api="blas").restore_original_limits


_thread_state = threading.local()


def _limit_omp_threads(n: int | None) -> None:
    """Set OpenMP's thread count in the calling thread, once per thread (it is a per-thread setting)."""
    if n is not None and getattr(_thread_state, "omp_threads", None) != n:
        import faiss

        faiss.omp_set_num_threads(n)
        if "torch" in sys.modules:  # the int8 prefilter's matmul runs on torch's threads
            sys.modules["torch"].set_num_threads(n)
        _thread_state.omp_threads = n


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = await _settings_for(app)
    app.state.store = None
    app.state.load_error = None
    undo_threads = _limit_blas_threads(settings.search_threads)
    task = None
    if settings.index_dir is None:
        app.state.load_error = "no index configured: set PTRAG_INDEX_DIR"
        logger.warning("retrieval service started without an index (PTRAG_INDEX_DIR is unset)")
    elif settings.load_in_background:
        task = asyncio.create_task(asyncio.to_thread(_load, app, settings))
    else:
        await asyncio.to_thread(_load, app, settings)
    try:
        yield
    finally:
        if task is not None and not task.done():
            task.cancel()  # the loading thread finishes on its own; its result is dropped
        app.state.store = None
        undo_threads()


# --- endpoints ---------------------------------------------------------------------------------------------


class _FastJSONRequest(Request):
    """A request whose JSON body pydantic-core parses: 5x faster than ``json.loads`` on 1536 floats (0.1 ms)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=True)
            except ValueError:  # json.loads either accepts it anyway, or raises the error FastAPI reports
                self._json = json.loads(body)
        return self._json


class _FastJSONRoute(APIRoute):
    """FastAPI's route, with request bodies parsed by :class:`_FastJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def fast_json_handler(request: Request) -> Response:
            return await handler(_FastJSONRequest(request.scope, request.receive))

        return fast_json_handler


router = APIRouter(route_class=_FastJSONRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Too many queries or profile rows."},
    422: {"model": ErrorResponse, "description": "Unknown gene (named, with close matches) or invalid query."},
    503: {"model": ErrorResponse, "description": "The index is not loaded (yet)."},
}


@router.get("/healthz", tags=["health"])
async def healthz() -> Health:
    """The process is up (always 200)."""
    return Health(status="ok")


@router.get("/readyz", tags=["health"], response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request, store: Annotated[Store | None, Depends(get_loaded_store)]) -> Any:
    """200 once the store is loaded; 503 with the reason before (or when loading failed)."""
    if store is not None:
        return Readiness(status="ready", n_entries=len(store))
    error = getattr(request.app.state, "load_error", None)
    status = "loading" if error is None else ("unconfigured" if "PTRAG_INDEX_DIR" in error else "failed")
    body = Readiness(status=status, detail=error or "the index is loading")
    return JSONResponse(status_code=503, content=body.model_dump())


@router.get("/info", tags=["store"], responses=_ERRORS)
def info(store: StoreDep) -> dict[str, Any]:
    """The store's manifest."""
    return store.info()


@router.get("/attrs", tags=["store"], responses=_ERRORS)
def attrs(store: StoreDep) -> dict[str, Any]:
    """The store's free JSON attributes (e.g. ``feature_names``)."""
    return store.attrs


@router.post("/search", tags=["search"], response_model=SearchResponse, responses=_ERRORS)
async def search(body: SearchRequest, store: StoreDep, settings: SettingsDep) -> Response:
    """Top-k entries per query (labels or vectors), with filters and optional profiles."""
    n = body.n_queries
    if n > settings.max_batch:
        raise ServiceError(413, "too_large", f"{n} queries; at most {settings.max_batch} per request")
    if body.k > settings.max_k:
        raise ServiceError(422, "invalid_query", f"k={body.k} is above this service's limit of {settings.max_k}")
    if body.return_profiles and n * body.k > settings.max_profile_rows:
        detail = f"{n} queries x k={body.k} profile rows; at most {settings.max_profile_rows} per request"
        raise ServiceError(413, "too_large", detail)
    if _runs_inline(body, store, settings):
        return _search(body, store, settings)
    return await run_in_threadpool(_search, body, store, settings)


INLINE_MAX_WORK = 4_000_000
"""Searches of at most this :meth:`~retrieval_service.index.RetrievalIndex.search_work` (one exact query over
2.6k keys of 1536-d, about 0.3 ms) run on the event loop, as the threadpool round trip costs about as much."""

INLINE_ALL_CORES_MAX_WORK = 16_000_000
"""The same limit, about 2.5 ms (one query through the 8-bit prefilter at 20k keys), when searches use every core
(``search_threads`` unset or at least the core count): such a search gains nothing from running beside another, and
the threadpool hop plus waking the OpenMP threads cost 0.2-0.5 ms per request (measured at 20k keys: /search p50
4.6-5.0 ms inline vs 5.1 ms through the threadpool, same server, alternating). With fewer threads per search,
searches overlap in the threadpool instead."""


def _runs_inline(body: SearchRequest, store: Store, settings: Settings) -> bool:
    index = getattr(store, "index", None)  # a stand-in store without one searches in the threadpool
    if index is None:
        return False
    threads = settings.search_threads
    all_cores = threads is None or threads >= (os.cpu_count() or 1)
    if index.search_work(body.n_queries) > (INLINE_ALL_CORES_MAX_WORK if all_cores else INLINE_MAX_WORK):
        return False
    # An unknown gene costs a fuzzy match over the whole gene table (milliseconds): not on the event loop.
    return body.genes is None or index.knows_labels(body.genes)


def _search(body: SearchRequest, store: Store, settings: Settings) -> Response:
    _limit_omp_threads(settings.search_threads)
    start = time.perf_counter()
    result = store.query(
        k=body.k,
        genes=body.genes,
        vectors=body.query_vectors(),
        exclude=body.exclude_ids,
        cell_types=body.cell_types,
        exclude_cell_types=body.exclude_cell_types,
        exclude_self_cell_type=body.exclude_self_cell_type,
        return_profiles=body.return_profiles,
    )
    response = SearchResponse.from_arrays(
        k=body.k,
        queries=body.genes,
        scores=result.scores,
        ids=result.ids,
        cell_types=result.cell_types,
        labels=result.labels,
        profiles=result.profiles,
    )
    searched = time.perf_counter()
    # Built from validated parts already: serialise once instead of letting FastAPI validate it again.
    content = response.model_dump_json()
    # Server-Timing (W3C): how much of a round trip the search itself was, for clients and the benchmark.
    timing = f"search;dur={(searched - start) * 1e3:.3f}, encode;dur={(time.perf_counter() - searched) * 1e3:.3f}"
    return Response(content=content, media_type="application/json", headers={"Server-Timing": timing})


@router.post("/profiles", tags=["store"], responses=_ERRORS)
def profiles(body: ProfilesRequest, store: StoreDep, settings: SettingsDep) -> ProfilesResponse:
    """Per-entry arrays for ids (shape of ``ids`` + entry shape; ``-1`` rows are NaN or 0)."""
    ids = np.asarray(body.ids, dtype=np.int64)
    if ids.size > settings.max_profile_rows:
        raise ServiceError(413, "too_large", f"{ids.size} ids; at most {settings.max_profile_rows} per request")
    arrays = store.get(ids, body.names)
    return ProfilesResponse(arrays={k: ArrayPayload.from_array(v) for k, v in arrays.items()})


@router.post("/entries", tags=["store"], responses=_ERRORS)
def entries(body: EntriesRequest, store: StoreDep) -> EntriesResponse:
    """Cell types and labels of ids (null at ``-1``)."""
    cts, labs = store.entries(np.asarray(body.ids, dtype=np.int64))
    return EntriesResponse(cell_types=cts.tolist(), labels=labs.tolist())


@router.post("/ids", tags=["store"], responses=_ERRORS)
def ids(body: IdsRequest, store: StoreDep) -> IdsResponse:
    """Ids of (cell type, label) pairs, -1 where absent."""
    return IdsResponse(ids=store.ids_for(body.pairs).tolist())


@router.get("/extras/{name}", tags=["store"], responses=_ERRORS)
def extra(name: str, store: StoreDep) -> ExtraResponse:
    """A per-store array and its metadata."""
    return ExtraResponse(name=name, meta=store.extra_meta(name), array=ArrayPayload.from_array(store.extra(name)))


# --- the app -----------------------------------------------------------------------------------------------


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _error(status: int, body: ErrorResponse) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True))


def create_app(settings: Settings | None = None, *, loader: Callable[[Settings], Store] | None = None) -> FastAPI:
    """Build the service.

    Parameters
    ----------
    settings
        Fixed settings; None reads the environment (``PTRAG_*``) when the app starts.
    loader
        ``settings -> Store``; default :func:`open_from_settings`. Tests pass one that waits or fails.
    """
    app = FastAPI(
        title="PT-RAG retrieval service",
        version=package_version(),
        summary="Nearest training perturbations by gene embedding, with cached profiles.",
        lifespan=lifespan,
    )
    app.state.loader = loader or open_from_settings
    app.state.settings = settings
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a NaN in it would make the 422 itself fail as a 500.
        return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(err.errors()))})

    @app.exception_handler(ServiceError)
    def _service_error(_: Request, err: ServiceError) -> JSONResponse:
        return _error(err.status, ErrorResponse(error=err.error, detail=err.detail))

    @app.exception_handler(UnknownGeneError)
    def _unknown_gene(_: Request, err: UnknownGeneError) -> JSONResponse:
        body = ErrorResponse(error="unknown_gene", detail=str(err), unknown=err.genes, suggestions=err.suggestions)
        return _error(422, body)

    @app.exception_handler(InvalidQueryError)
    def _invalid_query(_: Request, err: InvalidQueryError) -> JSONResponse:
        return _error(422, ErrorResponse(error="invalid_query", detail=str(err)))

    return app


app = create_app()
