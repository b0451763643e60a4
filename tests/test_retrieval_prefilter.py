"""The 8-bit prefilter: its bound holds, and prefiltered searches return what the float32 exact scan returns."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_service.index import RetrievalIndex
from retrieval_service.prefilter import Int8Prefilter, PrefilterQuery
from tests.test_retrieval_index import _check, _valid_mask


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


BACKENDS = ["onednn", "faiss"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 400), shards=st.integers(1, 4), scale=st.floats(0.1, 10))
def test_outside_bound_holds_for_every_key_left_out(backend: str, seed: int, r: int, shards: int, scale: float) -> None:
    # The certificate: no key outside a shortlist scores above outside_bound. Anisotropic keys (a few large
    # dimensions, as in GenePT) and unnormalised queries included.
    rng = np.random.default_rng(seed)
    keys = _unit(rng, 2000, 48)
    keys[:, :3] *= 6.0
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = (_unit(rng, 3, 48) * scale).astype(np.float32)
    pre = Int8Prefilter(keys, shards=shards, backend=backend)
    assert pre.backend == backend
    exact = q.astype(np.float64) @ keys.astype(np.float64).T  # (3, N)
    for i in range(3):
        view = pre.query(q[i])
        approx, ids = view.shortlist(r)
        assert len(set(ids.tolist())) == r and (ids >= 0).all()  # global ids across shards
        outside = np.setdiff1d(np.arange(2000), ids)
        bound = view.outside_bound(approx[-1])
        assert exact[i, outside].max() <= bound
        # and each approximate score is within its key's bound of the true one
        err = np.abs(exact[i, ids] - approx)
        assert (err <= view.key_bound(ids)).all()
        assert (np.diff(approx) <= 0).all()  # best first


def test_residuals_are_measured_not_assumed() -> None:
    rng = np.random.default_rng(1)
    keys = _unit(rng, 500, 32)
    keys[7] *= 40.0  # not among the rows trained on (every 5th): its codes clip, its residual says so
    pre = Int8Prefilter(keys, shards=1, train_rows=100, backend="faiss")
    assert pre.residual[7] > 10 * np.median(pre.residual)
    assert pre.max_residual == pytest.approx(float(pre.residual.max()))


def test_onednn_ranges_cover_every_key() -> None:
    # Ranges from a sample clipped outliers, whose residual then loosened every query's bound (at 200k random
    # keys no certificate held). From all keys, every residual is at most half a step per dimension.
    rng = np.random.default_rng(1)
    keys = _unit(rng, 500, 32)
    keys[7] *= 40.0
    pre = Int8Prefilter(keys, train_rows=100, backend="onednn")
    half_steps = np.linalg.norm(pre._scan.step / 2)
    assert (pre.residual <= half_steps * (1 + 1e-5)).all()
    assert pre.max_residual == pytest.approx(float(pre.residual.max()))


def test_per_dimension_ranges_for_anisotropic_keys() -> None:
    rng = np.random.default_rng(6)
    iso = _unit(rng, 1000, 64)
    aniso = iso.copy()
    aniso[:, :2] *= 100.0  # two dimensions dominate, as in ada-002 embeddings (there: a 16x residual ratio)
    aniso /= np.linalg.norm(aniso, axis=1, keepdims=True)
    assert Int8Prefilter(iso, shards=1, backend="faiss").qtype == "QT_8bit_uniform"
    assert Int8Prefilter(aniso, shards=1, backend="faiss").qtype == "QT_8bit"


def test_onednn_codes_use_per_dimension_ranges() -> None:
    # GenePT ada-002 vectors have a few dimensions far larger than the rest; one int8 step per key would then be
    # coarse for all the others. Per-dimension ranges keep the residual as small as FAISS' QT_8bit codes.
    rng = np.random.default_rng(6)
    aniso = _unit(rng, 1000, 64)
    aniso[:, :2] *= 100.0
    aniso /= np.linalg.norm(aniso, axis=1, keepdims=True)
    ours = Int8Prefilter(aniso, backend="onednn").max_residual
    faiss_per_dim = Int8Prefilter(aniso, shards=1, backend="faiss")
    assert faiss_per_dim.qtype == "QT_8bit"
    assert ours <= 1.05 * faiss_per_dim.max_residual
    s = np.abs(aniso).max(axis=1, keepdims=True) / 127  # one symmetric step per key, for comparison
    per_key = np.linalg.norm(aniso - np.rint(aniso / s) * s, axis=1).max()
    assert ours < per_key / 2


def test_auto_falls_back_to_faiss_when_the_int8_operator_is_missing(monkeypatch) -> None:
    import torch

    class NoOnednn:
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(torch.ops, "onednn", NoOnednn())
    keys = _unit(np.random.default_rng(7), 500, 16)
    assert Int8Prefilter(keys).backend == "faiss"
    with pytest.raises(RuntimeError, match="oneDNN int8"):
        Int8Prefilter(keys, backend="onednn")


def _pair(keys: np.ndarray, cell_types: list[str]) -> tuple[RetrievalIndex, RetrievalIndex]:
    labels = [f"p{i}" for i in range(len(keys))]
    pre = RetrievalIndex(keys, cell_types=cell_types, labels=labels, prefilter=True)
    plain = RetrievalIndex(keys, cell_types=cell_types, labels=labels, prefilter=False)
    assert pre._prefilter is not None and plain._prefilter is None
    return pre, plain


@pytest.mark.parametrize("kind", ["random", "anisotropic", "near_ties"])
def test_prefiltered_search_equals_the_float32_scan(kind: str) -> None:
    rng = np.random.default_rng(2)
    n, d = 6000, 96
    keys = _unit(rng, n, d)
    if kind == "anisotropic":
        keys[:, :4] *= 8.0
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    if kind == "near_ties":  # 300 keys within 1e-3 of each other: certificates must fail and refetch
        base = _unit(rng, 1, d)
        keys[:300] = base + 1e-4 * rng.standard_normal((300, d)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    cts = list(rng.choice(["A", "B", "C"], n))
    pre, plain = _pair(keys, cts)
    queries = np.concatenate([_unit(rng, 6, d), keys[:4] + 0.01 * _unit(rng, 4, d)]).astype(np.float32)
    for kw in ({}, {"exclude": [0, 1, 2, 3]}, {"cell_types": ["A", "B"]}, {"exclude_cell_types": "C"}):
        for k in (1, 16, 100):
            for i in range(len(queries)):
                q = queries[i : i + 1]
                s1, i1 = pre.search(q, k, **kw)
                s2, i2 = plain.search(q, k, **kw)
                np.testing.assert_allclose(s1, s2, atol=2e-6)
                same = i1 == i2
                if not same.all():  # only where float32 rounding reorders equal-looking scores
                    assert np.abs(s1[~same] - s2[~same]).max() < 2e-6
                valid = _valid_mask(1, cts, kw.get("cell_types"), kw.get("exclude_cell_types"),
                                    [kw.get("exclude", [])])  # fmt: skip
                _check(keys, q, k, valid, s1, i1, exact=True)
    stats = pre.prefilter_stats
    assert stats["certified"] > 0
    if kind == "near_ties":
        assert stats["refetched"] + stats["scanned"] > 0  # the bound refused the first shortlists


def test_prefilter_handles_two_queries_and_leaves_batches_to_blas() -> None:
    rng = np.random.default_rng(3)
    keys = _unit(rng, 3000, 32)
    pre, plain = _pair(keys, ["A"] * 3000)
    q = _unit(rng, 2, 32)
    np.testing.assert_array_equal(pre.search(q, 10)[1], plain.search(q, 10)[1])
    assert pre.prefilter_stats["certified"] == 2
    before = dict(pre.prefilter_stats)
    big = _unit(rng, 8, 32)
    np.testing.assert_array_equal(pre.search(big, 10)[1], plain.search(big, 10)[1])
    assert pre.prefilter_stats == before  # eight queries: one BLAS matmul, no prefilter


def test_prefilter_padding_when_fewer_valid_than_k() -> None:
    rng = np.random.default_rng(4)
    keys = _unit(rng, 1000, 16)
    cts = ["A"] * 990 + ["B"] * 10
    pre, plain = _pair(keys, cts)
    q = _unit(rng, 1, 16)
    s, i = pre.search(q, 20, exclude_cell_types="A", exclude=[990])  # 9 valid: narrow filter, plain path
    assert (i[0, :9] >= 990).all() and (i[0, 9:] == -1).all()
    s, i = pre.search(q, 2000, exclude=list(range(5)))  # more than exist: 995 valid, then padding
    ref_s, _ = plain.search(q, 2000, exclude=list(range(5)))
    np.testing.assert_allclose(s, ref_s, atol=2e-6)
    assert (i[0, :995] >= 0).all() and (i[0, 995:] == -1).all() and np.isneginf(s[0, 995:]).all()


def test_default_prefilter_only_for_large_numpy_indexes() -> None:
    rng = np.random.default_rng(5)
    small = _unit(rng, 100, 8)
    assert RetrievalIndex(small, cell_types=["A"] * 100, labels=list(map(str, range(100))))._prefilter is None
    big = _unit(rng, 8192, 8)
    labels = list(map(str, range(8192)))
    assert RetrievalIndex(big, cell_types=["A"] * 8192, labels=labels)._prefilter is not None
    assert RetrievalIndex(big, cell_types=["A"] * 8192, labels=labels, backend="faiss")._prefilter is None


def test_a_backend_that_breaks_its_bound_falls_back_to_the_exact_scan(caplog, monkeypatch) -> None:
    rng = np.random.default_rng(8)
    keys = _unit(rng, 3000, 32)
    pre, plain = _pair(keys, ["A"] * 3000)
    honest = PrefilterQuery.shortlist

    def lying(self, r):  # scores shifted by far more than the bound allows
        approx, ids = honest(self, r)
        return approx + 0.5, ids

    monkeypatch.setattr(PrefilterQuery, "shortlist", lying)
    q = _unit(rng, 1, 32)
    np.testing.assert_array_equal(pre.search(q, 10)[1], plain.search(q, 10)[1])
    assert pre.prefilter_stats["scanned"] == 1 and "exceeded its error bound" in caplog.text


def test_each_search_scores_its_own_query() -> None:
    # No cache across calls: the same query twice is scanned twice (a benchmark repeating one query measures
    # the scan, not a lookup), and queries in a row get their own scores.
    rng = np.random.default_rng(9)
    keys = _unit(rng, 3000, 32)
    pre = Int8Prefilter(keys)
    q = _unit(rng, 2, 32)
    a, b = pre.query(q[0]), pre.query(q[1])
    assert pre.query(q[0]).scores is not a.scores or a.scores is None
    exact = q.astype(np.float64) @ keys.T.astype(np.float64)
    for view, row in ((a, 0), (b, 1)):
        approx, ids = view.shortlist(5)
        assert (np.abs(approx - exact[row, ids]) <= view.key_bound(ids)).all()


def test_search_work_counts_the_prefilter_at_half_the_exact_scan() -> None:
    rng = np.random.default_rng(10)
    keys = _unit(rng, 1000, 16)
    pre, plain = _pair(keys, ["A"] * 1000)
    assert pre.search_work(1) == plain.search_work(1) / 2 == 1000 * 16 / 2
    assert pre.search_work(8) == plain.search_work(8)  # eight queries: the BLAS matmul, no prefilter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "d", "shift"), [(1, 1, 0.0), (7, 3, 0.0), (400, 24, 50.0), (400, 24, -3.0)])
def test_bound_holds_for_tiny_constant_and_offset_keys(backend: str, n: int, d: int, shift: float) -> None:
    # Found: one key of one dimension broke the bound (a constant dimension got a unit step, its offset was 128
    # and float32 cancellation exceeded the slack); keys far from zero stress the same cancellation.
    rng = np.random.default_rng(n + d)
    keys = (rng.standard_normal((n, d)) + shift).astype(np.float32)
    keys[:, 0] = 2.5  # a constant dimension
    pre = Int8Prefilter(keys, shards=1, backend=backend)
    for i, q in enumerate(rng.standard_normal((3, d)).astype(np.float32)):
        exact = q.astype(np.float64) @ keys.T.astype(np.float64)
        view = pre.query(q)
        approx, ids = view.shortlist(max(1, n // 2))
        assert (np.abs(approx - exact[ids]) <= view.key_bound(ids)).all(), i
        outside = np.setdiff1d(np.arange(n), ids)
        if outside.size:
            assert exact[outside].max() <= view.outside_bound(approx[-1])
