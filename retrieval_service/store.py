"""The profile store: entries (id, key, cell type, label), their cached arrays, and the index over the keys.

On disk (one directory, written to a temporary sibling and renamed, so it is complete or absent)::

    <dir>/
      manifest.json      format version, embedding source/dim, hashes, split, checksums (manifest.py)
      entries.json       {"cell_types": [...], "labels": [...]}; entry i is row i, ids are 0..N-1
      keys.npy           (N, d) float32, L2-normalised keys, memory-mapped on load
      index.faiss        the FAISS index over keys, CPU form
      embeddings.npz     copy of the gene embedding table (queries by gene name)
      arrays/<name>.npy  per-entry arrays, (N, ...) each, memory-mapped on load
      extras/<name>.npy  per-store arrays (e.g. control means), memory-mapped on load
      extras.json        {name: metadata} for the extras
      attrs.json         free JSON attributes (e.g. "feature_names": the genes of the profiles)

Leakage guard: :func:`build_store` refuses an entry that is a held-out (cell type, perturbation) pair of
the split, before writing anything, and records the split id and the held-out pairs' hash in the manifest,
so that :meth:`Store.check_split` can tell a loaded store apart from one built for another split.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_service.atomic import atomic_dir
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.index import (
    IndexSpec,
    InvalidQueryError,
    RetrievalIndex,
    build_faiss_index,
    needs_faiss,
    parse_label,
    read_faiss_index,
    write_faiss_index,
)
from retrieval_service.manifest import (
    REBUILD_HINT,
    LeakageError,
    Manifest,
    StoreCorruptedError,
    canonical_label,
    checksum_directory,
    hash_pairs,
    hash_strings,
)

__all__ = ["SearchResult", "Store", "build_store", "open_store"]

logger = logging.getLogger(__name__)

ENTRIES_NAME = "entries.json"
KEYS_NAME = "keys.npy"
INDEX_NAME = "index.faiss"
EMBEDDINGS_NAME = "embeddings.npz"
ATTRS_NAME = "attrs.json"
EXTRAS_META_NAME = "extras.json"
ARRAYS_DIR = "arrays"
EXTRAS_DIR = "extras"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_UNIT_NORM_TOL = 1e-3


# --- building ----------------------------------------------------------------------------------------------


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".npy"):
        msg = f"{what} name {name!r} must be letters, digits, '_', '.', '-' (it becomes a file name)"
        raise ValueError(msg)
    return name


def _check_array(arr: Any, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind not in "biufc":
        msg = f"{what} must be a numeric or bool array, got dtype {arr.dtype}"
        raise ValueError(msg)
    return arr


def _json_text(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        msg = f"{what} must be JSON-serialisable (no NaN): {err}"
        raise ValueError(msg) from None


def build_store(
    out_dir: str | os.PathLike[str],
    *,
    cell_types: Sequence[str],
    labels: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    gene_embeddings: GeneEmbeddings,
    split_id: str,
    forbidden_pairs: Iterable[tuple[str, str]] = (),
    keys: np.ndarray | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    extras_meta: Mapping[str, Mapping[str, Any]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    index_type: str = "flat",
    index_params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    rng: np.random.Generator | int | None = None,
) -> Path:
    """Write a complete index directory atomically (temporary directory, then rename).

    Parameters
    ----------
    out_dir
        Directory to create. It must not exist unless ``overwrite``.
    cell_types, labels
        Length ``N``: entry ``i`` is ``(cell_types[i], labels[i])`` with id ``i``. Labels are perturbations,
        ``"TP53"`` or ``"A+B"``. Each (cell type, label) pair appears once.
    arrays
        Per-entry arrays, name -> ``(N, ...)`` numeric (``"delta"`` ``(N, G)``, ``"n_cells"`` ``(N,)``...).
    gene_embeddings
        The gene table the keys come from; a copy is stored so that queries can name genes.
    split_id
        Id of the split the entries are drawn from (training side).
    forbidden_pairs
        The split's held-out (cell type, label) pairs. Any entry among them is refused (:class:`LeakageError`)
        before anything is written; their hash and count go to the manifest.
    keys
        ``(N, d)`` float32 L2-normalised keys. None computes them from ``labels`` (sum of the genes' vectors,
        normalised), which fails naming any label with a gene missing from ``gene_embeddings``.
    extras, extras_meta
        Per-store arrays (e.g. control means per cell type) and a JSON dict of metadata for each.
    attrs
        Free JSON attributes. ``attrs["feature_names"]`` (the genes of the profiles) is hashed into the
        manifest so that a consumer can check that profiles and model agree.
    index_type, index_params
        ``"flat"`` (exact, default), ``"ivf"`` (``nlist``, ``nprobe``) or ``"hnsw"`` (``hnsw_m``,
        ``ef_construction``, ``ef_search``); see :class:`retrieval_service.index.IndexSpec`.
    overwrite
        Replace an existing directory (the old one stays intact until the new one is complete).
    rng
        Seeds the training of ``ivf``.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    LeakageError
        Naming the entries that are held-out pairs of the split.
    FileExistsError
        When ``out_dir`` exists and not ``overwrite``.
    ValueError
        For inconsistent lengths, duplicate pairs, bad keys, array names or non-JSON attributes.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        msg = f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) or choose another path"
        raise FileExistsError(msg)
    cell_types = [str(c) for c in cell_types]
    labels = [str(x) for x in labels]
    n = len(labels)
    if n == 0:
        msg = "no entries to store"
        raise ValueError(msg)
    if len(cell_types) != n:
        msg = f"{n} labels but {len(cell_types)} cell types"
        raise ValueError(msg)
    pairs = [(ct, canonical_label(lab)) for ct, lab in zip(cell_types, labels, strict=True)]
    dupes = sorted(p for p, c in Counter(pairs).items() if c > 1)
    if dupes:
        msg = f"{len(dupes)} (cell type, label) pairs appear more than once, e.g. {dupes[:5]}"
        raise ValueError(msg)

    # Leakage guard first: a refused build must leave nothing behind.
    forbidden_pairs = [(str(ct), str(lab)) for ct, lab in forbidden_pairs]
    forbidden = {(ct, canonical_label(lab)) for ct, lab in forbidden_pairs}
    leaked = sorted(set(pairs) & forbidden)
    if leaked:
        msg = (
            f"refusing to build: {len(leaked)} entries are held-out (cell type, perturbation) pairs of split "
            f"{split_id!r}: {leaked[:20]}{' ...' if len(leaked) > 20 else ''}; drop them from the store"
        )
        raise LeakageError(msg)
    held_out_hash, held_out_count = hash_pairs(forbidden_pairs)

    d = gene_embeddings.dim
    if keys is None:
        vectors, ok = gene_embeddings.perturbation_vectors([parse_label(lab) for lab in labels])
        if not ok.all():
            missing = [labels[i] for i in np.flatnonzero(~ok)]
            msg = f"{len(missing)} labels have genes without an embedding, e.g. {missing[:10]}; drop those entries"
            raise ValueError(msg)
        keys = vectors
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.shape != (n, d):
        msg = f"keys have shape {keys.shape}, expected ({n}, {d}) (entries, gene embedding dimension)"
        raise ValueError(msg)
    if not np.isfinite(keys).all():
        msg = "keys contain NaN or inf"
        raise ValueError(msg)
    norms = np.linalg.norm(keys, axis=1)
    if np.abs(norms - 1).max() > _UNIT_NORM_TOL:
        msg = f"keys must be L2-normalised (norms range {norms.min():.4g}..{norms.max():.4g}); use l2_normalize"
        raise ValueError(msg)

    entry_arrays = {}
    for name, arr in arrays.items():
        arr = _check_array(arr, f"array {_check_name(name, 'array')!r}")
        if arr.ndim == 0 or arr.shape[0] != n:
            msg = f"array {name!r} has shape {arr.shape}; its first axis must be the {n} entries"
            raise ValueError(msg)
        entry_arrays[name] = arr
    extras = {_check_name(k, "extra"): _check_array(v, f"extra {k!r}") for k, v in (extras or {}).items()}
    extras_meta = {k: dict(v) for k, v in (extras_meta or {}).items()}
    if set(extras_meta) - set(extras):
        msg = f"extras_meta names extras that are not given: {sorted(set(extras_meta) - set(extras))}"
        raise ValueError(msg)
    attrs = dict(attrs or {})
    attrs_text = _json_text(attrs, "attrs")
    extras_text = _json_text({k: extras_meta.get(k, {}) for k in extras}, "extras_meta")
    feature_names = attrs.get("feature_names")
    spec = IndexSpec(type=index_type, **dict(index_params or {}))

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        np.save(tmp / KEYS_NAME, keys)
        (tmp / ARRAYS_DIR).mkdir()
        for name, arr in entry_arrays.items():
            np.save(tmp / ARRAYS_DIR / f"{name}.npy", arr)
        (tmp / EXTRAS_DIR).mkdir()
        for name, arr in extras.items():
            np.save(tmp / EXTRAS_DIR / f"{name}.npy", arr)
        entries = {"cell_types": cell_types, "labels": labels}
        (tmp / ENTRIES_NAME).write_text(_json_text(entries, "entries"), encoding="utf-8")
        (tmp / ATTRS_NAME).write_text(attrs_text, encoding="utf-8")
        (tmp / EXTRAS_META_NAME).write_text(extras_text, encoding="utf-8")
        gene_embeddings.save_npz(tmp / EMBEDDINGS_NAME)
        write_faiss_index(build_faiss_index(keys, spec, rng=rng), tmp / INDEX_NAME)
        checksums, sizes = checksum_directory(tmp)
        manifest = Manifest(
            embedding_source=gene_embeddings.source,
            embedding_dim=d,
            n_genes=len(gene_embeddings),
            gene_list_hash=hash_strings(gene_embeddings.symbols),
            split_id=str(split_id),
            held_out_count=held_out_count,
            held_out_hash=held_out_hash,
            n_entries=n,
            cell_types=dict(sorted(Counter(cell_types).items())),
            arrays={k: {"dtype": v.dtype.str, "shape": list(v.shape[1:])} for k, v in entry_arrays.items()},
            extras={k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in extras.items()},
            feature_names_hash=hash_strings(feature_names) if feature_names is not None else None,
            index_type=spec.type,
            index_params=spec.params(n),
            checksums=checksums,
            sizes=sizes,
        )
        manifest.write(tmp)
    logger.info(
        "wrote store %s: %d entries, %d arrays, %s index, split %r (%d held-out pairs) in %.2fs",
        out_dir, n, len(entry_arrays), spec.type, split_id, held_out_count, time.perf_counter() - start,
    )  # fmt: skip
    return out_dir


