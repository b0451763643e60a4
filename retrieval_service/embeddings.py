"""Gene embeddings: a symbol -> vector table (GenePT or any other source), plain numpy.

The retrieval keys of PT-RAG are gene embeddings. A multi-gene perturbation ``A+B`` is keyed by the sum of its
genes' vectors (the GenePert convention), L2-normalised like every key.

Loading (:func:`load_embeddings`) understands the GenePT release formats: a pickle ``{symbol: list[float]}``
(or a pickled pandas DataFrame/Series), a CSV/TSV with the symbols in the first column (optionally
gzipped), and the project's own ``.npz`` (:meth:`GeneEmbeddings.save_npz`). Genes a dataset perturbs but the
table lacks are resolved through an alias map (:func:`load_aliases`, :func:`aliases_from_gene_text`) and
otherwise reported by name (:meth:`GeneEmbeddings.coverage`); they are never filled with random vectors.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval_service.atomic import atomic_path

__all__ = [
    "CoverageReport",
    "GeneEmbeddings",
    "Lookup",
    "aliases_from_gene_text",
    "l2_normalize",
    "load_aliases",
    "load_embeddings",
    "merge_embeddings",
]

logger = logging.getLogger(__name__)

_FORMATS = ("pickle", "csv", "tsv", "npz")
# Errors that a truncated or corrupt file surfaces as, depending on which layer notices first.
_READ_ERRORS = (
    EOFError,
    OSError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zlib.error,
    UnicodeDecodeError,
    AttributeError,  # unpickling a class that no longer exists
    ImportError,
    IndexError,
    TypeError,
    KeyError,
)


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of an ``(n, d)`` array, returned as a new float32 array."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Lookup:
    """The result of :meth:`GeneEmbeddings.lookup`.

    Attributes
    ----------
    vectors
        ``(n_found, d)`` float32, one row per name in ``found``, in query order.
    found
        The query names that got a vector (as asked, not as stored).
    via_alias
        ``{query name: table symbol}`` for the found names that resolved through the alias map.
    missing
        Query names with no vector, in query order.
    """

    vectors: np.ndarray
    found: list[str]
    via_alias: dict[str, str]
    missing: list[str]


@dataclass(frozen=True)
class CoverageReport:
    """How many of a list of genes (e.g. a dataset's perturbed genes) have an embedding.

    Attributes
    ----------
    n_query
        Number of distinct query genes.
    n_found
        How many of them have a vector, directly or through an alias.
    n_via_alias
        How many of the found ones needed an alias.
    missing
        The genes with no vector, sorted.
    alias_used
        ``{query gene: table symbol}`` for the genes found through an alias.
    fraction
        ``n_found / n_query`` (1.0 for an empty query).
    source
        The embedding table's ``source``.
    """

    n_query: int
    n_found: int
    n_via_alias: int
    missing: list[str]
    alias_used: dict[str, str]
    fraction: float
    source: str = "unknown"

    def summary(self, *, max_names: int = 20) -> str:
        """One paragraph for logs and the CLI, naming up to ``max_names`` missing genes and aliases."""
        lines = [
            f"embedding coverage ({self.source}): {self.n_found}/{self.n_query} genes "
            f"({100 * self.fraction:.1f}%), {self.n_via_alias} through an alias"
        ]
        if self.alias_used:
            pairs = [f"{q}->{s}" for q, s in sorted(self.alias_used.items())]
            more = f" (+{len(pairs) - max_names} more)" if len(pairs) > max_names else ""
            lines.append(f"  aliases used: {', '.join(pairs[:max_names])}{more}")
        if self.missing:
            more = f" (+{len(self.missing) - max_names} more)" if len(self.missing) > max_names else ""
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing[:max_names])}{more}")
        return "\n".join(lines)


@dataclass(frozen=True)
class GeneEmbeddings:
    """A table of gene vectors.

    Attributes
    ----------
    symbols
        Gene symbols, unique, length ``n``.
    vectors
        ``(n, d)`` float32, finite.
    source
        Where the vectors came from (e.g. ``"genept-ada-002"``, ``"simulated"``).
    gene_sources
        Optional per-gene provenance, length ``n``, for tables merged from several sources
        (:func:`merge_embeddings`); ``None`` means every row comes from ``source``.
    """

    symbols: tuple[str, ...]
    vectors: np.ndarray
    source: str = "unknown"
    gene_sources: tuple[str, ...] | None = None
    _row: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        symbols = tuple(str(s) for s in self.symbols)
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 2:
            msg = f"embedding vectors must be 2-D (n_genes, dim), got shape {vectors.shape}"
            raise ValueError(msg)
        if vectors.shape[0] != len(symbols):
            msg = f"{len(symbols)} symbols but {vectors.shape[0]} vectors"
            raise ValueError(msg)
        row: dict[str, int] = {}
        dupes = []
        for i, s in enumerate(symbols):
            if s in row:
                dupes.append(s)
            row[s] = i
        if dupes:
            msg = f"duplicate gene symbols in embeddings: {sorted(set(dupes))[:10]}"
            raise ValueError(msg)
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            names = [symbols[i] for i in np.flatnonzero(bad)[:10]]
            msg = f"{int(bad.sum())} embedding vectors contain NaN or inf (e.g. {names}); fix or drop them"
            raise ValueError(msg)
        gene_sources = self.gene_sources
        if gene_sources is not None:
            gene_sources = tuple(str(s) for s in gene_sources)
            if len(gene_sources) != len(symbols):
                msg = f"{len(symbols)} symbols but {len(gene_sources)} gene_sources"
                raise ValueError(msg)
        object.__setattr__(self, "symbols", symbols)
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "gene_sources", gene_sources)
        object.__setattr__(self, "_row", row)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._row

    def vector(self, symbol: str) -> np.ndarray:
        """The ``(d,)`` vector of one gene; ``KeyError`` naming the gene when absent."""
        try:
            return self.vectors[self._row[symbol]]
        except KeyError:
            msg = f"gene {symbol!r} has no embedding in {self.source!r}"
            raise KeyError(msg) from None

    def source_of(self, symbol: str) -> str:
        """Where one gene's vector came from: its ``gene_sources`` entry, else the table's ``source``."""
        if symbol not in self._row:
            msg = f"gene {symbol!r} has no embedding in {self.source!r}"
            raise KeyError(msg)
        return self.source if self.gene_sources is None else self.gene_sources[self._row[symbol]]

    def subset(self, symbols: Iterable[str]) -> GeneEmbeddings:
        """The rows for ``symbols`` (all must be present), in that order."""
        symbols = list(symbols)
        rows = [self._row[s] for s in symbols]
        sources = None if self.gene_sources is None else tuple(self.gene_sources[r] for r in rows)
        return GeneEmbeddings(tuple(symbols), self.vectors[rows], self.source, sources)

    def perturbation_vectors(
        self, perturbations: Sequence[Sequence[str]], *, normalize: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Key vectors for perturbations given as gene tuples (``("A",)`` or ``("A", "B")``).

        Returns
        -------
        vectors
            ``(n, d)`` float32: the sum of the genes' vectors, L2-normalised when ``normalize``.
        ok
            ``(n,)`` bool: False where any gene of the perturbation lacks an embedding (its row is zero).
        """
        out = np.zeros((len(perturbations), self.dim), dtype=np.float32)
        ok = np.ones(len(perturbations), dtype=bool)
        for i, genes in enumerate(perturbations):
            rows = [self._row.get(g) for g in genes]
            if not genes or any(r is None for r in rows):
                ok[i] = False
                continue
            out[i] = self.vectors[rows].sum(axis=0)
        if normalize:
            out[ok] = l2_normalize(out[ok])
        return out, ok

    # --- alias-aware lookup and coverage ---------------------------------------------------------------

    def resolve(self, gene: str, *, aliases: Mapping[str, str] | None = None) -> str | None:
        """The table symbol that ``gene`` maps to, or ``None``.

        An exact match wins. Otherwise the alias map ``{old: new}`` is tried in both directions, because
        either side may be the outdated one: a dataset may say ``AARS`` where the table has ``AARS1``, and
        GenePT's own table says ``KIAA1804`` where a newer dataset says ``MAP3K21``.
        """
        return self._resolve(gene, aliases, _invert(aliases) if aliases else {})

    def lookup(self, genes: Iterable[str], *, aliases: Mapping[str, str] | None = None, warn: bool = True) -> Lookup:
        """Vectors for ``genes``, resolving old symbols through ``aliases``; missing genes are named.

        Parameters
        ----------
        genes
            Query symbols (duplicates are kept, in order).
        aliases
            Optional ``{old symbol: current symbol}`` map, used in both directions (see :meth:`resolve`).
        warn
            Emit a ``UserWarning`` naming the genes without a vector.

        Returns
        -------
        Lookup
            ``vectors`` ``(n_found, d)`` float32 aligned with ``found``; ``via_alias``; ``missing``.
        """
        genes = [str(g) for g in genes]
        inverse = _invert(aliases) if aliases else {}
        found: list[str] = []
        rows: list[int] = []
        via_alias: dict[str, str] = {}
        missing: list[str] = []
        for g in genes:
            sym = self._resolve(g, aliases, inverse)
            if sym is None:
                missing.append(g)
                continue
            found.append(g)
            rows.append(self._row[sym])
            if sym != g:
                via_alias[g] = sym
        if missing and warn:
            names = sorted(set(missing))
            more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
            msg = (
                f"{len(names)} genes have no embedding in {self.source!r} and are excluded: "
                f"{', '.join(names[:20])}{more}"
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
        vectors = self.vectors[rows] if rows else np.zeros((0, self.dim), dtype=np.float32)
        return Lookup(vectors=vectors, found=found, via_alias=via_alias, missing=missing)

    def coverage(self, genes: Iterable[str], *, aliases: Mapping[str, str] | None = None) -> CoverageReport:
        """Report how many distinct ``genes`` have a vector here (directly or through ``aliases``)."""
        unique = list(dict.fromkeys(str(g) for g in genes))
        res = self.lookup(unique, aliases=aliases, warn=False)
        n = len(unique)
        return CoverageReport(
            n_query=n,
            n_found=len(res.found),
            n_via_alias=len(res.via_alias),
            missing=sorted(res.missing),
            alias_used=dict(sorted(res.via_alias.items())),
            fraction=len(res.found) / n if n else 1.0,
            source=self.source,
        )

    def _resolve(self, gene: str, aliases: Mapping[str, str] | None, inverse: Mapping[str, list[str]]) -> str | None:
        # `inverse` ({new: sorted olds}) is built once per lookup rather than once per gene.
        if gene in self._row:
            return gene
        if not aliases:
            return None
        target = aliases.get(gene)
        if target is not None and target in self._row:
            return target
        olds = [old for old in inverse.get(gene, ()) if old in self._row]
        return olds[0] if olds else None

    # --- persistence: .npz with `symbols`, `vectors`, `source` (and optional `gene_sources`) --------------

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Write ``symbols`` (unicode), ``vectors`` (float32) and ``source`` to ``path`` atomically."""
        path = Path(path)
        extra = {}
        if self.gene_sources is not None:
            extra["gene_sources"] = np.asarray(self.gene_sources, dtype=str)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                symbols=np.asarray(self.symbols, dtype=str),
                vectors=self.vectors,
                source=np.asarray(self.source),
                **extra,
            )
        return path

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str]) -> GeneEmbeddings:
        """Read a table written by :meth:`save_npz`; ``ValueError`` naming the file when it is not one."""
        path = Path(path)
        try:
            # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                keys = set(z.files)
                if not {"symbols", "vectors"} <= keys:
                    msg = (
                        f"{path}: not a gene-embedding .npz (expected arrays 'symbols' and 'vectors', "
                        f"found {sorted(keys)})"
                    )
                    raise ValueError(msg)
                symbols = tuple(str(s) for s in z["symbols"].tolist())
                vectors = z["vectors"]
                source = str(z["source"]) if "source" in keys else path.stem
                gene_sources = tuple(str(s) for s in z["gene_sources"].tolist()) if "gene_sources" in keys else None
        except ValueError as err:
            if str(path) in str(err):
                raise
            msg = f"{path}: could not read gene-embedding .npz ({err})"
            raise ValueError(msg) from err
        except _READ_ERRORS as err:
            msg = f"{path}: could not read gene-embedding .npz ({type(err).__name__}: {err})"
            raise ValueError(msg) from err
        return _build(symbols, vectors, source=source, path=path, gene_sources=gene_sources)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[float]], *, source: str) -> GeneEmbeddings:
        symbols = list(mapping)
        if not symbols:
            msg = f"no genes in embeddings from {source!r}"
            raise ValueError(msg)
        return cls(tuple(symbols), np.asarray([mapping[s] for s in symbols], dtype=np.float32), source)


def _invert(aliases: Mapping[str, str]) -> dict[str, list[str]]:
    inverse: dict[str, list[str]] = {}
    for old, new in sorted(aliases.items()):
        inverse.setdefault(new, []).append(old)
    return inverse


# --- loading ---------------------------------------------------------------------------------------------


def _detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    fmt = {
        ".pkl": "pickle",
        ".pickle": "pickle",
        ".p": "pickle",
        ".csv": "csv",
        ".tsv": "tsv",
        ".txt": "tsv",
        ".npz": "npz",
    }.get(last)
    if fmt is None:
        msg = (
            f"{path}: cannot tell the embedding format from the suffix {''.join(path.suffixes)!r}; "
            f"use .pkl/.pickle, .csv/.tsv (optionally .gz) or .npz, or pass fmt= one of {_FORMATS}"
        )
        raise ValueError(msg)
    return fmt


def load_embeddings(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    source: str | None = None,
    drop_zero: bool = True,
) -> GeneEmbeddings:
    """Load a gene-embedding table in one of the GenePT release formats.

    Parameters
    ----------
    path
        ``.pkl``/``.pickle`` (``{symbol: list[float]}``, or a pickled pandas DataFrame with symbols as the
        index or a Series of vectors), ``.csv``/``.tsv`` (symbols in the first column, one column per
        dimension), each optionally ``.gz``, or ``.npz`` as written by :meth:`GeneEmbeddings.save_npz`.
        Pickles run code when loaded: only load files you trust.
    fmt
        Override the suffix-based detection: ``"pickle"``, ``"csv"``, ``"tsv"`` or ``"npz"``.
    source
        Label for the table; defaults to the stored one (``.npz``) or the file name.
    drop_zero
        Drop all-zero rows with a warning naming them. GenePT files use a zero row as a placeholder for
        ``ctrl``; a zero vector is no embedding, and would otherwise normalise to garbage.

    Returns
    -------
    GeneEmbeddings
        ``(n, d)`` float32 vectors, as stored (not re-normalised).

    Raises
    ------
    ValueError
        Naming the file and what was expected, for an empty, truncated or corrupt file, ragged or
        non-numeric vectors, duplicate symbols, or NaN/inf values.
    FileNotFoundError
        When ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        msg = f"embedding file {path} does not exist"
        raise FileNotFoundError(msg)
    fmt = fmt or _detect_format(path)
    if fmt not in _FORMATS:
        msg = f"unknown embedding format {fmt!r} for {path}; expected one of {_FORMATS}"
        raise ValueError(msg)
    if path.stat().st_size == 0:
        msg = f"{path}: empty file, expected a {fmt} gene-embedding table"
        raise ValueError(msg)

    if fmt == "npz":
        emb = GeneEmbeddings.from_npz(path)
        if source is not None:
            emb = GeneEmbeddings(emb.symbols, emb.vectors, source, emb.gene_sources)
    else:
        reader = _read_pickle if fmt == "pickle" else _read_table
        symbols, vectors = reader(path, fmt)
        emb = _build(symbols, vectors, source=source or _stem(path), path=path)
    if drop_zero:
        emb = _drop_zero_rows(emb, path)
    logger.info("loaded %d gene embeddings (dim %d) from %s", len(emb), emb.dim, path)
    return emb


def _stem(path: Path) -> str:
    name = path.name
    for suffix in reversed(path.suffixes):
        name = name.removesuffix(suffix)
    return name or path.name


def _open_maybe_gz(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix.lower() == ".gz" else open(path, mode)


def _read_pickle(path: Path, fmt: str) -> tuple[list[str], np.ndarray]:
    expected = "a pickled {symbol: vector} dict, pandas DataFrame (symbols as index) or Series of vectors"
    try:
        with _open_maybe_gz(path, "rb") as fh:
            obj = pickle.load(fh)  # trusted files only, as documented in load_embeddings
    except _READ_ERRORS as err:
        msg = f"{path}: truncated or corrupt pickle ({type(err).__name__}: {err}); expected {expected}"
        raise ValueError(msg) from err
    import pandas as pd  # lazily: only pickles and tables need it

    if isinstance(obj, pd.DataFrame):
        frame = obj
        # A frame stored genes-as-columns (dims as a RangeIndex) is the transpose of the usual layout.
        if isinstance(frame.index, pd.RangeIndex) and all(isinstance(c, str) for c in frame.columns):
            frame = frame.T
        return [str(s) for s in frame.index], _numeric(frame.to_numpy(), path, expected)
    if isinstance(obj, pd.Series):
        obj = obj.to_dict()
    if not isinstance(obj, Mapping):
        msg = f"{path}: pickle holds a {type(obj).__name__}; expected {expected}"
        raise ValueError(msg)
    if not obj:
        msg = f"{path}: the pickle holds no genes; expected {expected}"
        raise ValueError(msg)
    symbols = [str(s) for s in obj]
    rows = [np.asarray(v).ravel() if not isinstance(v, str) else None for v in obj.values()]
    lengths = {len(r) if r is not None else -1 for r in rows}
    if len(lengths) != 1 or -1 in lengths:
        dims = np.array([len(r) if r is not None else -1 for r in rows])
        common = int(np.bincount(dims[dims >= 0]).argmax()) if (dims >= 0).any() else 0
        bad = [s for s, d in zip(symbols, dims, strict=True) if d != common]
        msg = (
            f"{path}: ragged vectors, expected every gene to have {common} values; {len(bad)} differ (e.g. {bad[:10]})"
        )
        raise ValueError(msg)
    return symbols, _numeric(np.stack(rows), path, expected)


def _read_table(path: Path, fmt: str) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    sep = "\t" if fmt == "tsv" else ","
    expected = f"a {fmt.upper()} with gene symbols in the first column and one numeric column per dimension"
    try:
        frame = pd.read_csv(path, sep=sep, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, *_READ_ERRORS) as err:
        msg = f"{path}: unreadable {fmt} ({type(err).__name__}: {err}); expected {expected}"
        raise ValueError(msg) from err
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        msg = f"{path}: table of shape {frame.shape} holds no vectors; expected {expected}"
        raise ValueError(msg)
    return [str(s) for s in frame.index], _numeric(frame.to_numpy(), path, expected)


def _numeric(values: np.ndarray, path: Path, expected: str) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        msg = f"{path}: non-numeric embedding values ({err}); expected {expected}"
        raise ValueError(msg) from err
    if out.ndim != 2 or out.shape[1] == 0:
        msg = f"{path}: vectors of shape {out.shape}; expected {expected}"
        raise ValueError(msg)
    return out


def _build(
    symbols: Sequence[str],
    vectors: np.ndarray,
    *,
    source: str,
    path: Path,
    gene_sources: tuple[str, ...] | None = None,
) -> GeneEmbeddings:
    # The constructor's checks (duplicates, NaN, shapes) are the right ones; add which file failed them.
    try:
        return GeneEmbeddings(tuple(symbols), vectors, source, gene_sources)
    except ValueError as err:
        msg = f"{path}: {err}"
        raise ValueError(msg) from err


def _drop_zero_rows(emb: GeneEmbeddings, path: Path) -> GeneEmbeddings:
    zero = ~emb.vectors.any(axis=1)
    if not zero.any():
        return emb
    names = [emb.symbols[i] for i in np.flatnonzero(zero)]
    if zero.all():
        msg = f"{path}: every vector is all-zero ({len(names)} genes); expected real embeddings"
        raise ValueError(msg)
    more = f" (+{len(names) - 20} more)" if len(names) > 20 else ""
    msg = f"{path}: dropped {len(names)} all-zero rows (placeholders, not embeddings): {names[:20]}{more}"
    warnings.warn(msg, UserWarning, stacklevel=3)
    keep = [s for s, z in zip(emb.symbols, zero, strict=True) if not z]
    return emb.subset(keep)


# --- aliases -------------------------------------------------------------------------------------------

_HEADER_WORDS = {"old", "new", "alias", "aliases", "symbol", "previous", "current", "from", "to", "gene"}


def load_aliases(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read an alias map ``{old symbol: current symbol}``.

    Parameters
    ----------
    path
        JSON (``.json``, optionally ``.gz``) holding an object ``{old: new}``, or a two-column CSV/TSV
        (old, new) with an optional header row whose cells are words like ``old,new`` or
        ``alias,symbol``.

    Returns
    -------
    dict
        ``{old: new}``; identity pairs are dropped.
    """
    path = Path(path)
    if not path.exists():
        msg = f"alias file {path} does not exist"
        raise FileNotFoundError(msg)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    try:
        if suffixes and suffixes[-1] == ".json":
            with _open_maybe_gz(path, "rt") as fh:
                raw = json.load(fh)
            if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
                msg = f"{path}: expected a JSON object {{old symbol: new symbol}} with string values"
                raise ValueError(msg)
            pairs = [(str(k), v) for k, v in raw.items()]
        else:
            import pandas as pd

            sep = "\t" if suffixes and suffixes[-1] in (".tsv", ".txt") else ","
            frame = pd.read_csv(path, sep=sep, header=None, dtype=str, comment="#", keep_default_na=False)
            if frame.shape[1] != 2:
                msg = f"{path}: expected 2 columns (old symbol, new symbol), found {frame.shape[1]}"
                raise ValueError(msg)
            pairs = [(a.strip(), b.strip()) for a, b in frame.itertuples(index=False)]
            if pairs and {pairs[0][0].lower(), pairs[0][1].lower()} <= _HEADER_WORDS:
                pairs = pairs[1:]
    except (json.JSONDecodeError, *_READ_ERRORS) as err:
        msg = f"{path}: unreadable alias file ({type(err).__name__}: {err})"
        raise ValueError(msg) from err
    except Exception as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        msg = f"{path}: unreadable alias file ({type(err).__name__}: {err})"
        raise ValueError(msg) from err
    return {old: new for old, new in pairs if old and new and old != new}


_AKA = re.compile(r"Also known as (.*?)\.(?:\s|$)")


def aliases_from_gene_text(texts: Mapping[str, str] | str | os.PathLike[str]) -> dict[str, str]:
    """Derive ``{alias: current symbol}`` from gene texts that say ``Also known as A, B.``.

    This is the format of the org.Hs.eg.db gene text (``gene_text_orgHs_GO.json.gz``): keys are current
    symbols and the text lists NCBI synonyms, which include most previous symbols (``AARS`` -> ``AARS1``).
    Aliases that are themselves a current symbol, or that name more than one gene, are left out because
    following them would swap one real gene for another; the one exception is an alias ``X`` shared by
    ``X1`` and others, which is HGNC's ``X`` -> ``X1`` rename (``SARS`` -> ``SARS1``, not ``SARS2``).

    Parameters
    ----------
    texts
        ``{symbol: text}`` or the path of a JSON / JSON.gz file holding it.

    Returns
    -------
    dict
        ``{alias: symbol}``.
    """
    if not isinstance(texts, Mapping):
        path = Path(texts)
        try:
            with _open_maybe_gz(path, "rt") as fh:
                texts = json.load(fh)
        except (json.JSONDecodeError, *_READ_ERRORS) as err:
            msg = f"{path}: unreadable gene-text file ({type(err).__name__}: {err}); expected JSON"
            raise ValueError(msg) from err
        if not isinstance(texts, Mapping):
            msg = f"{path}: expected a JSON object {{symbol: text}}, found {type(texts).__name__}"
            raise ValueError(msg)
    targets: dict[str, set[str]] = {}
    for symbol, text in texts.items():
        m = _AKA.search(text) if isinstance(text, str) else None
        if m is None:
            continue
        for alias in m.group(1).split(","):
            alias = alias.strip()
            if alias and alias != symbol:
                targets.setdefault(alias, set()).add(symbol)
    out: dict[str, str] = {}
    for alias, symbols in targets.items():
        if alias in texts:
            continue
        if len(symbols) > 1:
            # HGNC renamed e.g. the tRNA synthetases SARS -> SARS1, and the old name is then also a synonym
            # of a paralog (SARS2); the `<alias>1` rename is the one the old symbol meant.
            symbols = {s for s in symbols if s == f"{alias}1"}
        if len(symbols) == 1:
            out[alias] = next(iter(symbols))
    logger.info(
        "derived %d aliases from %d gene texts (%d ambiguous or current-symbol aliases left out)",
        len(out),
        len(texts),
        len(targets) - len(out),
    )
    return out


# --- merging -------------------------------------------------------------------------------------------


def merge_embeddings(
    primary: GeneEmbeddings, fallback: GeneEmbeddings, *, genes: Iterable[str] | None = None
) -> GeneEmbeddings:
    """Fill genes missing from ``primary`` with ``fallback`` vectors of the same dimension.

    Parameters
    ----------
    primary, fallback
        Tables of equal ``dim``. Primary rows always win.
    genes
        Restrict the filled-in genes to these (default: every fallback gene ``primary`` lacks).

    Returns
    -------
    GeneEmbeddings
        All primary rows, then the filled ones; ``source`` is ``"<primary>+<fallback>"`` and
        ``gene_sources`` records each row's origin.
    """
    if primary.dim != fallback.dim:
        msg = (
            f"cannot merge embeddings of different dimension: {primary.source!r} is {primary.dim}-d, "
            f"{fallback.source!r} is {fallback.dim}-d; map one into the other's space first"
        )
        raise ValueError(msg)
    wanted = fallback.symbols if genes is None else list(dict.fromkeys(genes))
    fill = [g for g in wanted if g not in primary and g in fallback]
    prim_sources = primary.gene_sources or (primary.source,) * len(primary)
    fb = fallback.subset(fill)
    fb_sources = fb.gene_sources or (fallback.source,) * len(fb)
    if fill:
        logger.info("filled %d genes from %r into %r", len(fill), fallback.source, primary.source)
    return GeneEmbeddings(
        primary.symbols + fb.symbols,
        np.concatenate([primary.vectors, fb.vectors]),
        f"{primary.source}+{fallback.source}" if fill else primary.source,
        tuple(prim_sources) + tuple(fb_sources),
    )
