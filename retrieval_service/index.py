"""Nearest-key search over the store's entries: a FAISS index plus exact numpy search, with filters.

Keys are L2-normalised, so the inner product is the cosine similarity. Three index types:

- ``"flat"`` (default): exact. On CPU the search is a blocked matrix product plus a partial sort
  (:mod:`retrieval_service.scoring`: torch for batches, numpy for one query), because faiss-cpu's
  ``IndexFlatIP`` was 2-8x slower than that on the machine we measured (``benchmarks/results/retrieval_bench.md``);
  the FAISS index is still written, and is the one searched when a GPU is present (or with ``backend="faiss"``).
- ``"ivf"`` (``IndexIVFFlat``, ``nlist``/``nprobe``) and ``"hnsw"`` (``IndexHNSWFlat``, inner-product
  metric): approximate, for large corpora.

On a machine with faiss-gpu and a CUDA device (``faiss.get_num_gpus() > 0``), ``flat`` and ``ivf`` are cloned
to the GPU at load time; ``hnsw`` has no GPU form and stays on CPU. Files always hold the CPU form.

A search without filters or exclusions whose scores fit one block takes a fast path (one matmul, one top-k,
one small sort) that returns exactly what the general exact path would. One or two queries against a large
``flat`` index (``PREFILTER_MIN_KEYS`` keys or more) go through 8-bit codes of the keys and exact rescoring
(:mod:`retrieval_service.prefilter`): the same top-k, certified by an error bound, from a quarter of the bytes.

Filters are exact whatever the index: every query gets ``min(k, number of valid candidates)`` valid ids.
The exact path masks scores before the partial sort. The FAISS path restricts cell types with an
``IDSelectorBitmap`` (CPU) or by filtering (GPU), over-fetches ``k + |excluded ids|`` to survive per-query
exclusions, grows the fetch for queries still short, and finishes any query an approximate index leaves
short with the exact search over its allowed candidates.

Errors raised for bad input (mirrored by :mod:`retrieval_service.client`)::

    KeyError
     └── UnknownGeneError      a gene of a query label is not in the gene embedding table
    ValueError
     └── InvalidQueryError     bad shape/dimension, NaN, k < 1, bad exclusion ids
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval_service.atomic import atomic_path
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.manifest import INDEX_TYPES, canonical_label
from retrieval_service.prefilter import PREFILTER_MIN_KEYS, Int8Prefilter
from retrieval_service.scoring import score_matrix, topk

__all__ = [
    "BACKENDS",
    "DEVICES",
    "IndexSpec",
    "InvalidQueryError",
    "RetrievalIndex",
    "UnknownGeneError",
    "build_faiss_index",
    "needs_faiss",
    "parse_label",
    "read_faiss_index",
    "write_faiss_index",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "faiss")
DEVICES = ("auto", "cpu", "gpu")
GPU_MAX_K = 2048  # faiss GPU search refuses larger k
SCORE_BLOCK_BYTES = 256 << 20  # one (n, block) float32 score matrix of the exact path
PREFILTER_MAX_QUERIES = 2  # from ~4 queries a BLAS matmul reads each key once for all: the float32 scan wins


class UnknownGeneError(KeyError):
    """Genes of a query label are not in the gene embedding table.

    Attributes
    ----------
    genes
        The unknown symbols, sorted.
    suggestions
        Symbol -> up to 3 close matches from the table (case-insensitive match first, then difflib).
    """

    def __init__(self, genes: Iterable[str], suggestions: Mapping[str, Sequence[str]] | None = None) -> None:
        self.genes = sorted(genes)
        self.suggestions = {g: list((suggestions or {}).get(g, ())) for g in self.genes}
        parts = []
        for g in self.genes:
            close = self.suggestions[g]
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            parts.append(f"{g!r}{hint}")
        super().__init__(f"unknown gene(s), not in the gene embedding table: {'; '.join(parts)}")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.genes, self.suggestions))


class InvalidQueryError(ValueError):
    """A query the index cannot answer as asked (shape, dimension, NaN, k, filters, exclusions)."""


# --- index construction and files --------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class IndexSpec:
    """Which FAISS index to build, and how to search it."""

    type: str = "flat"
    """``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``."""
    nlist: int | None = None
    """ivf: number of lists; None -> ``4 * sqrt(N)``, at most ``N // 39`` (faiss wants 39 points per list)."""
    nprobe: int = 16
    """ivf: lists visited per query (capped at ``nlist``). ``nprobe == nlist`` is exact."""
    hnsw_m: int = 32
    """hnsw: neighbours per node."""
    ef_construction: int = 200
    """hnsw: candidate list size while building."""
    ef_search: int = 512
    """hnsw: candidate list size while searching (raised to ``k`` when smaller). 512: recall@32 >= 0.99 at 20k
    keys of gene-text embeddings (MiniLM, projected to 1536-d: 0.993 for unseen genes, 0.999 for stored ones; 128
    gave 0.981). Random 1536-d vectors need 1024, where HNSW is slower than the exact scan; see
    ``benchmarks/results/retrieval_bench.md``."""

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            msg = f"index type {self.type!r} is not one of {INDEX_TYPES}"
            raise ValueError(msg)
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.nlist is not None and self.nlist < 1:
            msg = f"nlist must be >= 1, got {self.nlist}"
            raise ValueError(msg)

    def resolved_nlist(self, n: int) -> int:
        if self.nlist is not None:
            return int(self.nlist)
        return max(1, min(round(4 * math.sqrt(n)), n // 39))

    def params(self, n: int) -> dict[str, Any]:
        """The parameters that matter for this type, resolved for ``n`` keys (recorded in the manifest)."""
        if self.type == "ivf":
            nlist = self.resolved_nlist(n)
            return {"nlist": nlist, "nprobe": min(self.nprobe, nlist)}
        if self.type == "hnsw":
            return {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}
        return {}

    @classmethod
    def from_params(cls, index_type: str, params: Mapping[str, Any]) -> IndexSpec:
        known = {k: v for k, v in params.items() if k in {"nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"}}
        return cls(type=index_type, **known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_faiss_index(
    keys: np.ndarray, spec: IndexSpec | None = None, *, rng: np.random.Generator | int | None = None
) -> faiss.Index:
    """Build a CPU FAISS inner-product index over ``keys``.

    Parameters
    ----------
    keys
        ``(N, d)`` float32, L2-normalised rows.
    spec
        Index type and parameters; default exact ``flat``.
    rng
        Seeds the k-means of ``ivf`` (and the training sample when ``N > 256 * nlist``).

    Returns
    -------
    faiss.Index
        ``IndexFlatIP``, ``IndexIVFFlat`` or ``IndexHNSWFlat`` with all ``N`` keys added in id order.
    """
    spec = spec or IndexSpec()
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = keys.shape
    start = time.perf_counter()
    if spec.type == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.type == "ivf":
        params = spec.params(n)
        if params["nlist"] > n:
            msg = f"ivf nlist={params['nlist']} is more than the {n} keys; use fewer lists or a flat index"
            raise ValueError(msg)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.referenced_objects = [quantizer]  # keep the quantizer alive with the index
        gen = np.random.default_rng(rng)
        index.cp.seed = int(gen.integers(2**31 - 1))
        n_train = min(n, 256 * params["nlist"])
        train = keys if n_train == n else keys[np.sort(gen.choice(n, n_train, replace=False))]
        index.train(train)
        index.nprobe = params["nprobe"]
    else:
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    index.add(keys)
    logger.info("built %s index over %d keys (d=%d) in %.2fs", spec.type, n, d, time.perf_counter() - start)
    return index


def write_faiss_index(index: faiss.Index, path: str | os.PathLike[str]) -> Path:
    """Write the CPU form of ``index`` to ``path`` atomically (a GPU index is copied back first)."""
    path = Path(path)
    if hasattr(faiss, "index_gpu_to_cpu") and _is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return path


def read_faiss_index(path: str | os.PathLike[str]) -> faiss.Index:
    """Read a CPU FAISS index written by :func:`write_faiss_index`."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:  # faiss reports unreadable files as RuntimeError with a C++ trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = f"{path}: not a readable FAISS index ({first})"
        raise ValueError(msg) from None


def needs_faiss(index_type: str, *, backend: str = "auto", device: str = "auto") -> bool:
    """Whether searching needs the FAISS index (a CPU ``flat`` index is searched in numpy instead)."""
    if index_type != "flat" or backend == "faiss" or device == "gpu":
        return True
    return device == "auto" and backend == "auto" and faiss.get_num_gpus() > 0


def _is_gpu_index(index: faiss.Index) -> bool:
    return type(index).__name__.startswith("Gpu")


def _to_device(index: faiss.Index, device: str) -> tuple[faiss.Index, Any]:
    """Clone ``index`` to GPU 0 when asked/possible; returns ``(index, gpu_resources_or_None)``."""
    if device not in DEVICES:
        msg = f"device {device!r} is not one of {DEVICES}"
        raise ValueError(msg)
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cpu" or (device == "auto" and n_gpus == 0):
        return index, None
    if n_gpus == 0 or not hasattr(faiss, "StandardGpuResources"):
        msg = "device='gpu' asked but faiss sees no GPU (install faiss-gpu and check CUDA), or use device='auto'"
        raise ValueError(msg)
    if isinstance(index, faiss.IndexHNSW):
        logger.info("HNSW has no GPU form in faiss; searching on CPU")
        return index, None
    try:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), res
    except (RuntimeError, AttributeError) as err:
        if device == "gpu":
            raise
        logger.warning("could not clone the index to the GPU (%s); searching on CPU", err)
        return index, None


# --- helpers -----------------------------------------------------------------------------------------------


def parse_label(label: str) -> tuple[str, ...]:
    """``"TP53"`` -> ``("TP53",)``; ``"A+B"`` -> ``("A", "B")``. Empty genes are an error."""
    if not isinstance(label, str):
        msg = f"a perturbation label must be a string like 'TP53' or 'A+B', got {type(label).__name__}"
        raise InvalidQueryError(msg)
    genes = tuple(g.strip() for g in label.split("+"))
    if not all(genes):
        msg = f"malformed perturbation label {label!r}: expected genes joined by '+', e.g. 'TP53' or 'A+B'"
        raise InvalidQueryError(msg)
    return genes


def _within(exact: np.ndarray, approx: np.ndarray, bound: np.ndarray) -> bool:
    """Whether approximate scores are within their bound of the float32 exact ones (float32 rounding allowed)."""
    return bool(np.all(np.abs(exact.astype(np.float64) - approx) <= bound + 1e-6 * (1.0 + np.abs(exact))))


def _as_id_array(values: Iterable[Any], what: str) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        msg = f"{what} must be integer ids, got dtype {arr.dtype}"
        raise InvalidQueryError(msg)
    return arr.astype(np.int64, copy=False).ravel()


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# --- the index ---------------------------------------------------------------------------------------------


class RetrievalIndex:
    """Search the entries of a store by key similarity, with cell-type filters and per-query exclusions.

    Parameters
    ----------
    keys
        ``(N, d)`` float32, L2-normalised, id ``i`` in row ``i``; may be memory-mapped.
    cell_types, labels
        Length ``N``: each entry's cell type and perturbation label (``"TP53"``, ``"A+B"``).
    embeddings
        The gene embedding table the keys were made from; needed only by :meth:`search_labels`.
    faiss_index
        A CPU FAISS index over ``keys`` (same ids). None builds one from ``spec`` when it is needed.
    spec
        Index type and search parameters (``nprobe``, ``ef_search`` are applied to ``faiss_index``).
    backend
        ``"auto"``: exact numpy search for ``flat`` on CPU, FAISS otherwise; ``"numpy"`` or ``"faiss"``
        forces one for ``flat`` (``ivf``/``hnsw`` always search through FAISS).
    device
        ``"auto"`` clones to the GPU when faiss-gpu sees one, ``"cpu"`` never, ``"gpu"`` or fail.
    prefilter
        Exact one- and two-query searches of the numpy backend through 8-bit codes of the keys plus exact
        rescoring (:mod:`retrieval_service.prefilter`): ~2x faster at 20k keys, same results, ``N * d`` more
        bytes of memory. None: when there are at least ``PREFILTER_MIN_KEYS`` keys.
    """

    def __init__(
        self,
        keys: np.ndarray,
        *,
        cell_types: Sequence[str],
        labels: Sequence[str],
        embeddings: GeneEmbeddings | None = None,
        faiss_index: faiss.Index | None = None,
        spec: IndexSpec | None = None,
        backend: str = "auto",
        device: str = "auto",
        prefilter: bool | None = None,
    ) -> None:
        keys = np.asarray(keys)  # a memmap stays a (base-class) view of the mapped file
        if keys.ndim != 2 or keys.dtype != np.float32 or not keys.flags.c_contiguous:
            msg = f"keys must be a C-contiguous (N, d) float32 array, got {keys.dtype} {keys.shape}"
            raise ValueError(msg)
        n, d = keys.shape
        if len(cell_types) != n or len(labels) != n:
            msg = f"{n} keys but {len(cell_types)} cell types and {len(labels)} labels"
            raise ValueError(msg)
        if backend not in BACKENDS:
            msg = f"backend {backend!r} is not one of {BACKENDS}"
            raise ValueError(msg)
        if embeddings is not None and embeddings.dim != d:
            msg = f"gene embeddings have dimension {embeddings.dim}, keys have {d}"
            raise ValueError(msg)
        self.keys = keys
        self.spec = spec or IndexSpec()
        self.embeddings = embeddings
        self.labels = np.asarray([str(x) for x in labels], dtype=object)
        self.cell_type_names: list[str] = sorted({str(c) for c in cell_types})
        code = {c: i for i, c in enumerate(self.cell_type_names)}
        self._ct_codes = np.fromiter((code[str(c)] for c in cell_types), dtype=np.int32, count=n)
        self.cell_types = np.asarray(self.cell_type_names, dtype=object)[self._ct_codes]
        self._pair_ids: dict[tuple[str, str], int] | None = None
        self._symbols_upper: dict[str, str] | None = None

        if faiss_index is not None and (faiss_index.ntotal != n or faiss_index.d != d):
            msg = f"FAISS index holds {faiss_index.ntotal} vectors of dimension {faiss_index.d}, keys are {n}x{d}"
            raise ValueError(msg)
        if faiss_index is None and needs_faiss(self.spec.type, backend=backend, device=device):
            faiss_index = build_faiss_index(keys, self.spec)
        self._cpu_index = faiss_index
        self._gpu_res = None
        self._faiss = None
        if faiss_index is not None:
            self._faiss, self._gpu_res = _to_device(faiss_index, device)
        self.on_gpu = self._gpu_res is not None
        self.set_search_params(nprobe=self.spec.nprobe, ef_search=self.spec.ef_search)
        use_faiss = self.spec.type != "flat" or backend == "faiss" or (backend == "auto" and self.on_gpu)
        self.backend = "faiss" if use_faiss else "numpy"
        if prefilter is None:
            prefilter = n >= PREFILTER_MIN_KEYS
        self._prefilter = None
        if prefilter and self.backend == "numpy" and n:
            t0 = time.perf_counter()
            self._prefilter = Int8Prefilter(keys)
            logger.info("8-bit prefilter of %d keys (%s backend, %s, %.0f MB) built in %.1f s", n,
                        self._prefilter.backend, self._prefilter.qtype, self._prefilter.nbytes / 1e6,
                        time.perf_counter() - t0)  # fmt: skip
        self.prefilter_stats = {"certified": 0, "refetched": 0, "scanned": 0}  # how prefiltered queries ended
        logger.info(
            "retrieval index: %d keys, d=%d, type=%s, backend=%s, %s",
            n, d, self.spec.type, self.backend, "GPU" if self.on_gpu else "CPU",
        )  # fmt: skip

    # --- properties -----------------------------------------------------------------------------------------

    @property
    def d(self) -> int:
        return int(self.keys.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self.keys.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def faiss_index(self) -> faiss.Index | None:
        """The CPU FAISS index (what is written to disk), or None for a numpy-only ``flat`` index."""
        return self._cpu_index

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change ``nprobe`` (ivf) or ``efSearch`` (hnsw) for later searches."""
        if self._faiss is None:
            return
        if nprobe is not None and self.spec.type == "ivf":
            nprobe = min(int(nprobe), int(faiss.extract_index_ivf(self._cpu_index).nlist))
            faiss.extract_index_ivf(self._cpu_index).nprobe = nprobe
            if self.on_gpu:
                self._faiss.nprobe = nprobe
        if ef_search is not None and self.spec.type == "hnsw":
            self._cpu_index.hnsw.efSearch = int(ef_search)

    def search_work(self, n_queries: int) -> float:
        """Rough cost of a search of ``n_queries``, in multiply-adds of the exact scan's speed (inf on a GPU).

        Exact: ``n * N * d``, half that through the 8-bit prefilter (one or two queries). HNSW: ``4 * n *
        max(ef_search, 16) * M * d`` (about ``ef * M`` distances per query, each ~4x slower than in a BLAS scan:
        random access; measured at 20k keys of 1536-d). IVF: ``2 * n * (nlist + nprobe * N / nlist) * d``. The
        service runs searches it deems cheap on its event loop.
        """
        if self.on_gpu:  # a call waits for the device
            return math.inf
        n, big_n, d = int(n_queries), self.ntotal, self.d
        if self._prefilter is not None and 0 < n <= PREFILTER_MAX_QUERIES:
            return float(n * big_n * d) / 2  # 8-bit codes, rescored: about half the exact scan's time, measured
        if self.backend == "numpy" or self.spec.type == "flat":
            return float(n * big_n * d)
        if self.spec.type == "hnsw":
            return 4.0 * n * max(int(self._cpu_index.hnsw.efSearch), 16) * self.spec.hnsw_m * d
        ivf = faiss.extract_index_ivf(self._cpu_index)
        return 2.0 * n * (ivf.nlist + ivf.nprobe * big_n / max(ivf.nlist, 1)) * d

    def knows_labels(self, labels: Iterable[str]) -> bool:
        """Whether every gene of these labels is in the embedding table (malformed labels count as unknown)."""
        if self.embeddings is None:
            return False
        for label in labels:
            if not isinstance(label, str):
                return False
            for gene in label.split("+"):
                if gene.strip() not in self.embeddings:
                    return False
        return True

    # --- input checks ---------------------------------------------------------------------------------------

    def _coerce_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            msg = f"queries must be 2-D (n, d) with d={self.d}, got shape {q.shape}"
            raise InvalidQueryError(msg)
        if q.shape[1] != self.d:
            msg = f"queries have dimension {q.shape[1]} but the index keys have dimension {self.d}"
            raise InvalidQueryError(msg)
        if not np.isfinite(q).all():
            bad = ~np.isfinite(q).all(axis=1)
            msg = f"{int(bad.sum())} query vector(s) contain NaN or inf (rows {np.flatnonzero(bad)[:10].tolist()})"
            raise InvalidQueryError(msg)
        return q

    @staticmethod
    def _coerce_k(k: int) -> int:
        if not _is_int(k) or int(k) < 1:
            msg = f"k must be a positive integer, got {k!r}"
            raise InvalidQueryError(msg)
        return int(k)

    def _cell_type_codes(self, names: str | Iterable[str]) -> np.ndarray:
        # A name the store lacks matches nothing: excluding a cell type the store has never seen (the query's
        # own, held-out one) is a normal request, not an error.
        names = [names] if isinstance(names, str) else [str(x) for x in names]
        code = {c: i for i, c in enumerate(self.cell_type_names)}
        return np.asarray([code[x] for x in names if x in code], dtype=np.int32)

    def allowed_mask(
        self, cell_types: str | Iterable[str] | None = None, exclude_cell_types: str | Iterable[str] | None = None
    ) -> np.ndarray | None:
        """``(N,)`` bool of the entries the cell-type filters allow, or None when there is no filter.

        Names the store lacks match nothing (``cell_types=["unseen"]`` allows no entry).
        """
        if cell_types is None and exclude_cell_types is None:
            return None
        allowed = np.ones(self.ntotal, dtype=bool)
        if cell_types is not None:
            allowed &= np.isin(self._ct_codes, self._cell_type_codes(cell_types))
        if exclude_cell_types is not None:
            allowed &= ~np.isin(self._ct_codes, self._cell_type_codes(exclude_cell_types))
        return allowed

    def _exclusions(self, exclude: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(query row, id) pairs to exclude, unique, sorted by row then id; ``-1`` ids are ignored."""
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        if exclude is None:
            return empty
        if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
            per_query: list[Any] | None = list(exclude)
        elif isinstance(exclude, np.ndarray) or isinstance(exclude, (set, frozenset)):
            per_query = None
        else:
            items = list(exclude)
            if all(_is_int(x) for x in items):
                per_query = None
            elif all(isinstance(x, Iterable) and not isinstance(x, (str, bytes)) for x in items):
                per_query = items
            else:
                msg = "exclude must be a collection of ids (for all queries) or one collection of ids per query"
                raise InvalidQueryError(msg)
        if per_query is None:
            ids = _as_id_array(exclude, "exclude")
            rows = np.repeat(np.arange(n, dtype=np.int64), ids.size)
            ids = np.tile(ids, n)
        else:
            if len(per_query) != n:
                msg = f"exclude has {len(per_query)} per-query id collections for {n} queries"
                raise InvalidQueryError(msg)
            arrays = [_as_id_array(x, "exclude") for x in per_query]
            rows = np.repeat(np.arange(n, dtype=np.int64), [a.size for a in arrays])
            ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        bad = (ids < -1) | (ids >= self.ntotal)
        if bad.any():
            msg = f"exclude ids must be in [0, {self.ntotal}) (or -1 for none); got {np.unique(ids[bad])[:10].tolist()}"
            raise InvalidQueryError(msg)
        keep = ids >= 0
        codes = np.unique(rows[keep] * self.ntotal + ids[keep])
        return codes // self.ntotal, codes % self.ntotal

    # --- search ---------------------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Collection[int] | Sequence[Collection[int]] | np.ndarray | None = None,
        cell_types: str | Iterable[str] | None = None,
        exclude_cell_types: str | Iterable[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` entries with the largest inner product to each query, after filters.

        Parameters
        ----------
        queries
            ``(n, d)`` float-like, coerced once to C-contiguous float32; ``d`` must be the keys' dimension.
            Queries are not normalised: pass unit vectors to get cosine scores.
        k
            Results per query, ``>= 1``.
        exclude
            Ids never returned: one collection for all queries (``{3, 7}``, a 1-D int array), or one
            collection per query (``[{3}, {4, 5}]``, a 2-D int array). ``-1`` entries are ignored.
        cell_types
            Return only entries of these cell types (a name or names; names the store lacks match nothing).
        exclude_cell_types
            Never return entries of these cell types.

        Returns
        -------
        scores
            ``(n, k)`` float32, best first; equal scores in id order on the exact path (which of several
            entries tied at the k-th place is returned is unspecified, as in FAISS).
        ids
            ``(n, k)`` int64. A row holds exactly ``min(k, number of allowed, non-excluded entries)`` valid
            ids; the rest is padding with id ``-1`` and score ``-inf`` (faiss pads with ``-FLT_MAX``; we use
            ``-inf`` so that padding never compares equal to a real score).

        Raises
        ------
        InvalidQueryError
            For a wrong shape or dimension, NaN/inf, ``k < 1``, or out-of-range ids.
        """
        q = self._coerce_queries(queries)
        k = self._coerce_k(k)
        prefilter = self._prefilter is not None and 0 < q.shape[0] <= PREFILTER_MAX_QUERIES
        if (
            not prefilter
            and exclude is None
            and cell_types is None
            and exclude_cell_types is None
            and self.backend == "numpy"
            and 0 < 4 * q.shape[0] * self.ntotal <= SCORE_BLOCK_BYTES
        ):
            return self._search_plain(q, k)
        allowed = self.allowed_mask(cell_types, exclude_cell_types)
        ex_rows, ex_ids = self._exclusions(exclude, q.shape[0])
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if prefilter and (allowed is None or allowed.mean() >= 0.3):  # narrower: gathering allowed keys is cheaper
            return self._search_prefiltered(q, k, allowed, ex_rows, ex_ids)
        if self.backend == "faiss":
            return self._search_faiss(q, k, allowed, ex_rows, ex_ids)
        return self._search_exact(q, k, allowed, ex_rows, ex_ids)

    def search_labels(
        self,
        labels: Sequence[str],
        k: int,
        *,
        exclude: Collection[int] | Sequence[Collection[int]] | np.ndarray | None = None,
        cell_types: str | Iterable[str] | None = None,
        exclude_cell_types: str | Iterable[str] | None = None,
        exclude_self_cell_type: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with perturbation labels as queries (``"TP53"``, ``"A+B"``).

        Each label's key is the L2-normalised sum of its genes' vectors in the stored embedding table,
        exactly as the entries' keys were made.

        Parameters
        ----------
        labels
            ``n`` labels.
        exclude_self_cell_type
            Also exclude, for each query, the entry ``(exclude_self_cell_type, label)`` when it exists: the
            query's own profile in that cell type (labels compare gene-order-free).
        k, exclude, cell_types, exclude_cell_types
            As in :meth:`search`.

        Raises
        ------
        UnknownGeneError
            Naming every unknown gene with close matches.
        """
        if isinstance(labels, str):
            labels = [labels]
        vectors = self.label_vectors(labels)
        if exclude_self_cell_type is not None:
            own = self.ids_for([(exclude_self_cell_type, lab) for lab in labels])
            rows, ids = self._exclusions(exclude, len(labels))
            per_query: list[list[int]] = [[] for _ in labels]
            for r, i in zip(rows.tolist(), ids.tolist(), strict=True):
                per_query[r].append(i)
            for r, i in enumerate(own.tolist()):
                per_query[r].append(i)
            exclude = per_query
        return self.search(vectors, k, exclude=exclude, cell_types=cell_types, exclude_cell_types=exclude_cell_types)

    def label_vectors(self, labels: Sequence[str]) -> np.ndarray:
        """``(n, d)`` float32 unit keys for perturbation labels; :class:`UnknownGeneError` naming unknowns."""
        if self.embeddings is None:
            msg = "this index has no gene embedding table; query with vectors instead of labels"
            raise InvalidQueryError(msg)
        parsed = [parse_label(lab) for lab in labels]
        unknown = sorted({g for genes in parsed for g in genes if g not in self.embeddings})
        if unknown:
            raise UnknownGeneError(unknown, self.suggest(unknown))
        vectors, ok = self.embeddings.perturbation_vectors(parsed)
        if not ok.all():  # cannot happen after the check above; keep the invariant loud
            msg = f"no key for labels {[labels[i] for i in np.flatnonzero(~ok)]}"
            raise InvalidQueryError(msg)
        return vectors

    def suggest(self, genes: Iterable[str], *, n: int = 3) -> dict[str, list[str]]:
        """Close matches in the embedding table for each gene: same name in another case first, then difflib."""
        if self.embeddings is None:
            return {g: [] for g in genes}
        if self._symbols_upper is None:
            self._symbols_upper = {s.upper(): s for s in self.embeddings.symbols}
        out = {}
        for g in genes:
            same_case = self._symbols_upper.get(g.upper())
            close = difflib.get_close_matches(g.upper(), list(self._symbols_upper), n=n, cutoff=0.6)
            names = ([same_case] if same_case else []) + [self._symbols_upper[c] for c in close]
            out[g] = list(dict.fromkeys(names))[:n]
        return out

    def ids_for(self, pairs: Iterable[tuple[str, str]]) -> np.ndarray:
        """``(m,)`` int64 ids of (cell type, label) pairs, ``-1`` where the store has no such entry.

        Labels compare gene-order-free (``"B+A"`` finds ``"A+B"``). Use it to exclude a query's own entry.
        """
        if self._pair_ids is None:
            entries = zip(self.cell_types, self.labels, strict=True)
            self._pair_ids = {(str(ct), canonical_label(lab)): i for i, (ct, lab) in enumerate(entries)}
        return np.asarray(
            [self._pair_ids.get((str(ct), canonical_label(lab)), -1) for ct, lab in pairs], dtype=np.int64
        ).reshape(-1)

    # --- the two search paths -------------------------------------------------------------------------------

    def _search_plain(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact path without filters or exclusions, in one block: one matmul, one top-k, one small sort.

        Returns what :meth:`_search_exact` returns for the same query (the tests check it); it skips that
        method's bookkeeping (masks, exclusion positions, block merging), a fixed cost that is a visible share
        of a one-query search over a few thousand keys.
        """
        kk = min(k, self.ntotal)
        ids, vals = topk(score_matrix(q, self.keys), kk)  # (n, kk) each, best first, ties in id order
        if kk < k:
            vals = np.pad(vals, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        pad = np.isneginf(vals)
        if pad.any():  # an overflowing query scores -inf: padding, as on the general path
            ids[pad] = -1
        return vals, ids

    def _search_exact(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None, ex_rows: np.ndarray, ex_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Blocked ``q @ keys.T`` over the allowed keys, excluded scores set to ``-inf``, partial sort per block."""
        n = q.shape[0]
        if allowed is not None and allowed.all():
            allowed = None
        frac = 1.0 if allowed is None else float(allowed.mean())
        # Copying the allowed keys out saves the products with filtered keys but costs memory traffic (a
        # single query over 75% of 200k keys ran 4x slower gathered than masked): gather only when few keys
        # pass the filter, or when the batch is large enough for the products to dominate. Else mask.
        gather = allowed is not None and (frac < 0.3 or (n >= 16 and frac < 0.75))
        cand = np.flatnonzero(allowed) if gather else None
        masked = ~allowed if allowed is not None and not gather else None
        n_cand = self.ntotal if cand is None else cand.size
        kk = min(k, n_cand)
        # Exclusions as positions in the candidate list (ids themselves when there is no cell-type filter).
        if cand is not None and ex_ids.size:
            hit = allowed[ex_ids]  # an excluded id outside the filter needs no masking
            ex_rows, ex_pos = ex_rows[hit], np.searchsorted(cand, ex_ids[hit])
        else:
            ex_pos = ex_ids
        if ex_pos.size:
            order = np.argsort(ex_pos, kind="stable")
            ex_rows, ex_pos = ex_rows[order], ex_pos[order]

        best_s = best_p = None
        block = max(kk, 1024, SCORE_BLOCK_BYTES // (4 * n))
        for start in range(0, n_cand, block):
            stop = min(start + block, n_cand)
            keys = self.keys[start:stop] if cand is None else self.keys[cand[start:stop]]
            scores = score_matrix(q, keys)  # (n, b) float32
            if masked is not None:
                scores[:, masked[start:stop]] = -np.inf
            if ex_pos.size:
                lo, hi = np.searchsorted(ex_pos, [start, stop])
                scores[ex_rows[lo:hi], ex_pos[lo:hi] - start] = -np.inf
            pos, vals = topk(scores, kk)  # best first, ties to the lower position
            if best_s is None:  # first (usually only) block
                best_s, best_p = vals, pos + start
                continue
            # Earlier blocks first and each sorted, so among equal scores column order is position order.
            best_s = np.concatenate([best_s, vals], axis=1)
            best_p = np.concatenate([best_p, pos + start], axis=1)
            pos, best_s = topk(best_s, kk)
            best_p = np.take_along_axis(best_p, pos, axis=1)
        if best_s is None:  # no candidate at all
            best_s, best_p = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        # Already best first, equal scores in position order (topk), which is id order: cand is ascending.
        ids = best_p if cand is None else cand[best_p]
        if kk < k:
            best_s = np.pad(best_s, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        pad = np.isneginf(best_s)
        if pad.any():  # filtered or excluded entries that filled a short row
            ids[pad] = -1
        return best_s, ids.astype(np.int64, copy=False)

    def _search_prefiltered(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None, ex_rows: np.ndarray, ex_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k, query by query: an 8-bit shortlist, rescored in float32, certified or refetched 4x larger.

        See :mod:`retrieval_service.prefilter` for the bound. A query whose shortlist would reach an eighth of
        the keys without a certificate goes to the plain exact scan.
        """
        pre = self._prefilter
        assert pre is not None
        n, big_n = q.shape[0], self.ntotal
        out_s = np.full((n, k), -np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        n_allowed = big_n if allowed is None else int(allowed.sum())
        for row in range(n):
            ex = ex_ids[ex_rows == row]
            n_valid = n_allowed - int(ex.size if allowed is None else allowed[ex].sum())
            kk = min(k, n_valid)
            if kk <= 0:
                continue
            # 8x over-fetch: on random unit keys (no structure, the worst case) the certificate held for 8k.
            r = max(64, 8 * math.ceil((kk + ex.size) * big_n / max(n_allowed, 1)))
            view = pre.query(q[row])
            while True:
                if 8 * r > big_n and r < big_n:  # certificates keep failing: the data defeats the codes
                    self.prefilter_stats["scanned"] += 1
                    s, i = self._search_exact(q[row : row + 1], k, allowed, np.zeros(ex.size, np.int64), ex)
                    out_s[row], out_i[row] = s[0], i[0]
                    break
                approx, ids = view.shortlist(r)  # (r,) each, best first
                got = ids >= 0
                fetched, fetched_approx = ids[got], approx[got]
                ok = np.ones(fetched.size, bool)
                if allowed is not None:
                    ok &= allowed[fetched]
                if ex.size:
                    ok &= ~np.isin(fetched, ex)
                cand = fetched[ok]
                exact = self.keys[cand] @ q[row]  # (c,) float32
                if not _within(exact, fetched_approx[ok], view.key_bound(cand)):
                    # The codes broke their own bound (never seen; it would be a backend fault): stay exact.
                    logger.error("int8 prefilter (%s) exceeded its error bound; this query was scanned exactly",
                                 pre.backend)  # fmt: skip
                    self.prefilter_stats["scanned"] += 1
                    s, i = self._search_exact(q[row : row + 1], k, allowed, np.zeros(ex.size, np.int64), ex)
                    out_s[row], out_i[row] = s[0], i[0]
                    break
                complete = fetched.size >= big_n  # the shortlist is every key: nothing outside to bound
                if cand.size >= kk:
                    top = np.lexsort((cand, -exact))[:kk]  # best first, ties to the lower id (as the exact scan)
                    vals, top_ids = exact[top], cand[top]
                    t = float(vals[-1])
                    # Strict: a key outside could tie t, and ties go to the lower id.
                    if complete or view.outside_bound(float(fetched_approx[-1])) < t:
                        out_s[row, :kk], out_i[row, :kk] = vals, top_ids
                        self.prefilter_stats["certified"] += 1
                        break
                elif complete:  # fewer valid keys than k (guarded above; defensive)
                    break
                self.prefilter_stats["refetched"] += 1
                r = min(4 * r, big_n)
        return out_s, out_i

    def _search_faiss(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None, ex_rows: np.ndarray, ex_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search with over-fetch for exclusions; queries left short go to the exact path."""
        n, big_n = q.shape[0], self.ntotal
        if allowed is not None and allowed.all():
            allowed = None
        if allowed is not None and ex_ids.size:  # an excluded id the filter already drops costs nothing
            keep = allowed[ex_ids]
            ex_rows, ex_ids = ex_rows[keep], ex_ids[keep]
        n_allowed = big_n if allowed is None else int(allowed.sum())
        ex_count = np.bincount(ex_rows, minlength=n)
        target = np.minimum(k, n_allowed - ex_count)
        ex_codes = ex_rows * big_n + ex_ids  # sorted: rows then ids

        use_selector = allowed is not None and not self.on_gpu
        bitmap = np.packbits(allowed, bitorder="little") if use_selector else None
        params = self._selector_params(bitmap, big_n) if bitmap is not None else None
        fetch = k + int(ex_count.max(initial=0))
        if allowed is not None and not use_selector:  # filtering after the fact: fetch in proportion
            fetch = math.ceil(fetch * big_n / max(n_allowed, 1))
        cap = min(big_n, GPU_MAX_K) if self.on_gpu else big_n

        out_s = np.full((n, k), -np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        pending = np.flatnonzero(target > 0)
        for _round in range(4):
            if pending.size == 0:
                break
            f = min(fetch, cap)
            dist, ids = self._faiss.search(q[pending], f, params=params)
            valid = ids >= 0
            if allowed is not None and not use_selector:
                valid &= allowed[np.where(valid, ids, 0)]
            if ex_codes.size:
                valid &= ~np.isin(pending[:, None] * big_n + ids, ex_codes)
            done = valid.sum(axis=1) >= target[pending]
            # First k valid results of each finished row, in FAISS's (best-first) order.
            first = np.argsort(~valid, axis=1, kind="stable")[:, :k]
            take_i = np.take_along_axis(np.where(valid, ids, -1), first, axis=1)
            take_s = np.take_along_axis(np.where(valid, dist, -np.inf), first, axis=1).astype(np.float32)
            rows = pending[done]
            out_i[rows, : take_i.shape[1]] = take_i[done]
            out_s[rows, : take_s.shape[1]] = take_s[done]
            pending = pending[~done]
            if f >= cap:
                break
            fetch = 2 * f
        if pending.size:
            # An approximate index (or the GPU's k cap) left these short: finish them exactly.
            logger.debug("%d of %d queries finished by exact search", pending.size, n)
            sel = np.isin(ex_rows, pending)
            remap = np.full(n, -1, np.int64)
            remap[pending] = np.arange(pending.size)
            s, i = self._search_exact(q[pending], k, allowed, remap[ex_rows[sel]], ex_ids[sel])
            out_s[pending], out_i[pending] = s, i
        return out_s, out_i

    def _selector_params(self, bitmap: np.ndarray, n: int) -> faiss.SearchParameters:
        sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
        if self.spec.type == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(faiss.extract_index_ivf(self._cpu_index).nprobe))
        elif self.spec.type == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(self._cpu_index.hnsw.efSearch))
        else:
            params = faiss.SearchParameters(sel=sel)
        params.referenced_objects = [sel, bitmap]  # the selector points into `bitmap`
        return params
