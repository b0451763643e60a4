"""Exact inner-product scores and per-row top-k on the CPU, for the ``flat`` index's exact path.

Two or more queries go through torch (MKL's sgemm and ``torch.topk``), one query through numpy (OpenBLAS).
Why: with each library's idle threads given time to stop spinning before the other runs (see
``benchmarks/retrieval_bench.py``), torch's product plus top-k took 0.47-0.84x the time of numpy's for 4 to 256
queries against 2k and 20k keys of 1536-d, and numpy's argpartition alone cost ~1.7 ms of a 256 x 2000 top-k
that ``torch.topk`` does in ~1.2 ms. One query is a matrix-vector product, bound by memory, where both libraries
are alike and numpy's call costs less. Without torch everything goes through numpy.

:func:`topk` returns the first ``k`` of each row in the order (score descending, column ascending), ties at the
cut included: its result depends on the row's values alone, not on how a partial sort happened to split equal
scores. That matters because equal scores are common here (one gene perturbed in several cell types is one key
stored several times), and a partial sort over a batch and over one query may keep different members of a tie.

Returned arrays are numpy and writable (the exact path masks scores in place).
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import numpy as np

__all__ = [
    "GROUP",
    "TORCH_GROUP",
    "TORCH_MIN_QUERIES",
    "TORCH_TWO_STAGE_MIN_ROWS",
    "partial_topk",
    "score_matrix",
    "topk",
]

TORCH_MIN_QUERIES = 2  # from here on torch's product and top-k; a single query stays with numpy
GROUP = 32  # columns per group in numpy's two-stage top-k of wide score rows
TORCH_GROUP = 8  # the same for torch's, which takes it from TORCH_TWO_STAGE_MIN_ROWS rows
TORCH_TWO_STAGE_MIN_ROWS = 128


@functools.cache
def _torch() -> ModuleType | None:
    try:
        import torch
    except ImportError:
        return None
    # Wrapping a read-only array (the store's memory-mapped keys) makes torch warn, once per process, that its
    # tensor cannot be read-only; this module only reads through it. The one warning is taken here, silenced,
    # instead of surfacing in some later search (where an application's warning filters may turn it into an error).
    readonly = np.zeros(1, np.float32)
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(readonly)
    return torch


def score_matrix(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``q @ keys.T``: q (n, E), keys (b, E) float32 -> (n, b) C-contiguous, writable float32."""
    torch = _torch() if q.shape[0] >= TORCH_MIN_QUERIES else None
    if torch is not None:
        with torch.inference_mode():
            return torch.mm(torch.from_numpy(q), torch.from_numpy(keys).T).numpy()  # (n, b)
    if 2 <= q.shape[0] <= 32:
        # OpenBLAS's kernels for a short left operand ran 1.4-2.2x slower than the other orientation (one thread,
        # 1k-20k keys; e.g. 8 queries x 1,168 keys 1.9 vs 0.9 ms): the serving micro-batcher's case.
        return np.ascontiguousarray((keys @ q.T).T)
    return q @ keys.T


