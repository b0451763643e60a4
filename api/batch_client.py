"""Batch predictions against a running predict API (``POST /predict``), resumable, into one AnnData.

Input: a CSV/TSV table with a cell type and a perturbation per row (optionally ``n_cells``), or a plain list
of perturbations, one per line, all for one ``cell_type``. Each row becomes one request; requests run
concurrently (at most ``concurrency`` in flight, over one :class:`httpx.AsyncClient`), and a 5xx, a 429 or a
connection error is retried with exponential backoff; other 4xx answers are final for their row.

Output directory::

    parts/row-000000.npz ...   one file per finished row, written atomically as the row completes
    parts/control-*.npz        the control cells of each (cell type, n_cells, seed), written once
    parts/genes.json           the model's gene order, checked against every later response
    predictions.h5ad           predicted cells of every finished row + control cells per cell type
    summary.csv                one line per input row: status, top genes, request id, error
    failed.csv                 the rows that failed in the last run, with the error (absent when none)

A rerun with the same input and output directory (after a crash, a ``kill -9`` or a server restart) sends
only the rows without a part, so the final ``predictions.h5ad`` holds every row exactly once.

Why one request per row, not one per cell type: a row's result is then a function of that row alone (control
cells are drawn with the request's seed, and which other perturbations share a request cannot matter), so a
resumed run reproduces an uninterrupted one; retries and failures are per row (one unknown gene fails one row,
not its group); and the server's micro-batcher (``api.batching``) already merges concurrent requests into
one model call, so grouping on the client would buy little.

Exceptions::

    BatchError               anything this module raises on purpose
    ├── InputError           the input file cannot be used (missing column, empty, bad n_cells); names the line
    ├── ResumeError          the output directory holds results of another input or another model
    └── RequestFailed        a row's request failed for good (carried into failed.csv, not raised by run_batch)
        ├── ClientError      a 4xx answer other than 429: not retried; ``status`` and the server's ``detail``
        ├── ServerError      a 5xx or 429 answer, or an unusable 200 body, after the last retry
        └── TransportError   no answer (connection refused or reset, timeout) after the last retry
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from retrieval_service.atomic import atomic_path, atomic_write_text, remove_stale_temporaries

__all__ = [
    "DEFAULT_TIMEOUT",
    "BatchClient",
    "BatchError",
    "BatchResult",
    "ClientError",
    "InputError",
    "RequestFailed",
    "ResumeError",
    "Row",
    "ServerError",
    "TransportError",
    "arun_batch",
    "read_rows",
    "run_batch",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
"""A prediction of many cells can take a while; a connection that does not open in 10 s is retried."""

PARTS = "parts"
_RETRY_STATUS = frozenset({429})  # plus every 5xx


# --- errors ------------------------------------------------------------------------------------------------


class BatchError(Exception):
    """Base of the errors this module raises."""


class InputError(BatchError, ValueError):
    """The input file cannot be used."""


class ResumeError(BatchError, ValueError):
    """The output directory holds results that do not belong to this input or this model."""


class RequestFailed(BatchError):
    """A row's request failed for good; ``status`` is the last HTTP status (None: no answer)."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status, self.attempts = status, attempts


class ClientError(RequestFailed):
    """A 4xx answer (other than 429): the request itself is wrong, so it is not retried."""


class ServerError(RequestFailed):
    """A 5xx or 429 answer, or a 200 whose body is unusable, after the last retry."""


class TransportError(RequestFailed):
    """No answer: the connection failed, was reset or timed out, after the last retry."""


# --- input -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One prediction to make: ``row`` is its 0-based position among the input's data rows."""

    row: int
    cell_type: str
    perturbation: str
    n_cells: int


