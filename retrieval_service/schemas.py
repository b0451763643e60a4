"""Request and response models of the retrieval service (``retrieval_service.app``).

Arrays (profiles, extras) travel as :class:`ArrayPayload`: dtype, shape and the base64 of the C-order bytes,
so that they come back bit for bit, NaN included, and far smaller and faster than nested JSON lists. Query
vectors may come either way: a nested list of floats, or an :class:`ArrayPayload` (what the client sends: one
1536-d float32 query is 8 KB of base64 instead of 32 KB of decimal text, which cost ~2 ms to print and parse).
Padding (fewer than ``k`` valid results) is ``id = -1`` with ``score``, ``cell_type`` and ``label`` null:
JSON has no ``-inf``.
"""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, model_validator

__all__ = [
    "ArrayPayload",
    "EntriesRequest",
    "EntriesResponse",
    "ErrorResponse",
    "ExtraResponse",
    "Health",
    "IdsRequest",
    "IdsResponse",
    "ProfilesRequest",
    "ProfilesResponse",
    "QueryArray",
    "QueryResult",
    "Readiness",
    "SearchRequest",
    "SearchResponse",
]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Ids = list[int] | list[list[int]]
MAX_VECTOR_BYTES = 1 << 30  # a base64 query array may not claim more (the batch limit applies after decoding)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArrayPayload(BaseModel):
    """A numpy array: ``dtype`` (numpy's string, e.g. ``"<f4"``), ``shape``, base64 of the C-order bytes."""

    dtype: str
    shape: list[int]
    data: str

    @classmethod
    def from_array(cls, arr: np.ndarray) -> ArrayPayload:
        arr = np.ascontiguousarray(arr)
        return cls(dtype=arr.dtype.str, shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode("ascii"))

    def to_array(self) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        if dtype.kind not in "biufc":
            msg = f"array payload of dtype {self.dtype!r}: only numeric and bool arrays travel"
            raise ValueError(msg)
        buf = base64.b64decode(self.data)
        return np.frombuffer(buf, dtype=dtype).reshape(self.shape).copy()


def _query_array(payload: ArrayPayload) -> np.ndarray:
    """Decode a query array payload: 2-D, at least one row, a float dtype, as many bytes as the shape says."""
    dtype = np.dtype(payload.dtype) if _is_dtype(payload.dtype) else None
    if dtype is None or dtype.kind != "f":
        msg = f"a vectors array must have a float dtype such as '<f4', got {payload.dtype!r}"
        raise ValueError(msg)
    if len(payload.shape) != 2 or min(payload.shape) < 1:
        msg = f"a vectors array must have shape [n, d] with n, d >= 1, got {payload.shape}"
        raise ValueError(msg)
    expected = payload.shape[0] * payload.shape[1] * dtype.itemsize
    if expected > MAX_VECTOR_BYTES:
        msg = f"a vectors array of shape {payload.shape} is {expected} bytes, more than {MAX_VECTOR_BYTES}"
        raise ValueError(msg)
    try:
        buf = base64.b64decode(payload.data, validate=True)
    except ValueError as err:  # binascii.Error
        msg = f"the vectors array's data is not valid base64 ({err})"
        raise ValueError(msg) from None
    if len(buf) != expected:
        msg = (
            f"a vectors array of dtype {payload.dtype!r} and shape {payload.shape} is {expected} bytes, got {len(buf)}"
        )
        raise ValueError(msg)
    return np.frombuffer(buf, dtype=dtype).reshape(payload.shape).astype(np.float32)


def _is_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except (TypeError, ValueError):
        return False
    return True


class QueryArray(ArrayPayload):
    """Query vectors as an :class:`ArrayPayload` of a 2-D float array; decoded to float32 when validated."""

    _array: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _decode(self) -> QueryArray:
        self._array = _query_array(self)
        return self

    def to_array(self) -> np.ndarray:
        """The ``(n, d)`` float32 queries (the array decoded at validation, not a copy)."""
        return self._array


def _vectors_form(value: Any) -> str:
    return "array" if isinstance(value, dict | ArrayPayload) else "list"


