"""The retrieval service over HTTP, seen through the :class:`retrieval_service.store.Store` interface that training
and prediction use (``--retrieval-url``).

The service returns ids, entries and cached profiles; the candidates' key vectors, which the model takes as input,
are recomputed here from the same gene embedding table the service was built from (checked against its
manifest's gene-list hash), so the remote and in-process paths feed the model identical tensors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import numpy as np

from model.index_build import perturbation_keys
from retrieval_service.client import RetrievalClient
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.manifest import Manifest, hash_strings

__all__ = ["RemoteStore"]

_BLOCK = 4096  # ids per request when fetching entries and profiles (the service caps rows per request)


class _IndexView:
    """What callers read from ``Store.index``: the embedding table, cell-type names and the keys."""

    def __init__(self, embeddings: GeneEmbeddings, cell_types: np.ndarray, keys: np.ndarray) -> None:
        self.embeddings = embeddings
        self.cell_type_names = sorted({str(c) for c in cell_types})
        self.keys = keys

    def suggest(self, genes: Iterable[str], *, n: int = 3) -> dict[str, list[str]]:
        symbols = list(self.embeddings.symbols)
        return {g: difflib.get_close_matches(g, symbols, n=n, cutoff=0.6) for g in genes}


class RemoteStore:
    """A :class:`RetrievalClient` plus the gene embedding table, usable wherever a ``Store`` is."""

    def __init__(self, client: RetrievalClient, embeddings: GeneEmbeddings, *, control_label: str) -> None:
        self.client = client
        self.manifest = Manifest.from_dict(client.info(), source="the retrieval service's /info")
        if embeddings.dim != self.manifest.embedding_dim or hash_strings(embeddings.symbols) != (
            self.manifest.gene_list_hash
        ):
            msg = (
                f"--embeddings ({embeddings.source}, dim {embeddings.dim}) is not the gene table the retrieval "
                f"service was built with ({self.manifest.embedding_source}, dim {self.manifest.embedding_dim})"
            )
            raise ValueError(msg)
        n = self.manifest.n_entries
        cts, labels = [], []
        for start in range(0, n, _BLOCK):
            c, lab = client.entries(np.arange(start, min(start + _BLOCK, n)))
            cts.append(c)
            labels.append(lab)
        self.cell_types = np.concatenate(cts).astype(object)
        self.labels = np.concatenate(labels).astype(object)
        keys, ok, missing = perturbation_keys([str(x) for x in self.labels], embeddings, control_label=control_label)
        if not ok.all():
            msg = f"service entries have genes without an embedding in --embeddings: {missing[:10]}"
            raise ValueError(msg)
        self.index = _IndexView(embeddings, self.cell_types, keys)

    def __len__(self) -> int:
        return self.manifest.n_entries

    def close(self) -> None:
        """Close the HTTP client (its connection pool)."""
        self.client.close()

    def __del__(self) -> None:  # a Predictor holds its store for its whole life; release the sockets with it
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def check_split(self, split_id: str, held_out_pairs: Iterable[tuple[str, str]]) -> None:
        self.manifest.check_split(split_id, held_out_pairs)

    def check_features(self, feature_names: Iterable[str]) -> None:
        self.manifest.check_features(feature_names)

    def search(self, queries: np.ndarray, k: int, **filters: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.client.search(queries, k, **filters)

    def ids_for(self, pairs: Iterable[tuple[str, str]]) -> np.ndarray:
        pairs = list(pairs)
        return self.client.ids_for(pairs) if pairs else np.zeros(0, dtype=np.int64)

    def entries(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.client.entries(ids)

    def get(self, ids: Any, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        parts = [self.client.get(flat[s : s + _BLOCK], names) for s in range(0, max(flat.size, 1), _BLOCK)]
        return {k: np.concatenate([p[k] for p in parts]).reshape(*ids.shape, *parts[0][k].shape[1:]) for k in parts[0]}