def read_rows(
    path: str | os.PathLike[str],
    *,
    cell_type: str | None = None,
    n_cells: int = 64,
    cell_type_col: str = "cell_type",
    perturbation_col: str = "perturbation",
    n_cells_col: str = "n_cells",
) -> list[Row]:
    """The rows of a CSV/TSV table or of a plain list of perturbations.

    A file whose first non-blank line holds a comma or a tab is a table with a header row (the delimiter is
    that of the first line); anything else is a list of perturbations, one per line (blank lines and lines
    starting with ``#`` skipped), all in ``cell_type``. A table needs ``perturbation_col``, and ``cell_type_col``
    unless ``cell_type`` is given (then it fills the rows that have no cell type column); ``n_cells_col`` is
    optional, ``n_cells`` is the default.

    Raises
    ------
    InputError
        An empty file, a missing column (the columns found are named), or a blank or invalid value (the line
        is named).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        msg = f"cannot read {path}: {err}"
        raise InputError(msg) from err
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        msg = f"{path} is empty: expected a CSV/TSV table with a header, or one perturbation per line"
        raise InputError(msg)
    if n_cells < 1:
        msg = f"n_cells must be at least 1, got {n_cells}"
        raise InputError(msg)
    if "\t" in first or "," in first:
        return _read_table(path, lines, "\t" if "\t" in first else ",", cell_type, n_cells,
                           cell_type_col, perturbation_col, n_cells_col)  # fmt: skip
    if cell_type is None:
        msg = f"{path} is a list of perturbations (no comma or tab in its first line): give the cell type"
        raise InputError(msg)
    rows = []
    for line in lines:
        label = line.strip()
        if label and not label.startswith("#"):
            rows.append(Row(len(rows), cell_type, label, n_cells))
    return rows


def _read_table(
    path: Path,
    lines: list[str],
    delimiter: str,
    cell_type: str | None,
    n_cells: int,
    cell_type_col: str,
    perturbation_col: str,
    n_cells_col: str,
) -> list[Row]:
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    kind = "TSV" if delimiter == "\t" else "CSV"
    needed = [perturbation_col] + ([] if cell_type is not None else [cell_type_col])
    missing = [c for c in needed if c not in columns]
    if missing:
        hint = "" if cell_type_col in columns or cell_type is not None else " (or give one cell type for all rows)"
        msg = f"{path}: {kind} header has no column {', '.join(map(repr, missing))}{hint}; columns: {columns}"
        raise InputError(msg)
    rows = []
    for record in reader:
        where = f"{path}, line {reader.line_num}"
        if None in record:
            msg = f"{where}: more fields than the {len(columns)} columns of the header"
            raise InputError(msg)
        values = {k: (v or "").strip() for k, v in record.items()}
        if not any(values.values()):
            continue  # a blank line
        ct = (values.get(cell_type_col) or cell_type) if cell_type_col in columns else cell_type
        pert = values[perturbation_col]
        if not ct or not pert:
            msg = f"{where}: empty {cell_type_col if not ct else perturbation_col!r} value"
            raise InputError(msg)
        n = n_cells
        if values.get(n_cells_col):
            try:
                n = int(values[n_cells_col])
            except ValueError:
                n = 0
            if n < 1:
                msg = f"{where}: {n_cells_col} must be a positive integer, got {values[n_cells_col]!r}"
                raise InputError(msg)
        rows.append(Row(len(rows), ct, pert, n))
    if not rows:
        msg = f"{path}: the {kind} has a header but no rows"
        raise InputError(msg)
    return rows


# --- the client --------------------------------------------------------------------------------------------


class BatchClient:
    """An async client of ``POST /predict`` that retries what is worth retrying.

    Use it as an async context manager (one connection pool). ``transport`` replaces the network, e.g. an
    :class:`httpx.MockTransport` in tests.

    Parameters
    ----------
    url
        Base URL of the predict API, e.g. ``http://127.0.0.1:8000``.
    api_key
        Sent as ``Authorization: Bearer <api_key>``.
    retries
        Retries after the first attempt, on a 5xx or 429 answer or a connection error or timeout.
    backoff
        Seconds before the first retry; doubled after each, capped at ``max_backoff``, with up to 10% jitter.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if retries < 0 or backoff < 0:
            msg = f"retries and backoff must be >= 0, got {retries} and {backoff}"
            raise ValueError(msg)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url, self.retries, self.backoff, self.max_backoff = url, retries, backoff, max_backoff
        self._client = httpx.AsyncClient(base_url=url, timeout=timeout, headers=headers, transport=transport)

    async def __aenter__(self) -> BatchClient:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(*exc)

    async def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /predict`` with retries; the JSON body of the 200 answer.

        Raises
        ------
        ClientError
            A 4xx answer other than 429 (at once, no retry).
        ServerError, TransportError
            After ``retries`` retries.
        """
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._client.post("/predict", json=payload)
            except httpx.TransportError as err:  # connect, read, write, pool, timeouts, protocol errors
                if last:
                    msg = f"no answer from {self.url} after {attempt + 1} attempt(s): {type(err).__name__}: {err}"
                    raise TransportError(msg, attempts=attempt + 1) from err
            else:
                status = response.status_code
                if status == 200:
                    return _json_body(response, attempt + 1)
                detail = _detail(response)
                if 400 <= status < 500 and status not in _RETRY_STATUS:
                    msg = f"HTTP {status}: {detail}"
                    raise ClientError(msg, status=status, attempts=attempt + 1)
                if last:
                    msg = f"HTTP {status} after {attempt + 1} attempt(s): {detail}"
                    raise ServerError(msg, status=status, attempts=attempt + 1)
            delay = min(self.max_backoff, self.backoff * 2**attempt)
            await asyncio.sleep(delay * (1 + 0.1 * random.random()))  # jitter: clients retry apart
        msg = "unreachable"
        raise AssertionError(msg)  # pragma: no cover


def _json_body(response: httpx.Response, attempts: int) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as err:
        msg = f"HTTP 200 with a body that is not JSON: {response.text[:200]!r}"
        raise ServerError(msg, status=200, attempts=attempts) from err
    if not isinstance(body, dict):
        msg = f"HTTP 200 with a JSON {type(body).__name__} instead of an object"
        raise ServerError(msg, status=200, attempts=attempts)
    return body


def _detail(response: httpx.Response) -> str:
    """The server's error detail (``detail`` of the JSON body), else the start of the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]