class SearchRequest(_Strict):
    """``POST /search``: exactly one of ``genes`` and ``vectors``.

    ``vectors`` is either a nested list ``(n, d)`` of finite numbers, or a :class:`QueryArray` payload of a
    2-D float array (``{"dtype": "<f4", "shape": [n, d], "data": base64}``); both give the same float32 queries
    (a float32 printed as a JSON number and parsed back is exact). Use :meth:`query_vectors` to read them.
    """

    genes: list[str] | None = Field(
        None, min_length=1, description="Perturbation labels as queries: 'TP53', or 'A+B' for a combination."
    )
    vectors: (
        Annotated[
            Annotated[list[list[FiniteFloat]], Field(min_length=1), Tag("list")] | Annotated[QueryArray, Tag("array")],
            Discriminator(_vectors_form),
        ]
        | None
    ) = Field(
        None,
        description="Query vectors (n, d) with d the store's key dimension, not normalised: a nested list of "
        "numbers, or an array payload {dtype, shape, data} of a 2-D float array (base64 of the C-order bytes; "
        "smaller and faster to parse).",
    )
    k: int = Field(10, ge=1, description="Results per query (at most the service's PTRAG_MAX_K).")
    cell_types: list[str] | None = Field(None, description="Return only entries of these cell types.")
    exclude_cell_types: list[str] | None = Field(None, description="Never return entries of these cell types.")
    exclude_ids: Ids | None = Field(
        None, description="Ids never returned: one list for all queries, or one list per query."
    )
    exclude_self_cell_type: str | None = Field(
        None, description="With genes: exclude each query's own (cell type, label) entry of this cell type."
    )
    return_profiles: list[str] = Field(
        default_factory=list, description="Per-entry arrays to return for every hit (e.g. ['delta'])."
    )

    @model_validator(mode="after")
    def _one_kind_of_query(self) -> SearchRequest:
        if (self.genes is None) == (self.vectors is None):
            msg = "give exactly one of 'genes' (perturbation labels) and 'vectors'"
            raise ValueError(msg)
        if isinstance(self.vectors, list):
            lengths = {len(v) for v in self.vectors}
            if len(lengths) != 1:
                msg = f"all query vectors must have the same length, got lengths {sorted(lengths)}"
                raise ValueError(msg)
        return self

    @property
    def n_queries(self) -> int:
        if self.genes is not None:
            return len(self.genes)
        return len(self.vectors) if isinstance(self.vectors, list) else len(self.query_vectors())

    def query_vectors(self) -> np.ndarray | None:
        """The ``(n, d)`` float32 query vectors, whichever form they came in; None for a query by genes."""
        if self.vectors is None:
            return None
        if isinstance(self.vectors, QueryArray):
            return self.vectors.to_array()
        return np.asarray(self.vectors, dtype=np.float32)


class QueryResult(BaseModel):
    """The hits of one query, best first."""

    query: str | None = Field(None, description="The query label, or null for a vector query.")
    ids: list[int]
    scores: list[float | None]
    cell_types: list[str | None]
    labels: list[str | None]
    profiles: dict[str, ArrayPayload] = Field(default_factory=dict, description="Name -> (k, ...) array.")


class SearchResponse(BaseModel):
    k: int
    results: list[QueryResult]

    @classmethod
    def from_arrays(
        cls,
        *,
        k: int,
        queries: list[str] | None,
        scores: np.ndarray,
        ids: np.ndarray,
        cell_types: np.ndarray,
        labels: np.ndarray,
        profiles: dict[str, np.ndarray],
    ) -> SearchResponse:
        results = []
        for i in range(ids.shape[0]):
            results.append(
                QueryResult(
                    query=queries[i] if queries is not None else None,
                    ids=ids[i].tolist(),
                    scores=[s if math.isfinite(s) else None for s in scores[i].tolist()],
                    cell_types=cell_types[i].tolist(),
                    labels=labels[i].tolist(),
                    profiles={name: ArrayPayload.from_array(arr[i]) for name, arr in profiles.items()},
                )
            )
        return cls(k=k, results=results)


class ProfilesRequest(_Strict):
    """``POST /profiles``: per-entry arrays for ids (1-D or 2-D; ``-1`` gives a padding row)."""

    ids: Ids = Field(min_length=1)
    names: list[str] | None = Field(None, description="Arrays to return; null returns all.")


class ProfilesResponse(BaseModel):
    arrays: dict[str, ArrayPayload]


class EntriesRequest(_Strict):
    ids: Ids = Field(min_length=1)


class EntriesResponse(BaseModel):
    cell_types: list[Any]
    labels: list[Any]


class IdsRequest(_Strict):
    """``POST /ids``: ids of (cell type, label) pairs."""

    pairs: list[tuple[str, str]] = Field(min_length=1)


class IdsResponse(BaseModel):
    ids: list[int] = Field(description="-1 where the store has no such entry.")


class ExtraResponse(BaseModel):
    name: str
    meta: dict[str, Any]
    array: ArrayPayload


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="'ready', 'loading', 'failed' or 'unconfigured'.")
    detail: str | None = None
    n_entries: int | None = None


class ErrorResponse(BaseModel):
    """Body of every error the service raises itself (FastAPI's own 422 validation body differs)."""

    error: str = Field(description="'unknown_gene', 'invalid_query', 'too_large' or 'not_ready'.")
    detail: str
    unknown: list[str] | None = None
    suggestions: dict[str, list[str]] | None = None
