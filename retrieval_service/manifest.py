"""The manifest of an index directory: what was built, from what, and the checksum of every file.

A store is only trusted when its ``manifest.json`` matches this code's format version and every file's
sha256. Anything else is refused with a message that says what differs and what to do (rebuild with
``ptrag index build``); a half-written or hand-edited directory is never half-loaded.

Errors (all ``ValueError`` subclasses, so the CLI prints them as one line)::

    ValueError
     └── StoreError                 a store directory cannot be used as it is
          ├── StoreCorruptedError    a file is missing, truncated, or its sha256 differs from the manifest
          ├── StoreMismatchError     format version, dimension, split or feature names differ from what's asked
          └── LeakageError           an entry is a held-out (cell type, perturbation) pair of the split
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retrieval_service.atomic import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "MANIFEST_NAME",
    "REBUILD_HINT",
    "LeakageError",
    "Manifest",
    "StoreCorruptedError",
    "StoreError",
    "StoreMismatchError",
    "canonical_label",
    "checksum_directory",
    "file_sha256",
    "hash_pairs",
    "hash_strings",
    "list_files",
    "package_version",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_TYPES = ("flat", "ivf", "hnsw")
REBUILD_HINT = "rebuild the index directory with `ptrag index build`"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class StoreError(ValueError):
    """A store directory that cannot be used as it is (base class)."""


class StoreCorruptedError(StoreError):
    """A file of the store is missing, has the wrong size, or its sha256 differs from the manifest."""


class StoreMismatchError(StoreError):
    """The store was built for something else: format version, key dimension, split, or feature names."""


class LeakageError(StoreError):
    """An entry of the store is a held-out (cell type, perturbation) pair of the split it is built for."""


# --- hashing -----------------------------------------------------------------------------------------------


def hash_strings(items: Iterable[str]) -> str:
    """``"sha256:<hex>"`` of an ordered list of strings (order matters: it is the row order of a table)."""
    payload = json.dumps([str(s) for s in items], ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def canonical_label(label: str) -> str:
    """A perturbation label with its genes sorted: ``"B+A"`` and ``"A+B"`` name the same perturbation."""
    return "+".join(sorted(g.strip() for g in str(label).split("+")))


def hash_pairs(pairs: Iterable[tuple[str, str]]) -> tuple[str, int]:
    """Order-free hash and count of a set of (cell type, perturbation label) pairs.

    Labels are canonicalised (:func:`canonical_label`) so that ``A+B`` and ``B+A`` hash alike.
    """
    canon = sorted({(str(ct), canonical_label(lab)) for ct, lab in pairs})
    return hash_strings(f"{ct}\t{lab}" for ct, lab in canon), len(canon)


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """``"sha256:<hex>"`` of a file, read in 4 MiB chunks so large profile arrays never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def package_version() -> str:
    """The installed ``ptrag`` version, or ``"0+unknown"`` when running from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptrag")
    except PackageNotFoundError:
        return "0+unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the manifest ------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True, frozen=True)
class Manifest:
    """Everything needed to decide whether a store directory can serve a request, as ``manifest.json``."""

    format_version: int = FORMAT_VERSION
    """On-disk layout version; a store of another version is refused, never migrated silently."""
    embedding_source: str
    """Where the gene embedding table (and so the keys) came from, e.g. ``"genept-ada-002"``."""
    embedding_dim: int
    """Key dimension ``d``; every query must have it."""
    n_genes: int
    """Rows of the stored gene embedding table."""
    gene_list_hash: str
    """:func:`hash_strings` of the embedding table's symbols, in row order."""
    split_id: str
    """Id of the train/test split the entries were drawn from."""
    held_out_count: int
    """Number of held-out (cell type, perturbation) pairs of that split, none of which is an entry."""
    held_out_hash: str
    """:func:`hash_pairs` of those pairs, so a loaded store can be checked against a split."""
    n_entries: int
    """Number of entries ``N``; ids are ``0..N-1``."""
    cell_types: dict[str, int]
    """Entries per cell type."""
    arrays: dict[str, dict[str, Any]]
    """Per-entry arrays: name -> ``{"dtype": str, "shape": [...]}``, the shape of one entry's array."""
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-store arrays: name -> ``{"dtype": str, "shape": [...]}`` of the whole array."""
    feature_names_hash: str | None = None
    """:func:`hash_strings` of ``attrs["feature_names"]`` (the genes of the profiles) when given."""
    index_type: str = "flat"
    """``"flat"`` (exact inner product), ``"ivf"`` or ``"hnsw"``."""
    index_params: dict[str, Any] = field(default_factory=dict)
    """Build and search parameters of the index (``nlist``, ``nprobe``, ``M``, ``ef_search``...)."""
    built_at: str = field(default_factory=_now)
    """UTC time of the build, ISO 8601."""
    package_version: str = field(default_factory=package_version)
    """``ptrag`` version that built the store."""
    checksums: dict[str, str] = field(default_factory=dict)
    """Relative path -> ``"sha256:<hex>"`` for every file of the directory except the manifest."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Relative path -> size in bytes (a cheap check when checksums are not verified)."""

    def __post_init__(self) -> None:
        problems = []
        if self.format_version != FORMAT_VERSION:
            problems.append(f"format_version {self.format_version} (this code reads {FORMAT_VERSION})")
        if self.embedding_dim < 1:
            problems.append(f"embedding_dim {self.embedding_dim} < 1")
        if self.n_genes < 1:
            problems.append(f"n_genes {self.n_genes} < 1")
        if self.n_entries < 1:
            problems.append(f"n_entries {self.n_entries} < 1")
        if self.held_out_count < 0:
            problems.append(f"held_out_count {self.held_out_count} < 0")
        if not str(self.split_id):
            problems.append("empty split_id")
        if self.index_type not in INDEX_TYPES:
            problems.append(f"index_type {self.index_type!r} not in {INDEX_TYPES}")
        if sum(self.cell_types.values()) != self.n_entries:
            problems.append(f"cell_types count {sum(self.cell_types.values())} != n_entries {self.n_entries}")
        hashes = {"gene_list_hash": self.gene_list_hash, "held_out_hash": self.held_out_hash}
        if self.feature_names_hash is not None:
            hashes["feature_names_hash"] = self.feature_names_hash
        hashes.update({f"checksums[{k!r}]": v for k, v in self.checksums.items()})
        bad = [f"{name} {value!r}" for name, value in hashes.items() if not _HASH_RE.match(str(value))]
        problems += [f"{b} is not 'sha256:<64 hex>'" for b in bad]
        if set(self.sizes) != set(self.checksums):
            problems.append("sizes and checksums name different files")
        if problems:
            msg = f"invalid manifest: {'; '.join(problems)}"
            raise StoreMismatchError(msg)

    # --- (de)serialisation ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "manifest") -> Manifest:
        """Build from a parsed ``manifest.json``; the format version is checked before anything else."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            msg = (
                f"{source}: store format version {version!r}, but this code reads version {FORMAT_VERSION}; "
                f"{REBUILD_HINT}"
            )
            raise StoreMismatchError(msg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in _REQUIRED)
        if unknown or missing:
            msg = f"{source}: manifest fields unknown {unknown} / missing {missing}; {REBUILD_HINT}"
            raise StoreMismatchError(msg)
        try:
            return cls(**dict(data))
        except StoreMismatchError as err:
            msg = f"{source}: {err}; {REBUILD_HINT}"
            raise StoreMismatchError(msg) from None

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` into ``directory`` atomically; returns its path."""
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, verify: bool = True) -> Manifest:
        """Read ``directory/manifest.json`` and check the files it lists.

        Parameters
        ----------
        directory
            An index directory written by :func:`retrieval_service.store.build_store`.
        verify
            Compare every file's sha256 with the manifest (reads every byte once). Without it only the
            presence and size of each file are checked.

        Raises
        ------
        FileNotFoundError
            When ``directory`` or its manifest does not exist.
        StoreMismatchError
            For another format version or an invalid manifest.
        StoreCorruptedError
            For a missing, resized or altered file.
        """
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            msg = f"index directory {directory} does not exist"
            raise FileNotFoundError(msg)
        if not path.is_file():
            msg = f"{directory} is not an index directory (no {MANIFEST_NAME}); {REBUILD_HINT}"
            raise FileNotFoundError(msg)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = f"{path}: unreadable manifest ({err}); {REBUILD_HINT}"
            raise StoreCorruptedError(msg) from None
        if not isinstance(data, dict):
            msg = f"{path}: manifest is a {type(data).__name__}, expected a JSON object; {REBUILD_HINT}"
            raise StoreCorruptedError(msg)
        manifest = cls.from_dict(data, source=str(path))
        manifest.verify_files(directory, checksums=verify)
        return manifest

    # --- checks ---------------------------------------------------------------------------------------------

    def verify_files(self, directory: str | os.PathLike[str], *, checksums: bool = True) -> None:
        """Check that every listed file exists with its size (and sha256 when ``checksums``).

        Files present on disk but not in the manifest are logged as a warning, not refused: they are not
        read, so they cannot change results.
        """
        directory = Path(directory)
        bad = []
        for rel, expected in sorted(self.checksums.items()):
            path = directory / rel
            if not path.is_file():
                bad.append(f"{rel}: missing")
                continue
            size = path.stat().st_size
            if size != self.sizes[rel]:
                bad.append(f"{rel}: {size} bytes, manifest says {self.sizes[rel]}")
                continue
            if checksums and (actual := file_sha256(path)) != expected:
                bad.append(f"{rel}: sha256 {actual[7:19]}..., manifest says {expected[7:19]}...")
        if bad:
            msg = f"{directory} is corrupted ({'; '.join(bad)}); {REBUILD_HINT}"
            raise StoreCorruptedError(msg)
        extra = sorted(set(list_files(directory)) - set(self.checksums))
        if extra:
            logger.warning("%s: files not in the manifest are ignored: %s", directory, extra[:10])

    def check_dim(self, dim: int) -> None:
        """``StoreMismatchError`` unless query vectors of dimension ``dim`` fit this store."""
        if int(dim) != self.embedding_dim:
            msg = (
                f"queries have dimension {dim} but the store's keys have dimension {self.embedding_dim} "
                f"({self.embedding_source}); use the same gene embedding table or {REBUILD_HINT}"
            )
            raise StoreMismatchError(msg)

    def check_split(self, split_id: str, held_out_pairs: Iterable[tuple[str, str]]) -> None:
        """``StoreMismatchError`` unless the store was built for split ``split_id`` with these held-out pairs.

        Using a store built for another split could put a test perturbation among the candidates.
        """
        digest, count = hash_pairs(held_out_pairs)
        problems = []
        if str(split_id) != self.split_id:
            problems.append(f"split id {self.split_id!r}, asked for {split_id!r}")
        if (digest, count) != (self.held_out_hash, self.held_out_count):
            problems.append(f"{self.held_out_count} held-out pairs recorded, {count} given, hashes differ")
        if problems:
            msg = f"store built for another split: {'; '.join(problems)}; {REBUILD_HINT} for this split"
            raise StoreMismatchError(msg)

    def check_features(self, feature_names: Iterable[str]) -> None:
        """``StoreMismatchError`` unless the profiles were built over exactly these features, in order."""
        digest = hash_strings(feature_names)
        if digest != self.feature_names_hash:
            msg = (
                f"the store's profiles are over other features (hash {str(self.feature_names_hash)[:19]}..., "
                f"asked {digest[:19]}...); {REBUILD_HINT}"
            )
            raise StoreMismatchError(msg)


_REQUIRED = {
    "embedding_source",
    "embedding_dim",
    "n_genes",
    "gene_list_hash",
    "split_id",
    "held_out_count",
    "held_out_hash",
    "n_entries",
    "cell_types",
    "arrays",
    "checksums",
    "sizes",
}


def list_files(directory: str | os.PathLike[str]) -> list[str]:
    """Relative POSIX paths of every file under ``directory`` except the manifest, sorted."""
    directory = Path(directory)
    out = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    return sorted(p for p in out if p != MANIFEST_NAME)


def checksum_directory(directory: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, int]]:
    """sha256 and size of every file under ``directory`` except the manifest."""
    directory = Path(directory)
    checksums, sizes = {}, {}
    for rel in list_files(directory):
        checksums[rel] = file_sha256(directory / rel)
        sizes[rel] = (directory / rel).stat().st_size
    return checksums, sizes