# --- parts: the durable per-row results --------------------------------------------------------------------


def _part_path(parts: Path, row: int) -> Path:
    return parts / f"row-{row:06d}.npz"


def _control_path(parts: Path, cell_type: str, n_cells: int, seed: int) -> Path:
    key = hashlib.sha256(json.dumps([cell_type, n_cells, seed]).encode()).hexdigest()[:16]
    return parts / f"control-{key}.npz"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` atomically and durably (fsync before the rename)."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _load_meta(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


@dataclasses.dataclass
class _Parts:
    """The ``parts/`` directory: what is done, and the gene order every result shares."""

    dir: Path
    genes: list[str] | None = None

    @classmethod
    def open(cls, out_dir: Path) -> _Parts:
        parts = out_dir / PARTS
        parts.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(parts)  # what a killed run was writing
        if removed:
            logger.info("removed %d half-written part(s) of an interrupted run", len(removed))
        genes_file = parts / "genes.json"
        genes = json.loads(genes_file.read_text(encoding="utf-8"))["genes"] if genes_file.exists() else None
        return cls(parts, genes)

    def done(self, payloads: dict[int, dict[str, Any]]) -> set[int]:
        """Rows with a part; raises ResumeError when a part was made from another request."""
        done = set()
        for path in sorted(self.dir.glob("row-*.npz")):
            row = int(path.stem.removeprefix("row-"))
            meta = _load_meta(path)
            if payloads.get(row) != meta["request"]:
                msg = (
                    f"{path} holds the result of another request ({meta['request']}) than input row {row} "
                    f"({payloads.get(row)}): use a new output directory for another input"
                )
                raise ResumeError(msg)
            done.add(row)
        return done

    def check_genes(self, genes: list[str], model_variant: str) -> None:
        if self.genes is None:
            atomic_write_text(self.dir / "genes.json", json.dumps({"genes": genes, "model_variant": model_variant}))
            self.genes = list(genes)
        elif genes != self.genes:
            msg = (
                f"the server's model predicts {len(genes)} genes, the results already in {self.dir} have "
                f"{len(self.genes)} in another order or set: was the server's model changed? Use a new output "
                "directory for another model."
            )
            raise ResumeError(msg)

    def save(self, row: Row, payload: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """Validate one response and persist it as the row's part (and its control cells); returns the meta."""
        genes = body["genes"]
        (pred,) = body["predictions"]
        if pred["perturbation"] != row.perturbation:
            msg = f"asked for {row.perturbation!r}, got a prediction for {pred['perturbation']!r}"
            raise ServerError(msg, status=200)
        cells = np.array(pred["cells"], dtype=np.float32)
        control = np.array(body["control_cells"], dtype=np.float32)
        shape = (row.n_cells, len(genes))
        if cells.shape != shape or control.shape != shape:
            msg = f"expected cells and control_cells of shape {shape}, got {cells.shape} and {control.shape}"
            raise ServerError(msg, status=200)
        self.check_genes(genes, body["model_variant"])
        ctrl_path = _control_path(self.dir, row.cell_type, row.n_cells, payload["seed"])
        if not ctrl_path.exists():
            _save_npz(ctrl_path, cells=control)
        meta = {
            "row": row.row,
            "request": payload,
            "request_id": body["request_id"],
            "model_variant": body["model_variant"],
            "top_up": pred["top_up"],
            "top_down": pred["top_down"],
            "candidates": pred["candidates"],
            "warnings": [*body.get("warnings", []), *pred.get("warnings", [])],
        }
        _save_npz(
            _part_path(self.dir, row.row),
            cells=cells,
            delta=np.array(pred["delta"], dtype=np.float32),
            profile=np.array(pred["profile"], dtype=np.float32),
            meta=np.array(json.dumps(meta)),
        )
        return meta


# --- the run -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BatchResult:
    """What a run did. ``n_done`` counts every finished row, ``n_skipped`` those finished by earlier runs."""

    n_rows: int
    n_done: int
    n_skipped: int
    n_failed: int
    h5ad: Path | None
    summary: Path
    failed: Path | None


def _payload(row: Row, *, seed: int, top_n: int, batch: str | None) -> dict[str, Any]:
    payload = {"cell_type": row.cell_type, "perturbations": [row.perturbation], "n_cells": row.n_cells,
               "seed": seed, "return_cells": True, "top_n": top_n}  # fmt: skip
    if batch is not None:
        payload["batch"] = batch
    return payload


def run_batch(rows: Sequence[Row], out_dir: str | os.PathLike[str], **kwargs: Any) -> BatchResult:
    """:func:`arun_batch` in a new event loop (from a script or the CLI; in a notebook, await arun_batch)."""
    return asyncio.run(arun_batch(rows, out_dir, **kwargs))


async def arun_batch(
    rows: Sequence[Row],
    out_dir: str | os.PathLike[str],
    *,
    url: str,
    api_key: str | None = None,
    concurrency: int = 8,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    seed: int = 0,
    top_n: int = 20,
    batch: str | None = None,
    pert_col: str | None = None,
    cell_type_col: str | None = None,
    control_label: str | None = None,
    progress: bool = True,
    on_row_done: Callable[[Row], Awaitable[None] | None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BatchResult:
    """Predict every row not yet done in ``out_dir``, then write ``predictions.h5ad``, ``summary.csv`` and
    ``failed.csv`` from all the parts (see the module docstring).

    ``pert_col``, ``cell_type_col`` and ``control_label`` name the AnnData's obs columns and control label
    (defaults: the project's, ``gene`` / ``cell_line`` / ``non-targeting``). ``on_row_done(row)`` is called
    after each row's part is on disk (tests use it to interrupt a run at a known point).

    Raises
    ------
    ResumeError
        ``out_dir`` holds parts made from other requests (another input) or with another gene order.
    """
    if concurrency < 1:
        msg = f"concurrency must be at least 1, got {concurrency}"
        raise ValueError(msg)
    rows = list(rows)
    if [r.row for r in rows] != list(range(len(rows))):
        msg = "rows must be numbered 0..n-1 in order (as read_rows numbers them)"
        raise ValueError(msg)
    out = Path(out_dir)
    parts = _Parts.open(out)
    payloads = {r.row: _payload(r, seed=seed, top_n=top_n, batch=batch) for r in rows}
    done = parts.done(payloads)
    skipped = len(done)
    todo = [r for r in rows if r.row not in done]
    logger.info("%d rows: %d done by an earlier run, %d to predict", len(rows), skipped, len(todo))
    failures: dict[int, RequestFailed] = {}
    if todo:
        client = BatchClient(url, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff,
                             transport=transport)  # fmt: skip
        await _predict_rows(client, todo, payloads, parts, concurrency, failures, done, len(rows), skipped,
                            progress=progress, on_row_done=on_row_done)  # fmt: skip
    return _write_outputs(out, rows, parts, failures, pert_col=pert_col, cell_type_col=cell_type_col,
                          control_label=control_label, n_skipped=skipped, url=url)  # fmt: skip


async def _predict_rows(
    client: BatchClient,
    todo: list[Row],
    payloads: dict[int, dict[str, Any]],
    parts: _Parts,
    concurrency: int,
    failures: dict[int, RequestFailed],
    done: set[int],
    total: int,
    initial: int,
    *,
    progress: bool,
    on_row_done: Callable[[Row], Awaitable[None] | None] | None,
) -> None:
    from tqdm.auto import tqdm

    queue: asyncio.Queue[Row] = asyncio.Queue()
    for r in todo:
        queue.put_nowait(r)
    bar = tqdm(total=total, initial=initial, unit="row", desc="predict", disable=not progress)

    async def worker() -> None:
        while True:
            try:
                row = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                body = await client.predict(payloads[row.row])
                try:
                    # parsing and writing ~1 MB: off the event loop, so other requests keep flowing
                    await asyncio.to_thread(parts.save, row, payloads[row.row], body)
                except (KeyError, TypeError, ValueError) as err:
                    if isinstance(err, ResumeError):
                        raise
                    msg = f"HTTP 200 with an unusable body: {type(err).__name__}: {err}"
                    raise ServerError(msg, status=200) from err
            except RequestFailed as err:
                failures[row.row] = err
                logger.debug("row %d failed: %s", row.row, err)
                bar.set_postfix(failed=len(failures))
            else:
                done.add(row.row)
                if on_row_done is not None:
                    result = on_row_done(row)
                    if asyncio.iscoroutine(result):
                        await result
            bar.update(1)

    try:
        async with client:
            workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        bar.close()


# --- outputs -----------------------------------------------------------------------------------------------


def _top(genes: list[dict[str, Any]], n: int = 5) -> str:
    return ";".join(f"{g['gene']}:{g['delta']:+.3f}" for g in genes[:n])


def _write_outputs(
    out: Path,
    rows: list[Row],
    parts: _Parts,
    failures: dict[int, RequestFailed],
    *,
    pert_col: str | None,
    cell_type_col: str | None,
    control_label: str | None,
    n_skipped: int,
    url: str,
) -> BatchResult:
    from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL

    pert_col, cell_type_col = pert_col or DEFAULT_PERT_COL, cell_type_col or DEFAULT_CELL_TYPE_COL
    control_label = control_label or DEFAULT_CONTROL_LABEL
    metas = {r.row: _load_meta(_part_path(parts.dir, r.row)) for r in rows if _part_path(parts.dir, r.row).exists()}
    fields = ["row", "cell_type", "perturbation", "n_cells", "status", "top_up", "top_down", "request_id", "error"]
    summary_rows = []
    for r in rows:
        base = {"row": r.row, "cell_type": r.cell_type, "perturbation": r.perturbation, "n_cells": r.n_cells}
        if r.row in metas:
            m = metas[r.row]
            summary_rows.append({**base, "status": "ok", "top_up": _top(m["top_up"]), "top_down": _top(m["top_down"]),
                                 "request_id": m["request_id"], "error": ""})  # fmt: skip
        else:
            err = failures.get(r.row)
            summary_rows.append({**base, "status": "failed" if err else "pending", "top_up": "", "top_down": "",
                                 "request_id": "", "error": str(err) if err else ""})  # fmt: skip
    summary = out / "summary.csv"
    _write_csv(summary, fields, summary_rows)
    failed_path = out / "failed.csv"
    failed_rows = [
        {**{k: s[k] for k in ("row", "cell_type", "perturbation", "n_cells")},
         "status_code": failures[s["row"]].status or "", "attempts": failures[s["row"]].attempts, "error": s["error"]}
        for s in summary_rows if s["status"] == "failed"
    ]  # fmt: skip
    if failed_rows:
        _write_csv(failed_path, ["row", "cell_type", "perturbation", "n_cells", "status_code", "attempts", "error"],
                   failed_rows)  # fmt: skip
    else:
        failed_path.unlink(missing_ok=True)
    h5ad = None
    if metas:
        h5ad = out / "predictions.h5ad"
        adata = _assemble(rows, metas, parts, pert_col=pert_col, cell_type_col=cell_type_col,
                          control_label=control_label, url=url)  # fmt: skip
        with atomic_path(h5ad) as tmp:
            adata.write_h5ad(tmp)
    return BatchResult(
        n_rows=len(rows),
        n_done=len(metas),
        n_skipped=n_skipped,
        n_failed=len(failed_rows),
        h5ad=h5ad,
        summary=summary,
        failed=failed_path if failed_rows else None,
    )


def _write_csv(path: Path, fields: list[str], records: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def _assemble(
    rows: list[Row],
    metas: dict[int, dict[str, Any]],
    parts: _Parts,
    *,
    pert_col: str,
    cell_type_col: str,
    control_label: str,
    url: str,
):
    """Predicted cells of the finished rows (input order), then each cell type's control cells."""
    import anndata as ad
    import pandas as pd

    blocks, obs = [], []
    first_row: dict[str, Row] = {}
    for r in rows:
        if r.row not in metas:
            continue
        first_row.setdefault(r.cell_type, r)
        with np.load(_part_path(parts.dir, r.row), allow_pickle=False) as z:
            blocks.append(z["cells"])
        rid = metas[r.row]["request_id"]
        obs += [(f"row{r.row}_{i}", r.perturbation, r.cell_type, r.row, False, rid) for i in range(r.n_cells)]
    # Controls: those of each cell type's first finished row. The server draws them from (cell type, n_cells,
    # seed) alone, so every request with that key got the same ones: the file keeps the first that arrived.
    for ct, r in first_row.items():
        with np.load(_control_path(parts.dir, ct, r.n_cells, metas[r.row]["request"]["seed"])) as z:
            blocks.append(z["cells"])
        rid = metas[r.row]["request_id"]
        obs += [(f"control_{ct}_{i}", control_label, ct, -1, True, rid) for i in range(r.n_cells)]
    frame = pd.DataFrame(obs, columns=["obs_name", pert_col, cell_type_col, "row", "is_control", "request_id"])
    frame = frame.set_index("obs_name")
    frame.index.name = None
    for col in (pert_col, cell_type_col, "request_id"):
        frame[col] = frame[col].astype("category")  # as write_h5ad would store them, said once here
    adata = ad.AnnData(X=np.concatenate(blocks), obs=frame, var=pd.DataFrame(index=list(parts.genes or [])))
    variants = sorted({m["model_variant"] for m in metas.values()})
    adata.uns["ptrag_batch"] = {
        "url": url,
        "model_variant": ",".join(variants),
        "pert_col": pert_col,
        "cell_type_col": cell_type_col,
        "control_label": control_label,
        "n_rows": len(rows),
        "n_done": len(metas),
    }
    return adata
