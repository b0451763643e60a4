"""Search correctness against a brute-force numpy reference: exact parity, filters, exclusions, ivf/hnsw."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retrieval_service import scoring
from retrieval_service.embeddings import GeneEmbeddings
from retrieval_service.index import IndexSpec, InvalidQueryError, RetrievalIndex, UnknownGeneError

CELL_TYPES = ("A", "B", "C")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(keys: np.ndarray, q: np.ndarray, k: int, valid: np.ndarray) -> np.ndarray:
    """Exact top-k scores per query by a full sort in float64, -inf padded: ``(n, k)``."""
    scores = np.where(valid, q.astype(np.float64) @ keys.astype(np.float64).T, -np.inf)
    top = -np.sort(-scores, axis=1)[:, :k]
    return np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-np.inf)


def _check(keys, q, k, valid, scores, ids, *, exact: bool) -> None:
    """Every row: shape, exactly min(k, #valid) valid ids, none forbidden, true scores, exact top-k if exact."""
    n = q.shape[0]
    assert scores.shape == ids.shape == (n, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    ref = _reference(keys, q, k, valid)
    for i in range(n):
        want = min(k, int(valid[i].sum()))
        got = ids[i][ids[i] >= 0]
        assert got.size == want, (i, got, want)
        assert (ids[i, want:] == -1).all() and np.isneginf(scores[i, want:]).all()
        assert len(set(got.tolist())) == want  # no duplicates
        assert valid[i, got].all()  # never an excluded id or a filtered cell type
        true = q[i].astype(np.float64) @ keys[got].astype(np.float64).T
        np.testing.assert_allclose(scores[i, :want], true, atol=1e-5)
        assert (np.diff(scores[i, :want]) <= 1e-6).all()  # best first
        if exact:  # same scores as brute force (ids may differ only among ties)
            np.testing.assert_allclose(scores[i, :want], ref[i, :want], atol=1e-5)


def _valid_mask(n, cell_types, allowed, excluded_ct, exclude_rows) -> np.ndarray:
    ct = np.asarray(cell_types)
    row = np.ones(len(ct), bool)
    if allowed is not None:
        row &= np.isin(ct, allowed)
    if excluded_ct is not None:
        row &= ~np.isin(ct, excluded_ct)
    valid = np.tile(row, (n, 1))
    for i, ex in enumerate(exclude_rows):
        valid[i, list(ex)] = False
    return valid


@pytest.mark.parametrize("with_torch", [True, False])
@pytest.mark.parametrize("n_q", [1, 2, 8, 32, 33, 64])
def test_score_matrix_is_q_at_keys_t(n_q: int, with_torch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches go through torch, or without it through numpy (few queries take the product the other way round);
    # the caller gets a C-contiguous, writable (n, b) matrix either way, also from read-only (memory-mapped) keys.
    if not with_torch:
        monkeypatch.setattr(scoring, "_torch", lambda: None)
    rng = np.random.default_rng(n_q)
    q, keys = rng.standard_normal((n_q, 96), dtype=np.float32), rng.standard_normal((500, 96), dtype=np.float32)
    keys.flags.writeable = False
    got = scoring.score_matrix(q, keys)
    assert got.shape == (n_q, 500) and got.dtype == np.float32 and got.flags["C_CONTIGUOUS"] and got.flags.writeable
    np.testing.assert_allclose(got, q.astype(np.float64) @ keys.T.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_exact_parity_with_brute_force() -> None:
    rng = np.random.default_rng(0)
    keys, q = _unit(rng, 3000, 32), _unit(rng, 50, 32)
    idx = RetrievalIndex(keys, cell_types=["A"] * 3000, labels=[f"p{i}" for i in range(3000)])
    scores, ids = idx.search(q, 10)
    ref = np.argsort(-(q @ keys.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ keys.T, ref, axis=1), rtol=1e-5, atol=1e-6)
    # the FAISS flat index gives the same answer
    faiss_idx = RetrievalIndex(keys, cell_types=["A"] * 3000, labels=[f"p{i}" for i in range(3000)], backend="faiss")
    assert faiss_idx.backend == "faiss"
    np.testing.assert_array_equal(faiss_idx.search(q, 10)[1], ref)


@pytest.mark.parametrize("n_q", [7, 20])  # masked vs gathered filtering, depending on batch size
@pytest.mark.parametrize("allowed", [["A"], ["A", "B"], ["A", "B", "C"]])
def test_exact_parity_across_blocks(monkeypatch: pytest.MonkeyPatch, n_q: int, allowed: list[str]) -> None:
    import retrieval_service.index as index_mod

    rng = np.random.default_rng(1)
    keys, q = _unit(rng, 5000, 8), _unit(rng, n_q, 8)
    cts = rng.choice(list(CELL_TYPES), 5000)
    idx = RetrievalIndex(keys, cell_types=cts, labels=[f"p{i}" for i in range(5000)])
    exclude = [[1, 2, int(i)] for i in rng.integers(0, 5000, n_q)]
    whole = idx.search(q, 25, exclude=exclude, cell_types=allowed)
    valid = _valid_mask(n_q, cts, allowed, None, exclude)
    _check(keys, q, 25, valid, *whole, exact=True)
    monkeypatch.setattr(index_mod, "SCORE_BLOCK_BYTES", 4 * n_q * 1100)  # ~5 blocks of 1100 columns
    blocked = idx.search(q, 25, exclude=exclude, cell_types=allowed)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_array_equal(whole[0], blocked[0])


@st.composite
def _cases(draw: st.DrawFn) -> dict:
    n_keys = draw(st.integers(1, 60))
    n_q = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    keys = _unit(rng, n_keys, 8)
    if draw(st.booleans()) and n_keys > 2:  # duplicate rows: ties must not break the contract
        keys[: n_keys // 2] = keys[n_keys - n_keys // 2 :]
    cell_types = [CELL_TYPES[i] for i in rng.integers(0, 3, n_keys)]
    ids = st.integers(0, n_keys - 1)
    per_query = draw(st.booleans())
    if per_query:
        exclude = [draw(st.sets(ids, max_size=n_keys)) for _ in range(n_q)]
        rows = exclude
    else:
        exclude = draw(st.sets(ids, max_size=n_keys))
        rows = [exclude] * n_q
    allowed = draw(st.none() | st.lists(st.sampled_from(CELL_TYPES), min_size=1, max_size=3, unique=True))
    excluded_ct = draw(st.none() | st.lists(st.sampled_from(CELL_TYPES), min_size=1, max_size=2, unique=True))
    return {
        "keys": keys,
        "q": _unit(rng, n_q, 8),
        "k": draw(st.integers(1, n_keys + 3)),
        "cell_types": cell_types,
        "exclude": exclude,
        "rows": rows,
        "allowed": allowed,
        "excluded_ct": excluded_ct,
    }


def _run_case(case: dict, **index_kw) -> None:
    keys, q, k = case["keys"], case["q"], case["k"]
    idx = RetrievalIndex(keys, cell_types=case["cell_types"], labels=[f"p{i}" for i in range(len(keys))], **index_kw)
    scores, ids = idx.search(
        q, k, exclude=case["exclude"], cell_types=case["allowed"], exclude_cell_types=case["excluded_ct"]
    )
    valid = _valid_mask(len(q), case["cell_types"], case["allowed"], case["excluded_ct"], case["rows"])
    _check(keys, q, k, valid, scores, ids, exact=index_kw.get("spec", IndexSpec()).type != "hnsw")


_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(_cases())
def test_filters_exact_numpy(case: dict) -> None:
    _run_case(case)


@_FAST
@given(_cases())
def test_filters_exact_faiss_flat(case: dict) -> None:
    _run_case(case, backend="faiss")


@_FAST
@given(_cases())
def test_filters_ivf_all_lists_is_exact(case: dict) -> None:
    # nprobe == nlist visits every list: exact, through the selector + over-fetch path
    _run_case(case, spec=IndexSpec(type="ivf", nlist=1, nprobe=1))


@settings(max_examples=30, deadline=None)
@given(_cases())
def test_filters_hnsw_contract(case: dict) -> None:
    # approximate: exactly min(k, #valid) valid ids, none forbidden, true scores, best first
    _run_case(case, spec=IndexSpec(type="hnsw", hnsw_m=8, ef_search=16))


@_FAST
@given(_cases(), st.integers(1, 8))
def test_filters_gpu_style_path(case: dict, gpu_max_k: int) -> None:
    # The GPU path has no IDSelector and a k cap: it filters after the fact, grows the fetch, and finishes
    # short queries exactly. Simulate it on the CPU index with a tiny cap so that every branch runs.
    import retrieval_service.index as index_mod

    keys = case["keys"]
    idx = RetrievalIndex(
        keys, cell_types=case["cell_types"], labels=[f"p{i}" for i in range(len(keys))], backend="faiss"
    )
    idx.on_gpu = True
    old, index_mod.GPU_MAX_K = index_mod.GPU_MAX_K, gpu_max_k
    try:
        scores, ids = idx.search(
            case["q"],
            case["k"],
            exclude=case["exclude"],
            cell_types=case["allowed"],
            exclude_cell_types=case["excluded_ct"],
        )
    finally:
        index_mod.GPU_MAX_K = old
    valid = _valid_mask(len(case["q"]), case["cell_types"], case["allowed"], case["excluded_ct"], case["rows"])
    _check(keys, case["q"], case["k"], valid, scores, ids, exact=True)


def test_ivf_short_queries_are_completed() -> None:
    # nprobe=1 of 16 lists sees ~1/16 of the keys; with k=200 every query must still get 200 valid ids
    rng = np.random.default_rng(2)
    keys, q = _unit(rng, 1600, 16), _unit(rng, 5, 16)
    idx = RetrievalIndex(keys, cell_types=["A"] * 1600, labels=list(map(str, range(1600))),
                         spec=IndexSpec(type="ivf", nlist=16, nprobe=1))  # fmt: skip
    scores, ids = idx.search(q, 200, exclude=[[0, 1, 2]] * 5)
    _check(keys, q, 200, _valid_mask(5, ["A"] * 1600, None, None, [{0, 1, 2}] * 5), scores, ids, exact=False)


@pytest.mark.parametrize(
    ("spec", "min_recall"),
    [(IndexSpec(type="ivf", nlist=32, nprobe=8), 0.5), (IndexSpec(type="hnsw", hnsw_m=16, ef_search=64), 0.9)],
)
def test_ann_recall(spec: IndexSpec, min_recall: float) -> None:
    rng = np.random.default_rng(3)
    centers = _unit(rng, 40, 32)  # clustered data, as gene embeddings are
    keys = centers[rng.integers(0, 40, 4000)] + 0.15 * rng.standard_normal((4000, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = keys[:100] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    idx = RetrievalIndex(keys, cell_types=["A"] * 4000, labels=list(map(str, range(4000))), spec=spec)
    _, ids = idx.search(q, 10)
    truth = np.argsort(-(q @ keys.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= min_recall, recall
    assert (ids >= 0).all()


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 5),
    b=st.integers(1, 6000),
    kk=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([2, 3, 50, 0]),
    with_torch=st.booleans(),
)
def test_topk_is_the_head_of_the_stable_sort(n: int, b: int, kk: int, seed: int, levels: int, with_torch: bool) -> None:
    # partial_topk: some kk largest per row, best first (torch.topk for several rows, numpy for one or without
    # torch; wide rows take numpy's strided-group two-stage path). topk: ties at the cut go to the lower columns,
    # so exactly the first kk of a stable sort by descending score, whatever the partial sort kept of a tie. Few
    # distinct levels make many ties, -inf masks too.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (n, b)).astype(np.float32) if levels else rng.standard_normal((n, b), np.float32)
    scores[rng.random((n, b)) < 0.3] = -np.inf
    with pytest.MonkeyPatch.context() as mp:
        if not with_torch:
            mp.setattr(scoring, "_torch", lambda: None)
        partial = scoring.partial_topk(scores, min(kk, b))
        pos, vals = scoring.topk(scores, kk)
    assert (partial[1][:, 1:] <= partial[1][:, :-1]).all()  # best first
    for some_pos, some_vals in (partial, scoring._topk_numpy(scores, min(kk, b))):
        assert some_pos.shape == some_vals.shape == (n, min(kk, b)) and some_pos.dtype == np.int64
        np.testing.assert_array_equal(np.take_along_axis(scores, some_pos, axis=1), some_vals)
        for i in range(n):
            assert len(set(some_pos[i].tolist())) == min(kk, b)
            np.testing.assert_array_equal(np.sort(some_vals[i]), np.sort(scores[i])[b - min(kk, b) :])
    ref = np.argsort(-scores, axis=1, kind="stable")[:, : min(kk, b)]
    np.testing.assert_array_equal(pos, ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(scores, ref, axis=1))
    assert pos.dtype == np.int64
    # each row alone gives what it gives in the batch
    for i in range(n):
        np.testing.assert_array_equal(scoring.topk(scores[i : i + 1], kk)[0][0], pos[i])


@pytest.mark.parametrize(("b", "kk", "levels"), [(2000, 17, 0), (2000, 17, 3), (4099, 5, 40), (1100, 16, 2)])
def test_topk_of_many_rows_matches_the_stable_sort(b: int, kk: int, levels: int) -> None:
    # 128 rows or more of wide scores take torch's two-stage path; the settled result is still the stable sort's head
    rng = np.random.default_rng(b + kk)
    n = scoring.TORCH_TWO_STAGE_MIN_ROWS + 3
    scores = rng.integers(0, levels, (n, b)).astype(np.float32) if levels else rng.standard_normal((n, b), np.float32)
    scores[rng.random((n, b)) < 0.2] = -np.inf
    scores[::2, -1] = 1e30  # the best score in the last column (outside every group when b is not a multiple)
    pos, vals = scoring.partial_topk(scores, kk)
    assert (vals[:, 1:] <= vals[:, :-1]).all()  # best first
    np.testing.assert_array_equal(np.sort(vals, axis=1), np.sort(scores, axis=1)[:, b - kk :])
    np.testing.assert_array_equal(np.take_along_axis(scores, pos, axis=1), vals)
    assert all(len(set(row.tolist())) == kk for row in pos)
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    np.testing.assert_array_equal(scoring.topk(scores, kk)[0], ref)


def test_duplicated_keys_give_the_same_ids_alone_and_in_a_batch() -> None:
    # One gene perturbed in several cell types is one key stored several times: a tie at the k-th place must go to
    # the lower ids whether the query comes alone (numpy) or in a batch (torch), on every exact path.
    rng = np.random.default_rng(7)
    base = _unit(rng, 40, 64)
    keys = np.concatenate([base, base, base])  # entry i, i + 40, i + 80 share a key
    n_keys = len(keys)
    idx = RetrievalIndex(keys, cell_types=["A", "B", "C"] * 40, labels=[f"p{i}" for i in range(n_keys)])
    q = _unit(rng, 9, 64)
    for k in (1, 2, 4, 5, 7):
        batched = idx.search(q, k)[1]
        alone = np.concatenate([idx.search(q[i : i + 1], k)[1] for i in range(len(q))])
        np.testing.assert_array_equal(batched, alone)
        ref = np.argsort(-(q.astype(np.float64) @ base.T.astype(np.float64)), axis=1)  # (n, 40) best key first
        # the best key's three entries come first, lowest id first
        np.testing.assert_array_equal(batched[:, 0], ref[:, 0])
        if k >= 3:
            np.testing.assert_array_equal(batched[:, :3], ref[:, :1] + np.array([0, 40, 80]))
        excl = idx.search(q, k, exclude=[{int(ref[i, 0])} for i in range(len(q))])[1]
        excl_alone = np.concatenate([idx.search(q[i : i + 1], k, exclude=[{int(ref[i, 0])}])[1] for i in range(len(q))])
        np.testing.assert_array_equal(excl, excl_alone)


def test_padding_when_fewer_than_k() -> None:
    rng = np.random.default_rng(4)
    keys = _unit(rng, 5, 4)
    idx = RetrievalIndex(keys, cell_types=["A", "A", "B", "B", "B"], labels=list("abcde"))
    scores, ids = idx.search(keys[:2], 4, cell_types="A", exclude=[{0}, set()])
    assert ids.tolist() == [[1, -1, -1, -1], [1, 0, -1, -1]]
    assert np.isneginf(scores[0, 1:]).all() and np.isfinite(scores[1, :2]).all()
    scores, ids = idx.search(keys[:1], 3, exclude=[0, 1, 2, 3, 4])
    assert ids.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()


def test_input_errors() -> None:
    rng = np.random.default_rng(5)
    keys = _unit(rng, 10, 4)
    idx = RetrievalIndex(keys, cell_types=["A"] * 5 + ["B"] * 5, labels=list("abcdefghij"))
    with pytest.raises(InvalidQueryError, match="queries have dimension 3 but the index keys have dimension 4"):
        idx.search(np.zeros((2, 3)), 1)
    with pytest.raises(InvalidQueryError, match=r"must be 2-D \(n, d\) with d=4, got shape \(4,\)"):
        idx.search(np.zeros(4), 1)
    with pytest.raises(InvalidQueryError, match=r"1 query vector\(s\) contain NaN or inf \(rows \[1\]\)"):
        idx.search(np.array([[0, 0, 0, 1], [np.nan, 0, 0, 0]]), 1)
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(InvalidQueryError, match="k must be a positive integer"):
            idx.search(keys[:1], bad_k)
    # a cell type the store lacks matches nothing: no candidates, or no effect when excluded
    assert idx.search(keys[:1], 2, cell_types=["a"])[1].tolist() == [[-1, -1]]
    assert idx.search(keys[:1], 1, exclude_cell_types="Z")[1].tolist() == [[0]]
    with pytest.raises(InvalidQueryError, match=r"exclude ids must be in \[0, 10\).*\[10\]"):
        idx.search(keys[:1], 1, exclude=[10])
    with pytest.raises(InvalidQueryError, match="exclude has 1 per-query id collections for 2 queries"):
        idx.search(keys[:2], 1, exclude=[[1]])
    assert idx.search(np.zeros((0, 4)), 3)[1].shape == (0, 3)


def test_labels_and_unknown_genes() -> None:
    rng = np.random.default_rng(6)
    symbols = ("TP53", "TP63", "MYC", "KRAS", "BRCA1")
    emb = GeneEmbeddings(symbols, rng.standard_normal((5, 8)).astype(np.float32), "t")
    labels = ["TP53", "MYC", "KRAS+MYC", "BRCA1"]
    keys, _ = emb.perturbation_vectors([lab.split("+") for lab in labels])
    idx = RetrievalIndex(keys, cell_types=["A"] * 4, labels=labels, embeddings=emb)
    scores, ids = idx.search_labels(["MYC+KRAS", "TP53"], 1)
    assert ids[:, 0].tolist() == [2, 0]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(UnknownGeneError) as info:
        idx.search_labels(["TP5", "tp53+MYC", "XYZZY"], 1)
    err = info.value
    assert isinstance(err, KeyError)
    assert err.genes == ["TP5", "XYZZY", "tp53"]
    assert err.suggestions["tp53"][0] == "TP53"
    assert err.suggestions["TP5"] == ["TP53"]
    assert err.suggestions["XYZZY"] == []
    assert "'TP5' (did you mean" in str(err) and "'XYZZY'" in str(err)
    with pytest.raises(InvalidQueryError, match=r"malformed perturbation label 'MYC\+'"):
        idx.search_labels(["MYC+"], 1)


# --- the unfiltered fast path --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@example(n_keys=17, n_q=1, k=16, seed=0, levels=0)  # one key more than k: the smallest partition
@example(n_keys=16, n_q=1, k=16, seed=0, levels=2)  # exactly k keys, with ties
@example(n_keys=5, n_q=2, k=16, seed=1, levels=0)  # fewer keys than k: padding
@example(n_keys=4096, n_q=1, k=16, seed=2, levels=5)  # the first width of the two-stage top-k at k=16
@given(
    n_keys=st.integers(1, 6000),
    n_q=st.integers(1, 3),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([0, 2, 5]),
)
def test_unfiltered_fast_path_equals_general_path(n_keys: int, n_q: int, k: int, seed: int, levels: int) -> None:
    # search() without filters or exclusions takes _search_plain; it must return exactly what the general exact
    # path returns: same ids (ties in id order), bit-identical scores, same padding. Few levels make many ties;
    # more than 4096 columns at k=16 goes through the two-stage top-k.
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, levels, (n_keys, 4)).astype(np.float32) if levels else _unit(rng, n_keys, 4)
    q = rng.integers(-1, 2, (n_q, 4)).astype(np.float32) if levels else _unit(rng, n_q, 4)
    idx = RetrievalIndex(keys, cell_types=["A"] * n_keys, labels=[f"p{i}" for i in range(n_keys)])
    calls = []
    idx._search_exact = lambda *a: calls.append(a) or RetrievalIndex._search_exact(idx, *a)
    scores, ids = idx.search(q, k)
    assert not calls  # the fast path ran
    empty = np.zeros(0, np.int64)
    ref_scores, ref_ids = RetrievalIndex._search_exact(idx, q, k, None, empty, empty)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (n_q, k)
    valid = np.ones((n_q, n_keys), bool)
    _check(keys, q, k, valid, scores, ids, exact=True)
    # an empty exclusion or an all-allowing filter takes the general path, with the same answer
    for kw in ({"exclude": []}, {"cell_types": "A"}, {"exclude_cell_types": "B"}):
        s2, i2 = idx.search(q, k, **kw)
        np.testing.assert_array_equal(i2, ids)
        np.testing.assert_array_equal(s2, scores)
    assert len(calls) == 3


def test_fast_path_only_for_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval_service.index as index_mod

    rng = np.random.default_rng(8)
    keys, q = _unit(rng, 3000, 8), _unit(rng, 4, 8)
    idx = RetrievalIndex(keys, cell_types=["A"] * 3000, labels=[f"p{i}" for i in range(3000)])
    whole = idx.search(q, 7)
    monkeypatch.setattr(index_mod, "SCORE_BLOCK_BYTES", 4 * 4 * 1000)  # 3 blocks: the general, blocked path
    plain = []
    monkeypatch.setattr(idx, "_search_plain", lambda *a: plain.append(a))
    blocked = idx.search(q, 7)
    assert not plain
    np.testing.assert_array_equal(blocked[1], whole[1])
    np.testing.assert_array_equal(blocked[0], whole[0])


def test_overflowing_query_is_padding_on_both_paths() -> None:
    keys = np.array([[2, 0], [-2, 0], [0, 1]], np.float32)
    idx = RetrievalIndex(keys, cell_types=["A"] * 3, labels=list("abc"))
    q = np.array([[3e38, 0]], np.float32)  # finite, but its products overflow to +-inf
    for kw in ({}, {"exclude": []}):
        with np.errstate(over="ignore"):
            scores, ids = idx.search(q, 3, **kw)
        assert ids.tolist() == [[0, 2, -1]]
        assert scores[0, 0] == np.inf and scores[0, 1] == 0 and np.isneginf(scores[0, 2])


def test_search_work_and_knows_labels() -> None:
    rng = np.random.default_rng(9)
    symbols = ("TP53", "MYC", "KRAS")
    emb = GeneEmbeddings(symbols, rng.standard_normal((3, 8)).astype(np.float32), "t")
    keys, _ = emb.perturbation_vectors([("TP53",), ("MYC",), ("KRAS", "MYC")])
    flat = RetrievalIndex(keys, cell_types=["A"] * 3, labels=["TP53", "MYC", "KRAS+MYC"], embeddings=emb)
    assert flat.search_work(2) == 2 * 3 * 8
    hnsw = RetrievalIndex(
        keys, cell_types=["A"] * 3, labels=["TP53", "MYC", "KRAS+MYC"], embeddings=emb,
        spec=IndexSpec(type="hnsw", hnsw_m=4, ef_search=40),
    )  # fmt: skip
    assert hnsw.search_work(1) == 4 * 40 * 4 * 8
    hnsw.set_search_params(ef_search=100)
    assert hnsw.search_work(3) == 4 * 3 * 100 * 4 * 8
    ivf_keys = _unit(rng, 100, 8)
    ivf = RetrievalIndex(ivf_keys, cell_types=["A"] * 100, labels=list(map(str, range(100))),
                         spec=IndexSpec(type="ivf", nlist=2, nprobe=1))  # fmt: skip
    assert ivf.search_work(1) == 2 * (2 + 1 * 100 / 2) * 8
    assert flat.knows_labels(["TP53", "MYC + KRAS"])
    assert not flat.knows_labels(["TP53", "MYC+TP5"])
    assert not flat.knows_labels(["MYC+"])
    assert not RetrievalIndex(keys, cell_types=["A"] * 3, labels=list("abc")).knows_labels(["TP53"])
