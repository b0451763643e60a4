"""Exact top-k that reads a quarter of the bytes: 8-bit codes pick a shortlist, float32 decides, a bound certifies.

Why: one query against a flat index is a matrix-vector product, bound by memory bandwidth, not arithmetic: 20k keys
of 1536-d are 123 MB of float32 per query (~5 ms with two threads on the 2-core machine we measured). A copy of the
keys in 8-bit scalar-quantised codes (FAISS ``IndexScalarQuantizer``, one byte per dimension, a per-dimension range)
is 31 MB; scanning it in shards on parallel threads picks a shortlist, which is rescored exactly from the float32
keys.

Certificate (so the result is the exact top-k, not an approximation): each key ``x`` decodes to ``x̂`` with
``||x - x̂|| = r_x``, measured when the codes are built. For a query ``q``, Cauchy-Schwarz gives
``|q·x - q·x̂| <= ||q|| r_x``. The shortlist is the ``R`` keys with the largest ``q·x̂``; let ``t`` be the k-th best
exact score among its allowed, non-excluded keys. Every key outside it has ``q·x <= q·x̂_R + ||q|| max(r) + slack``,
where ``x̂_R`` is the R-th shortlisted key and the slack covers float32 rounding in both scans. When that is below
``t``, nothing outside the shortlist can enter the top k; otherwise the caller fetches a larger shortlist or scans
exactly. Random unit keys (no structure, the worst case) need about 1% of 20k keys rescored for k=16.
"""

from __future__ import annotations

import logging
import math
import os

import faiss
import numpy as np

__all__ = ["PREFILTER_MIN_KEYS", "Int8Prefilter", "PrefilterQuery"]

logger = logging.getLogger(__name__)

PREFILTER_MIN_KEYS = 8192  # below this the float32 keys are few MB, cache-friendly: the plain scan is as fast
_THREADED_SUCCESSIVE_IDS = (True, True)  # IndexShards: search shards on parallel threads; ids run on across shards
_SHARD_MIN_KEYS = 4096  # a shard smaller than this costs more in thread start-up than it saves


class Int8Prefilter:
    """8-bit codes of ``(N, d)`` float32 keys, scanned by one of two backends, and a bound on their error.

    ``backend="onednn"``: each key is rounded to int8 on per-dimension ranges (as FAISS ``QT_8bit``: a few large
    dimensions, as in GenePT ada-002 vectors, do not make one coarse step for all); the query is split into two
    7-bit rows (the query and its rounding error, magnified), and torch's oneDNN int8 matmul (VNNI where the
    processor has it) scores both rows in one pass over the codes: on the 2-core machine (20k x 1536, two threads)
    1.4-1.6 ms, where FAISS' 8-bit scan took 2.6-3.0 ms. Integer accumulation is exact; 7-bit rows keep
    even the non-VNNI instruction path (``vpmaddubsw``) from saturating; the backend checks itself against a
    float64 product when built.
    ``backend="faiss"``: FAISS ``IndexScalarQuantizer`` codes, in ``shards`` indexes searched on parallel threads;
    used when torch or its oneDNN int8 operator is missing or fails the check. ``"auto"`` picks oneDNN when usable.

    Ids are row numbers of ``keys``. Memory: ``N * d`` bytes of codes plus a few float32 per key. The FAISS
    quantiser is trained on at most ``train_rows`` rows; a key outside their range is clipped, which its measured
    residual accounts for (the oneDNN codes take their ranges from all keys: nothing clips).
    """

    def __init__(
        self,
        keys: np.ndarray,
        *,
        shards: int | None = None,
        train_rows: int = 65_536,
        block: int = 65_536,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "onednn", "faiss"):
            msg = f"prefilter backend must be auto, onednn or faiss, got {backend!r}"
            raise ValueError(msg)
        n, d = keys.shape
        self.d = d
        self.ntotal = n
        self.residual = np.empty(n, np.float32)  # (N,) ||x - x̂||
        self._scan: _OneDNNScan | _FaissScan | None = None
        if backend in ("auto", "onednn"):
            try:
                self._scan = _OneDNNScan(keys, self.residual, block=block)
            except _BackendUnavailable as err:
                if backend == "onednn":
                    raise
                logger.info("int8 prefilter: oneDNN scan unavailable (%s); using FAISS 8-bit codes", err)
        if self._scan is None:
            self._scan = _FaissScan(keys, self.residual, shards=shards, train_rows=train_rows, block=block)
        self.backend = self._scan.name
        self.qtype = self._scan.qtype
        self.max_residual = float(self.residual.max(initial=0.0))
        # float32 accumulation over d terms errs by at most ~d * 2^-24 * ||q|| ||x|| (in each of the two scans).
        self._rounding = 2.0 * d * 2.0**-24 * self._scan.largest

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.d + self._scan.bytes_per_key * self.ntotal

    @property
    def parts(self) -> list:
        """The FAISS shards (empty for the oneDNN backend)."""
        return getattr(self._scan, "parts", [])

    def query(self, q: np.ndarray) -> PrefilterQuery:
        """One query ``(d,)``: its shortlists and bounds (the oneDNN backend scores every key once, here)."""
        return PrefilterQuery(self, np.ascontiguousarray(q, dtype=np.float32))