def topk(scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns (int64) and values of the first ``kk`` entries of each row of ``(n, b)`` scores, best first, equal
    scores in column order, ties at the cut going to the lower columns: ``(n, min(kk, b))`` each.

    A partial sort keeps ``kk + 1`` entries: a row has a tie at the cut exactly when its ``kk``-th and
    ``(kk + 1)``-th largest scores are equal, and only such rows are settled from the full row.
    """
    n, b = scores.shape
    kk = min(kk, b)
    m = min(kk + 1, b)
    if n == 1 and 0 < kk < b < 8 * m * GROUP:  # one narrow row: 1-D calls, ~20 us less than the 2-D forms
        row = scores[0]
        pos = np.argpartition(row, b - m)[b - m :]  # (m,)
        order = np.lexsort((pos, -row[pos]))  # best first, equal scores in column order
        pos = _settle_cut(row, pos[order], kk)
        return pos[None].astype(np.int64, copy=False), row[pos][None]
    pos, vals = partial_topk(scores, m)  # (n, m) each, best first: fresh arrays
    # Equal scores among a row's best go to column order. Only rows that have them are sorted again: sorting every
    # row by (score, column) took a third of the top-k at 256 x 2,000 (0.5 of 1.5 ms).
    tied = np.flatnonzero((vals[:, 1:] == vals[:, :-1]).any(axis=1))
    if tied.size:
        order = np.lexsort((pos[tied], -vals[tied]), axis=1)
        pos[tied], vals[tied] = np.take_along_axis(pos[tied], order, 1), np.take_along_axis(vals[tied], order, 1)
    if kk < m:
        for r in np.flatnonzero(vals[:, kk - 1] == vals[:, kk]):  # a tie at the cut
            pos[r, :kk] = _settle_cut(scores[r], pos[r], kk)
            vals[r, :kk] = scores[r, pos[r, :kk]]
    return np.ascontiguousarray(pos[:, :kk]).astype(np.int64, copy=False), np.ascontiguousarray(vals[:, :kk])


def _settle_cut(row: np.ndarray, pos: np.ndarray, kk: int) -> np.ndarray:
    """The first ``kk`` of ``pos``, the ``m > kk`` best columns of ``row`` sorted best first (equal scores in
    column order), or when the ``kk``-th and the next score are equal (a tie at the cut, which may reach
    columns outside ``pos``), the entries above the tie plus its lowest columns, in the same order."""
    if kk >= pos.size or row[pos[kk - 1]] != row[pos[kk]]:
        return pos[:kk]
    cut = row[pos[kk - 1]]
    above = pos[: np.count_nonzero(row[pos] > cut)]  # already in order
    return np.concatenate([above, np.flatnonzero(row == cut)[: kk - above.size]])


def partial_topk(scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Column positions (int64) and values of ``kk`` largest per row of ``(n, b)`` scores, best first, as fresh
    arrays; which of several entries tied at the cut are kept, and the order of equal values, are unspecified (see
    :func:`topk`)."""
    n, b = scores.shape
    if b <= kk:
        pos, vals = np.broadcast_to(np.arange(b), (n, b)), scores
    else:
        torch = _torch() if n >= TORCH_MIN_QUERIES else None
        if torch is not None:
            return _topk_torch(torch, scores, kk)
        pos, vals = _topk_numpy(scores, kk)
    order = np.argsort(-vals, axis=1)
    return np.take_along_axis(pos, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _topk_torch(torch: ModuleType, scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`partial_topk` with torch, for ``kk < b``."""
    n, b = scores.shape
    with torch.inference_mode():
        s = torch.from_numpy(scores)
        if n < TORCH_TWO_STAGE_MIN_ROWS or b < 8 * kk * TORCH_GROUP:
            vals, pos = torch.topk(s, kk, dim=1, sorted=True)  # (n, kk) each
            return pos.numpy(), vals.numpy()
        # Two stages over strided groups, as in _topk_numpy: ~0.8 vs 1.1 ms at 256 x 2,000, 1.8 vs 6.2 ms at
        # 256 x 20,000 (k=17, two threads); slower than one topk for few rows.
        m = b // TORCH_GROUP
        group_max = s[:, : m * TORCH_GROUP].view(n, TORCH_GROUP, m).amax(dim=1)  # (n, m)
        top = torch.topk(group_max, kk, dim=1, sorted=False).indices  # (n, kk) groups
        cols = (top[:, :, None] + torch.arange(TORCH_GROUP) * m).reshape(n, kk * TORCH_GROUP)
        if m * TORCH_GROUP < b:  # the last columns are in no group: always candidates
            cols = torch.cat([cols, torch.arange(m * TORCH_GROUP, b).expand(n, b - m * TORCH_GROUP)], dim=1)
        vals, pos = torch.topk(torch.gather(s, 1, cols), kk, dim=1, sorted=True)
        return torch.gather(cols, 1, pos).numpy(), vals.numpy()


def _topk_numpy(scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """``kk`` largest per row in numpy, in no order (:func:`partial_topk` sorts them).

    Wide rows take two stages, about 8x faster than one ``argpartition`` at 200k columns. The columns are
    split into ``m`` groups ``{c, c+m, c+2m, ...}``; the ``kk`` groups with the largest maxima hold ``kk``
    largest scores, because their ``kk`` maxima are distinct scores at least as large as anything in the other
    groups. A max over such strided groups is an elementwise max of contiguous row slices (vectorised, unlike
    a max over many short axes), and the final partial sort only sees ``kk * GROUP`` candidates.
    """
    n, b = scores.shape
    if b < 8 * kk * GROUP:
        pos = np.argpartition(scores, b - kk, axis=1)[:, b - kk :]
        return pos, np.take_along_axis(scores, pos, axis=1)
    m = b // GROUP
    group_max = scores[:, : m * GROUP].reshape(n, GROUP, m).max(axis=1)  # (n, m)
    top = np.argpartition(group_max, m - kk, axis=1)[:, m - kk :]  # (n, kk) groups
    cols = (top[:, :, None] + np.arange(GROUP) * m).reshape(n, kk * GROUP)
    if m * GROUP < b:  # the last b mod GROUP columns are in no group: always candidates
        rest = np.broadcast_to(np.arange(m * GROUP, b), (n, b - m * GROUP))
        cols = np.concatenate([cols, rest], axis=1)
    vals = np.take_along_axis(scores, cols, axis=1)
    pos = np.argpartition(vals, vals.shape[1] - kk, axis=1)[:, vals.shape[1] - kk :]
    return np.take_along_axis(cols, pos, axis=1), np.take_along_axis(vals, pos, axis=1)