# --- reading -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    """One batch of search results, the same in process and over HTTP.

    Attributes
    ----------
    scores
        ``(n, k)`` float32, best first; ``-inf`` at padding.
    ids
        ``(n, k)`` int64; ``-1`` at padding.
    cell_types, labels
        ``(n, k)`` object arrays of str; None at padding.
    profiles
        Name -> ``(n, k, ...)`` arrays of the requested per-entry arrays; padding rows are NaN (float) or 0.
    """

    scores: np.ndarray
    ids: np.ndarray
    cell_types: np.ndarray
    labels: np.ndarray
    profiles: dict[str, np.ndarray] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"{path}: unreadable ({err}); {REBUILD_HINT}"
        raise StoreCorruptedError(msg) from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        msg = f"{path}: unreadable array ({err}); {REBUILD_HINT}"
        raise StoreCorruptedError(msg) from None


class Store:
    """An opened index directory: search by vector or label, fetch cached profiles. Use :meth:`open`.

    The same methods, with the same signatures and return types, exist on
    :class:`retrieval_service.client.RetrievalClient`, so callers can use either.
    """

    def __init__(
        self,
        *,
        directory: Path,
        manifest: Manifest,
        index: RetrievalIndex,
        arrays: Mapping[str, np.ndarray],
        extras: Mapping[str, np.ndarray],
        extras_meta: Mapping[str, dict[str, Any]],
        attrs: Mapping[str, Any],
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self._arrays = dict(arrays)
        self._extras = dict(extras)
        self._extras_meta = dict(extras_meta)
        self.attrs = dict(attrs)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        verify: bool = True,
        backend: str = "auto",
        device: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
        prefilter: bool | None = None,
    ) -> Store:
        """Open an index directory written by :func:`build_store`.

        Parameters
        ----------
        directory
            The index directory.
        verify
            Check every file's sha256 against the manifest (reads each byte once; sizes are always checked).
        backend, device
            See :class:`retrieval_service.index.RetrievalIndex`.
        nprobe, ef_search
            Override the manifest's search parameters of ``ivf`` / ``hnsw``.
        prefilter
            The exact 8-bit prefilter of one-query ``flat`` searches (see :class:`RetrievalIndex`): None builds it
            from 8,192 keys up (at 200k keys of 1536-d: 309 MB more memory, ~7 s more to open), False never.

        Raises
        ------
        FileNotFoundError, StoreMismatchError, StoreCorruptedError
            With a message saying what differs; the fix is to rebuild with ``ptrag index build``.
        """
        start = time.perf_counter()
        directory = Path(directory)
        manifest = Manifest.load(directory, verify=verify)
        n, d = manifest.n_entries, manifest.embedding_dim
        problems = []

        entries = _read_json(directory / ENTRIES_NAME)
        cell_types, labels = entries.get("cell_types", []), entries.get("labels", [])
        if len(cell_types) != n or len(labels) != n:
            problems.append(f"{ENTRIES_NAME} has {len(cell_types)}/{len(labels)} rows, manifest says {n}")
        elif dict(sorted(Counter(cell_types).items())) != manifest.cell_types:
            problems.append(f"{ENTRIES_NAME} cell type counts differ from the manifest")
        keys = _load_npy(directory / KEYS_NAME)
        if keys.shape != (n, d) or keys.dtype != np.float32:
            problems.append(f"{KEYS_NAME} is {keys.dtype} {keys.shape}, manifest says float32 ({n}, {d})")
        arrays = {}
        for name, meta in manifest.arrays.items():
            arr = _load_npy(directory / ARRAYS_DIR / f"{name}.npy")
            if arr.shape != (n, *meta["shape"]) or arr.dtype.str != meta["dtype"]:
                problems.append(f"array {name!r} is {arr.dtype.str} {arr.shape}, manifest says {meta}")
            arrays[name] = arr
        extras = {}
        for name, meta in manifest.extras.items():
            arr = _load_npy(directory / EXTRAS_DIR / f"{name}.npy")
            if list(arr.shape) != meta["shape"] or arr.dtype.str != meta["dtype"]:
                problems.append(f"extra {name!r} is {arr.dtype.str} {arr.shape}, manifest says {meta}")
            extras[name] = arr
        try:
            embeddings = GeneEmbeddings.from_npz(directory / EMBEDDINGS_NAME)
        except ValueError as err:
            msg = f"{err}; {REBUILD_HINT}"
            raise StoreCorruptedError(msg) from None
        if embeddings.dim != d or hash_strings(embeddings.symbols) != manifest.gene_list_hash:
            problems.append(f"{EMBEDDINGS_NAME} (dim {embeddings.dim}) does not match the manifest's gene list")
        if problems:
            msg = f"{directory} is inconsistent: {'; '.join(problems)}; {REBUILD_HINT}"
            raise StoreCorruptedError(msg)

        spec = IndexSpec.from_params(manifest.index_type, manifest.index_params)
        # A flat index on CPU is searched exactly in numpy over the memory-mapped keys: skip reading a second
        # copy of them from index.faiss unless FAISS will be used.
        faiss_index = None
        if needs_faiss(manifest.index_type, backend=backend, device=device):
            try:
                faiss_index = read_faiss_index(directory / INDEX_NAME)
            except ValueError as err:
                msg = f"{err}; {REBUILD_HINT}"
                raise StoreCorruptedError(msg) from None
            if faiss_index.ntotal != n or faiss_index.d != d:
                msg = f"{INDEX_NAME} holds {faiss_index.ntotal}x{faiss_index.d}, manifest says {n}x{d}; {REBUILD_HINT}"
                raise StoreCorruptedError(msg)
        index = RetrievalIndex(
            keys,
            cell_types=cell_types,
            labels=labels,
            embeddings=embeddings,
            faiss_index=faiss_index,
            spec=spec,
            backend=backend,
            device=device,
            prefilter=prefilter,
        )
        index.set_search_params(nprobe=nprobe, ef_search=ef_search)
        extras_meta = _read_json(directory / EXTRAS_META_NAME)
        attrs = _read_json(directory / ATTRS_NAME)
        logger.info("opened store %s (%d entries) in %.2fs", directory, n, time.perf_counter() - start)
        return cls(
            directory=directory,
            manifest=manifest,
            index=index,
            arrays=arrays,
            extras=extras,
            extras_meta=extras_meta,
            attrs=attrs,
        )

    # --- description ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.manifest.n_entries

    def __repr__(self) -> str:
        m = self.manifest
        return f"Store({str(self.directory)!r}, n={m.n_entries}, d={m.embedding_dim}, index={m.index_type})"

    def info(self) -> dict[str, Any]:
        """The manifest as a dict (what ``GET /info`` returns)."""
        return self.manifest.to_dict()

    @property
    def array_names(self) -> list[str]:
        return list(self._arrays)

    @property
    def extra_names(self) -> list[str]:
        return list(self._extras)

    @property
    def cell_types(self) -> np.ndarray:
        """``(N,)`` object array of each entry's cell type."""
        return self.index.cell_types

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` object array of each entry's perturbation label."""
        return self.index.labels

    def check_split(self, split_id: str, held_out_pairs: Iterable[tuple[str, str]]) -> None:
        """Refuse (``StoreMismatchError``) a store built for another split or other held-out pairs."""
        self.manifest.check_split(split_id, held_out_pairs)

    def check_features(self, feature_names: Iterable[str]) -> None:
        """Refuse (``StoreMismatchError``) profiles built over other features."""
        self.manifest.check_features(feature_names)

    # --- lookup ---------------------------------------------------------------------------------------------

    def _ids(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
            msg = f"ids must be integers, got dtype {arr.dtype}"
            raise InvalidQueryError(msg)
        arr = arr.astype(np.int64, copy=False)
        bad = (arr < -1) | (arr >= len(self))
        if bad.any():
            msg = f"ids must be in [0, {len(self)}) (or -1 for padding); got {np.unique(arr[bad])[:10].tolist()}"
            raise InvalidQueryError(msg)
        return arr

    def get(self, ids: Any, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Per-entry arrays for ``ids``.

        Parameters
        ----------
        ids
            Int array of any shape ``S`` (e.g. ``(n, k)`` from a search); ``-1`` gives a padding row.
        names
            Arrays to fetch; None fetches all (:attr:`array_names`).

        Returns
        -------
        dict
            Name -> in-memory array of shape ``S + entry shape`` and the stored dtype. Padding rows are NaN
            for float arrays and 0 otherwise.
        """
        arr_ids = self._ids(ids)
        names = self.array_names if names is None else [str(x) for x in names]
        unknown = [x for x in names if x not in self._arrays]
        if unknown:
            msg = f"unknown profile array(s) {unknown}; the store has {self.array_names}"
            raise InvalidQueryError(msg)
        flat = arr_ids.reshape(-1)
        pad = flat < 0
        out = {}
        for name in names:
            src = self._arrays[name]
            rows = np.asarray(src[np.where(pad, 0, flat)])  # fancy indexing copies out of the memmap
            if pad.any():
                rows[pad] = np.nan if rows.dtype.kind in "fc" else 0
            out[name] = rows.reshape(*arr_ids.shape, *src.shape[1:])
        return out

    def entries(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Cell types and labels of ``ids`` (any shape), as object arrays with None at ``-1``."""
        arr_ids = self._ids(ids)
        pad = arr_ids < 0
        cts = np.where(pad, None, self.cell_types[np.where(pad, 0, arr_ids)])
        labs = np.where(pad, None, self.labels[np.where(pad, 0, arr_ids)])
        return cts.astype(object), labs.astype(object)

    def extra(self, name: str) -> np.ndarray:
        """A per-store array (memory-mapped)."""
        if name not in self._extras:
            msg = f"unknown extra {name!r}; the store has {self.extra_names}"
            raise InvalidQueryError(msg)
        return self._extras[name]

    def extra_meta(self, name: str) -> dict[str, Any]:
        """The JSON metadata stored with an extra."""
        self.extra(name)
        return dict(self._extras_meta.get(name, {}))

    def ids_for(self, pairs: Iterable[tuple[str, str]]) -> np.ndarray:
        """``(m,)`` int64 ids of (cell type, label) pairs; ``-1`` where absent. See ``RetrievalIndex.ids_for``."""
        return self.index.ids_for(pairs)

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
        """``(scores, ids)``, each ``(n, k)``; see :meth:`RetrievalIndex.search`."""
        return self.index.search(
            queries, k, exclude=exclude, cell_types=cell_types, exclude_cell_types=exclude_cell_types
        )

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
        """``(scores, ids)`` for perturbation labels; see :meth:`RetrievalIndex.search_labels`."""
        return self.index.search_labels(
            labels,
            k,
            exclude=exclude,
            cell_types=cell_types,
            exclude_cell_types=exclude_cell_types,
            exclude_self_cell_type=exclude_self_cell_type,
        )

    def query(
        self,
        *,
        k: int,
        genes: Sequence[str] | None = None,
        vectors: np.ndarray | None = None,
        exclude: Collection[int] | Sequence[Collection[int]] | np.ndarray | None = None,
        cell_types: str | Iterable[str] | None = None,
        exclude_cell_types: str | Iterable[str] | None = None,
        exclude_self_cell_type: str | None = None,
        return_profiles: Iterable[str] = (),
    ) -> SearchResult:
        """Search by labels (``genes``) or ``vectors`` and describe the hits; what ``POST /search`` does.

        Exactly one of ``genes`` and ``vectors``. ``exclude_self_cell_type`` needs ``genes``.
        ``return_profiles`` names per-entry arrays to return for every hit.
        """
        if (genes is None) == (vectors is None):
            msg = "give exactly one of genes (perturbation labels) and vectors"
            raise InvalidQueryError(msg)
        return_profiles = list(return_profiles)
        unknown = [x for x in return_profiles if x not in self._arrays]
        if unknown:  # before searching: a typo should not cost a search
            msg = f"unknown profile array(s) {unknown}; the store has {self.array_names}"
            raise InvalidQueryError(msg)
        filters = {"exclude": exclude, "cell_types": cell_types, "exclude_cell_types": exclude_cell_types}
        if genes is not None:
            scores, ids = self.search_labels(genes, k, exclude_self_cell_type=exclude_self_cell_type, **filters)
        else:
            if exclude_self_cell_type is not None:
                msg = "exclude_self_cell_type needs queries by gene (labels), not vectors"
                raise InvalidQueryError(msg)
            scores, ids = self.search(vectors, k, **filters)
        cts, labs = self.entries(ids)
        profiles = self.get(ids, return_profiles) if return_profiles else {}
        return SearchResult(scores=scores, ids=ids, cell_types=cts, labels=labs, profiles=profiles)


def open_store(directory: str | os.PathLike[str], **kwargs: Any) -> Store:
    """Shorthand for :meth:`Store.open`."""
    return Store.open(directory, **kwargs)