class PrefilterQuery:
    """A query against an :class:`Int8Prefilter`: shortlists of any size and the bounds that certify them."""

    def __init__(self, pre: Int8Prefilter, q: np.ndarray) -> None:
        self.pre, self.q = pre, q
        self.norm = float(np.linalg.norm(q))
        # (N,) float32 or None; the query-side error per unit of code norm; float32 rounding of the scores
        self.scores, self.error, self.slack = pre._scan.score_all(q)

    def shortlist(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """``(r,)`` approximate scores and ids of the ``r`` best keys, best first."""
        return self.pre._scan.shortlist(self.q, self.scores, min(r, self.pre.ntotal))

    def key_bound(self, ids: np.ndarray) -> np.ndarray:
        """Bound on ``|q·x - approx|`` for the keys ``ids``."""
        pre = self.pre
        return self.norm * (pre.residual[ids] + pre._rounding) + self.error * pre._scan.code_norm(ids) + self.slack

    def outside_bound(self, last_approx: float) -> float:
        """Bound on the exact score of any key outside a shortlist whose worst approximate score is
        ``last_approx``."""
        pre = self.pre
        bound = self.norm * (pre.max_residual + pre._rounding) + self.error * pre._scan.max_code_norm + self.slack
        return last_approx + bound


class _BackendUnavailable(RuntimeError):
    pass


class _OneDNNScan:
    """Per-dimension 8-bit codes of the keys (as FAISS ``QT_8bit``), scanned with torch's oneDNN int8 matmul.

    Key ``x`` is stored as int8 ``c`` with ``x̂ = b + D c`` (``D`` the per-dimension step, range / 255, ``b`` the
    middle of the range), so ``q·x̂ = q·b + (q D)·c``. The query part ``q' = q D`` is written as two rows of 7-bit
    integers with one scale ``h``: ``u1 = round(q' / h)`` and ``u2 = round(M (q' - h u1) / h)``, ``M = 126``, so that
    ``q' ~ h u1 + h u2 / M`` to within ``h / (2M)`` per dimension; the matmul returns both rows' products with every
    code in one pass, exactly in integers. The approximate score's error against ``q·x̂`` is at most ``||q' - h u1 -
    h u2 / M|| * ||c||`` (Cauchy-Schwarz), computed per query (returned by :meth:`score_all`) and per key
    (:meth:`code_norm`).
    """

    name = "onednn"
    qtype = "int8, per-dimension ranges"
    bytes_per_key = 8  # residual, code norm
    _LEVELS = 63  # 7-bit rows: |u| <= 63, zero point 64, so u8 values stay in [1, 127]
    _MAGNIFY = 126  # |q' - h u1| <= h / 2, so M (q' - h u1) / h fits in the 63 levels

    def __init__(self, keys: np.ndarray, residual: np.ndarray, *, block: int) -> None:
        try:
            import torch

            qlinear = torch.ops.onednn.qlinear_pointwise.default  # the overload itself: no resolution per call
            prepack = torch.ops.onednn.qlinear_prepack
        except (ImportError, AttributeError, RuntimeError) as err:
            msg = f"torch with oneDNN int8 operators is not installed ({err})"
            raise _BackendUnavailable(msg) from err
        n, d = keys.shape
        self._torch, self._qlinear = torch, qlinear
        # The ranges of all keys, not of a sample: a clipped key's residual would loosen the bound for every query
        # (at 200k random keys, ranges from 65k rows clipped enough keys that no certificate held).
        lo, hi = np.zeros(d), np.ones(d)
        for start in range(0, n, block):
            x = np.asarray(keys[start : start + block], dtype=np.float64)
            lo = x.min(axis=0) if start == 0 else np.minimum(lo, x.min(axis=0))
            hi = x.max(axis=0) if start == 0 else np.maximum(hi, x.max(axis=0))
        # A constant dimension gets a step far below its value, so that its offset stays the value itself.
        self.step = np.where(hi > lo, (hi - lo) / 255.0, np.maximum(np.abs(lo), 1e-30) * 2.0**-20)  # (d,) D
        self.offset = lo + 128.0 * self.step  # (d,) b: code 0 is the middle of the range
        codes = np.empty((n, d), np.int8)
        self.norm = np.empty(n, np.float32)  # (N,) ||c||
        largest = 1.0
        for start in range(0, n, block):
            x = np.asarray(keys[start : start + block], dtype=np.float64)
            c = np.clip(np.rint((x - self.offset) / self.step), -128, 127)  # guards float rounding at the ends
            x_hat = self.offset + self.step * c
            codes[start : start + len(x)] = c.astype(np.int8)
            self.norm[start : start + len(x)] = np.linalg.norm(c, axis=1)  # integers: exact enough in float32
            # Rounded up a little: the bound must not be undercut by float32 rounding of the stored residuals.
            residual[start : start + len(x)] = np.linalg.norm(x - x_hat, axis=1) * (1 + 1e-6) + 1e-12
            largest = max(largest, float(np.linalg.norm(x_hat, axis=1).max(initial=0.0)))
        self.largest = largest
        self.max_code_norm = float(self.norm.max(initial=0.0))
        try:
            self._w_scale = torch.ones(n, dtype=torch.float32)
            self._w_zp = torch.zeros(n, dtype=torch.int32)
            self._packed = prepack(torch.from_numpy(codes), [2, d])
            self._check(codes)
        except _BackendUnavailable:
            raise
        except Exception as err:  # an operator that exists but does not run on this build or processor
            msg = f"the oneDNN int8 matmul failed here ({type(err).__name__}: {err})"
            raise _BackendUnavailable(msg) from err

    def _rows(self, q: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``(2, d)`` uint8 rows, their scale ``h``, and ``||q' - h u1 - h u2 / M||`` (float64)."""
        qs = q.astype(np.float64) * self.step
        peak = float(np.abs(qs).max(initial=0.0))
        h = np.float32(peak / self._LEVELS if peak > 0 else 1.0)  # float32: what score_all multiplies by
        u1 = np.clip(np.rint(qs / h), -self._LEVELS, self._LEVELS)
        u2 = np.clip(np.rint(self._MAGNIFY * (qs - h * u1) / h), -self._LEVELS, self._LEVELS)
        left = float(np.linalg.norm(qs - float(h) * u1 - float(h) * u2 / self._MAGNIFY))
        rows = np.stack([u1, u2]) + (self._LEVELS + 1)
        return rows.astype(np.uint8), float(h), left

    def score_all(self, q: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``(N,)`` float32 approximate scores of one query ``(d,)``, its query-side error per unit of code norm,
        and a bound on the float32 rounding of the scores: ``q·b`` and the products can be large and cancel (a
        range far from zero), so their own size, not the score's, sets it."""
        rows, h, left = self._rows(q)
        torch = self._torch
        # Scale 1: the integer sums come back as they are and h is applied here. oneDNN caches the primitive per
        # scale, so a scale that changes with every query rebuilt it on every call (+1.1 ms of 2.5 at 20k keys).
        with torch.inference_mode():
            out = self._qlinear(torch.from_numpy(rows), 1.0, self._LEVELS + 1, self._packed, self._w_scale,
                                self._w_zp, None, 1.0, 0, torch.float32, "none", [], "")  # fmt: skip
        out = out.numpy()
        qb = float(q.astype(np.float64) @ self.offset)
        scores = np.float32(qb) + np.float32(h) * (out[0] + out[1] / np.float32(self._MAGNIFY))
        # |h o1| <= h 63 ||c||_1 <= h 63 sqrt(d) max||c||, h o2 likewise; seven float32 roundings of at most that size
        size = abs(qb) + 2 * h * self._LEVELS * math.sqrt(self.step.size) * self.max_code_norm + 1e-30
        return scores, left * (1 + 1e-6), 8 * 2.0**-24 * size

    def shortlist(self, q: np.ndarray, scores: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``r`` best of a query's :meth:`score_all` scores, best first, ties by id (``q`` is not rescanned)."""
        top = np.argpartition(scores, scores.size - r)[scores.size - r :] if r < scores.size else np.arange(r)
        order = np.lexsort((top, -scores[top]))
        return scores[top[order]], top[order]

    def code_norm(self, ids: np.ndarray) -> np.ndarray:
        return self.norm[ids]

    def _check(self, codes: np.ndarray) -> None:
        """The operator against float64 on up to 2,048 keys and three queries (saturation, a wrong zero point or
        scale layout would show here), within float32 rounding."""
        rng = np.random.default_rng(0)
        m = min(len(codes), 2048)
        c = codes[:m].astype(np.float64)
        d = self.step.size
        for q in (rng.standard_normal(d), np.ones(d), -np.ones(d)):
            rows, h, _ = self._rows(q)
            ref = (rows.astype(np.float64) - (self._LEVELS + 1)) * h @ c.T
            ref = q @ self.offset + ref[0] + ref[1] / self._MAGNIFY
            got = self.score_all(q)[0][:m].astype(np.float64)
            tol = 1e-5 * (1.0 + np.abs(q @ self.offset) + h * self._LEVELS * np.abs(c).sum(axis=1).max())
            if not np.all(np.abs(got - ref) <= tol):
                worst = float(np.abs(got - ref).max())
                msg = f"the oneDNN int8 matmul disagrees with float64 by {worst:.3g}"
                raise _BackendUnavailable(msg)


class _FaissScan:
    """FAISS 8-bit scalar-quantizer codes in ``shards`` indexes searched on parallel threads."""

    name = "faiss"
    bytes_per_key = 4  # residual

    def __init__(self, keys: np.ndarray, residual: np.ndarray, *, shards: int | None, train_rows: int, block: int):
        n, d = keys.shape
        if shards is None:  # one per core, each of at least _SHARD_MIN_KEYS keys
            shards = max(1, min(os.cpu_count() or 1, 8, n // _SHARD_MIN_KEYS))
        shards = max(1, min(int(shards), n))
        self.bounds = np.linspace(0, n, shards + 1).astype(np.int64)  # shard s holds rows bounds[s]:bounds[s+1]
        sq, self.qtype = _train_quantizer(_sample_rows(keys, train_rows))
        largest = 1.0  # the largest ||x̂|| (at least 1), for the rounding slack
        parts = []
        for s in range(shards):
            index = faiss.IndexScalarQuantizer(
                d, getattr(faiss.ScalarQuantizer, self.qtype), faiss.METRIC_INNER_PRODUCT
            )
            index.sq = sq
            index.is_trained = True
            lo, hi = int(self.bounds[s]), int(self.bounds[s + 1])
            for start in range(lo, hi, block):  # encode in blocks: no full decoded copy of the keys
                x = np.ascontiguousarray(keys[start : min(start + block, hi)], dtype=np.float32)
                codes = sq.compute_codes(x)
                x_hat = sq.decode(codes)
                residual[start : start + len(x)] = np.linalg.norm(x - x_hat, axis=1)
                largest = max(largest, float(np.linalg.norm(x_hat, axis=1).max(initial=0.0)))
                index.add_sa_codes(codes)
            parts.append(index)
        self.parts = parts
        self.largest = largest
        self.max_code_norm = 0.0
        self.index: faiss.Index
        if shards == 1:
            self.index = parts[0]
        else:
            self.index = faiss.IndexShards(d, *_THREADED_SUCCESSIVE_IDS)
            for p in parts:
                self.index.add_shard(p)

    def score_all(self, q: np.ndarray) -> tuple[None, float, float]:  # FAISS scans per shortlist; q as given
        return None, 0.0, 0.0

    def shortlist(self, q: np.ndarray, scores: None, r: int) -> tuple[np.ndarray, np.ndarray]:
        approx, ids = self.index.search(q[None], r)
        return approx[0], ids[0]

    def code_norm(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids), np.float32)


def _train_quantizer(sample: np.ndarray) -> tuple[faiss.ScalarQuantizer, str]:
    """One range for all dimensions (``QT_8bit_uniform``, 20-45% faster to scan here) unless per-dimension ranges
    (``QT_8bit``) cut the worst residual on ``sample`` by more than 2.5x. Measured worst-residual ratios: random
    unit keys 1.4 and MiniLM gene-text embeddings (projected to 1536-d) 1.9, where the uniform scan won (3.2 vs
    4.7 ms at 20k keys, certificates still held for 95 of 100 first shortlists); GenePT ada-002 vectors 16, where a
    few large dimensions would make one coarse step for all and the bound useless."""
    d = sample.shape[1]
    trained = {}
    for name in ("QT_8bit_uniform", "QT_8bit"):
        sq = faiss.ScalarQuantizer(d, getattr(faiss.ScalarQuantizer, name))
        sq.train(sample)
        err = float(np.linalg.norm(sample - sq.decode(sq.compute_codes(sample)), axis=1).max(initial=0.0))
        trained[name] = (sq, err)
    uniform, per_dim = trained["QT_8bit_uniform"], trained["QT_8bit"]
    if uniform[1] <= 2.5 * per_dim[1]:
        return uniform[0], "QT_8bit_uniform"
    return per_dim[0], "QT_8bit"


def _sample_rows(keys: np.ndarray, m: int) -> np.ndarray:
    """At most ``m`` rows spread evenly over ``keys`` (a memory-mapped array is read only there)."""
    n = keys.shape[0]
    if n <= m:
        return np.ascontiguousarray(keys, dtype=np.float32)
    step = math.ceil(n / m)
    return np.ascontiguousarray(keys[::step], dtype=np.float32)
