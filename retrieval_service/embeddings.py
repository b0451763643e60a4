"""Gene embeddings: a symbol -> vector table (GenePT or any other source), plain numpy.

The retrieval keys of PT-RAG are gene embeddings. A multi-gene perturbation ``A+B`` is keyed by the sum of its
genes' vectors (the GenePert convention), L2-normalised like every key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval_service.atomic import atomic_path

__all__ = ["GeneEmbeddings", "l2_normalize"]

logger = logging.getLogger(__name__)


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of an ``(n, d)`` array, returned as a new float32 array."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


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
    """

    symbols: tuple[str, ...]
    vectors: np.ndarray
    source: str = "unknown"
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
        object.__setattr__(self, "symbols", symbols)
        object.__setattr__(self, "vectors", vectors)
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

    def subset(self, symbols: Iterable[str]) -> GeneEmbeddings:
        """The rows for ``symbols`` (all must be present), in that order."""
        symbols = list(symbols)
        rows = [self._row[s] for s in symbols]
        return GeneEmbeddings(tuple(symbols), self.vectors[rows], self.source)

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

    # --- persistence: .npz with `symbols`, `vectors`, `source` ---------------------------------------------

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Write ``symbols`` (unicode), ``vectors`` (float32) and ``source`` to ``path`` atomically."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                symbols=np.asarray(self.symbols, dtype=str),
                vectors=self.vectors,
                source=np.asarray(self.source),
            )
        return path

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[float]], *, source: str) -> GeneEmbeddings:
        symbols = list(mapping)
        if not symbols:
            msg = f"no genes in embeddings from {source!r}"
            raise ValueError(msg)
        return cls(tuple(symbols), np.asarray([mapping[s] for s in symbols], dtype=np.float32), source)
