"""PT-RAG networks: shapes, masking, Gumbel top-k, symmetries, FLOP estimate and a small learning run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.functional import normalize
from torch.utils.flop_counter import FlopCounterMode

from model.losses import energy_distance
from model.nn import PTRAG, VARIANTS, Batch, PTRAGConfig, gumbel_topk
from model.nn.refiner import first_k

G, E, K, N_TYPES = 50, 16, 8, 3


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: with the cores shared, a second OpenMP thread spins and slows tests down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(variant: str = "ptrag", **overrides) -> PTRAGConfig:
    kwargs = dict(n_genes=G, emb_dim=E, n_cell_types=N_TYPES, d_model=32, n_layers=2, n_heads=4, n_candidates=K)
    kwargs.update(n_select=3, variant=variant)
    kwargs.update(overrides)
    return PTRAGConfig(**kwargs)


def make_batch(seed: int = 0, *, b: int = 4, s: int = 10, t: int = 7, n_valid: list[int] | None = None) -> Batch:
    """Random batch; row i has ``n_valid[i]`` real candidates (the rest padding), all K by default."""
    gen = torch.Generator().manual_seed(seed)
    n_valid = [K] * b if n_valid is None else n_valid
    mask = torch.arange(K)[None, :] < torch.tensor(n_valid)[:, None]  # (B, K): padding at the end
    return Batch(
        ctrl=torch.rand(b, s, G, generator=gen) * 2,
        query=normalize(torch.randn(b, E, generator=gen), dim=-1),
        cell_type=torch.randint(0, N_TYPES, (b,), generator=gen),
        cand_emb=normalize(torch.randn(b, K, E, generator=gen), dim=-1),
        cand_cell_type=torch.randint(0, N_TYPES, (b, K), generator=gen),
        cand_delta=torch.randn(b, K, G, generator=gen),
        cand_mask=mask,
        target=torch.rand(b, t, G, generator=gen) * 2 + 0.5,
    ).validate()


def seeded_model(config: PTRAGConfig, seed: int = 0) -> PTRAG:
    torch.manual_seed(seed)
    return PTRAG(config)


# --- config and batch -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"variant": "rag"}, "variant must be one of"),
        ({"n_select": 9}, "n_select <= n_candidates"),
        ({"d_model": 30}, "divisible by n_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"energy_weight": 0.0}, "not all 0"),
        ({"n_genes": 0}, "n_genes must be >= 1"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_config(**overrides)


def test_batch_validate_names_the_bad_shape():
    batch = make_batch()
    bad = dataclasses.replace(batch, cand_delta=batch.cand_delta[:, :, :10])
    with pytest.raises(AssertionError, match=r"cand_delta has shape \(4, 8, 10\), expected \(4, 8, 50\)"):
        bad.validate()
    with pytest.raises(AssertionError, match="cand_mask must be bool"):
        dataclasses.replace(batch, cand_mask=batch.cand_mask.long()).validate()


def test_batch_to_keeps_values_and_missing_target():
    batch = dataclasses.replace(make_batch(), target=None)
    moved = batch.to("cpu")
    assert moved.target is None
    assert torch.equal(moved.cand_delta, batch.cand_delta)
    assert moved.n_cells == 4 * 10


# --- shapes and masking ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_for_every_variant(variant):
    model = seeded_model(small_config(variant))
    batch = make_batch()
    pred, loss, info = model(batch, tau=0.7)
    assert pred.shape == (4, 10, G)
    assert loss.shape == () and torch.isfinite(loss)
    assert info["scores"].shape == (4, K)
    assert info["weights"].shape == (4, K)
    assert "ctrl_mean" not in info  # training: not computed
    assert info["selection"].shape == (4, 3, K)
    assert info["selected"].shape == (4, 3) and info["selected"].dtype == torch.int64
    assert info["loss_terms"]["energy"].shape == (4,)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter should get a gradient"
    _, loss2, info2 = model(dataclasses.replace(batch, target=None))
    assert loss2 is None and "loss_terms" not in info2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_masked_candidates_never_selected_or_weighted(variant, training):
    n_valid = [8, 5, 2, 0]  # the last two rows have fewer valid candidates than k = 3
    batch = make_batch(1, n_valid=n_valid)
    model = seeded_model(small_config(variant)).train(training)
    for trial in range(5):
        _, _, info = model(batch, generator=torch.Generator().manual_seed(trial))
        invalid = ~batch.cand_mask
        assert (info["selection"] * invalid[:, None, :]).abs().sum() == 0
        assert (info["weights"][invalid] == 0).all()
        assert torch.isinf(info["scores"][invalid]).all()
        for row, n in enumerate(n_valid):
            chosen = info["selected"][row]
            chosen = chosen[chosen >= 0]
            expected = 0 if variant == "no_retrieval" else min(n, 3)
            assert len(chosen) == expected, (row, chosen)
            assert len(set(chosen.tolist())) == expected, "a candidate was kept twice"
            assert batch.cand_mask[row, chosen].all()
            total = info["weights"][row].sum().item()
            assert total == pytest.approx(0.0 if expected == 0 else 1.0, abs=1e-6)


def test_prediction_ignores_padded_candidate_contents():
    batch = make_batch(2, n_valid=[8, 5, 2, 1])
    model = seeded_model(small_config()).eval()
    pred, _, _ = model(batch)
    junk = torch.randn(batch.cand_delta.shape) * 100
    mask = batch.cand_mask[:, :, None]
    scrambled = dataclasses.replace(
        batch,
        cand_delta=torch.where(mask, batch.cand_delta, junk),
        cand_emb=torch.where(mask, batch.cand_emb, normalize(torch.randn(batch.cand_emb.shape), dim=-1)),
    )
    pred2, _, _ = model(scrambled)
    torch.testing.assert_close(pred2, pred)


# --- gumbel_topk ------------------------------------------------------------------------------------------------


def test_gumbel_topk_rows_one_hot_distinct_and_straight_through():
    scores = torch.randn(6, 10, requires_grad=True)
    sel = gumbel_topk(scores, 4, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert sel.shape == (6, 4, 10)
    assert set(sel.detach().unique().tolist()) <= {0.0, 1.0}  # forward values exactly 0/1
    assert (sel.detach().sum(-1) == 1).all()
    assert (sel.detach().sum(1) <= 1).all(), "a candidate drawn twice"
    # Backward uses the soft probabilities: the gradient reaches the scores and matches the soft rows' gradient.
    w = torch.randn(6, 4, 10)
    (grad,) = torch.autograd.grad((sel * w).sum(), scores)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    soft = gumbel_topk(scores, 4, tau=0.5, hard=False, generator=torch.Generator().manual_seed(0))
    (soft_grad,) = torch.autograd.grad((soft * w).sum(), scores)
    torch.testing.assert_close(grad, soft_grad)
    torch.testing.assert_close(soft.detach().sum(-1), torch.ones(6, 4))


def test_gumbel_topk_deterministic_equals_topk():
    scores = torch.randn(5, 12)
    sel = gumbel_topk(scores, 4, tau=1.0, stochastic=False)
    assert torch.equal(sel.argmax(-1), torch.topk(scores, 4).indices)
    assert torch.equal(sel, gumbel_topk(scores, 4, tau=0.1, stochastic=False))


def test_gumbel_topk_seeded_reproducible_and_random():
    scores = torch.zeros(3, 20)
    a = gumbel_topk(scores, 5, tau=1.0, generator=torch.Generator().manual_seed(7))
    b = gumbel_topk(scores, 5, tau=1.0, generator=torch.Generator().manual_seed(7))
    c = gumbel_topk(scores, 5, tau=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gumbel_topk_first_draw_follows_softmax():
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    sel = gumbel_topk(scores, 2, tau=1.0, generator=torch.Generator().manual_seed(0))
    freq = sel[:, 0].mean(0)
    torch.testing.assert_close(freq, scores[0].softmax(-1), atol=0.015, rtol=0)
    # Sampling without replacement: P(second = j | first = 0) = p_j / (1 - p_0).
    first0 = sel[:, 0, 0] == 1
    p = scores[0].softmax(-1)
    torch.testing.assert_close(sel[first0, 1, 1:].mean(0), p[1:] / (1 - p[0]), atol=0.02, rtol=0)


def test_gumbel_topk_fewer_valid_than_k_gives_zero_rows():
    scores = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False, False], [False] * 6])
    sel = gumbel_topk(scores, 3, tau=1.0, mask=mask, generator=torch.Generator().manual_seed(0))
    assert sel[0, :2].sum(-1).tolist() == [1.0, 1.0] and sel[0, 2].abs().sum() == 0
    assert sel[1].abs().sum() == 0
    assert set(sel[0, :2].argmax(-1).tolist()) == {0, 2}
    (grad,) = torch.autograd.grad(sel.sum(), scores)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="tau must be > 0"):
        gumbel_topk(scores, 2, tau=0.0)


def test_first_k_takes_valid_candidates_in_order():
    mask = torch.tensor([[False, True, True, False, True, True]])
    sel = first_k(mask, 3)
    assert sel.argmax(-1).tolist() == [[1, 2, 4]]


# --- model behaviour --------------------------------------------------------------------------------------------


def test_eval_mode_is_deterministic_topk_of_scores():
    model = seeded_model(small_config()).eval()
    batch = make_batch(3)
    _, _, info = model(batch)
    _, _, info2 = model(batch)
    assert torch.equal(info["selected"], info2["selected"])
    assert torch.equal(info["selected"], torch.topk(info["scores"], 3).indices)
    # Training mode draws: over several draws the kept set changes for some row.
    model.train()
    draws = {tuple(model(batch, tau=5.0)[2]["selected"].flatten().tolist()) for _ in range(10)}
    assert len(draws) > 1
    seeded = [model(batch, generator=torch.Generator().manual_seed(4))[2]["selected"] for _ in range(2)]
    assert torch.equal(*seeded)


def test_untrained_model_predicts_close_to_control():
    model = seeded_model(small_config()).eval()
    batch = make_batch(4)
    pred, _, _ = model(batch)
    shift = (pred - batch.ctrl).abs()
    assert shift.max() < 0.05 * batch.ctrl.abs().mean()
    assert shift.max() > 0  # but not exactly control: the head is small, not zero


def test_no_context_prediction_still_depends_on_query():
    batch = make_batch(5)
    other = dataclasses.replace(batch, query=batch.query.roll(1, dims=0))
    for variant, b, b2 in [
        ("no_retrieval", batch, other),
        ("ptrag", dataclasses.replace(batch, cand_mask=torch.zeros_like(batch.cand_mask)), None),
    ]:
        model = seeded_model(small_config(variant, head_init_std=0.05)).eval()
        b2 = b2 or dataclasses.replace(b, query=b.query.roll(1, dims=0))
        diff = (model(b)[0] - model(b2)[0]).abs().max()
        assert diff > 1e-3, variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_permuting_control_cells_permutes_predictions(variant):
    model = seeded_model(small_config(variant, head_init_std=0.05)).eval()
    batch = make_batch(6)
    perm = torch.randperm(batch.ctrl.shape[1], generator=torch.Generator().manual_seed(0))
    pred, _, info = model(batch)
    pred_p, _, info_p = model(dataclasses.replace(batch, ctrl=batch.ctrl[:, perm]))
    torch.testing.assert_close(pred_p, pred[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info_p["scores"], info["scores"], atol=1e-5, rtol=1e-5)


def test_ptrag_invariant_to_candidate_order_in_eval():
    model = seeded_model(small_config(head_init_std=0.05)).eval()
    batch = make_batch(7, n_valid=[8, 6, 3, 8])
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    permuted = dataclasses.replace(
        batch,
        cand_emb=batch.cand_emb[:, perm],
        cand_cell_type=batch.cand_cell_type[:, perm],
        cand_delta=batch.cand_delta[:, perm],
        cand_mask=batch.cand_mask[:, perm],
    )
    pred, _, info = model(batch)
    pred_p, _, info_p = model(permuted)
    torch.testing.assert_close(pred_p, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info_p["weights"], info["weights"][:, perm])
    # The stage-1-only baselines take the first k, so they do depend on the order (by design).
    vanilla = seeded_model(small_config("vanilla_rag", head_init_std=0.05)).eval()
    assert (vanilla(permuted)[0] - vanilla(batch)[0]).abs().max() > 1e-4


def test_vanilla_rag_uses_one_averaged_token():
    model = seeded_model(small_config("vanilla_rag")).eval()
    _, _, info = model(make_batch(8, n_valid=[8, 2, 1, 8]))
    assert info["selected"][1].tolist() == [0, 1, -1]
    torch.testing.assert_close(info["weights"][1, :2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(info["weights"][0, :3], torch.full((3,), 1 / 3))


def test_gradient_reaches_refiner_through_selection():
    model = seeded_model(small_config()).train()
    _, loss, _ = model(make_batch(9), tau=1.0)
    loss.backward()
    hidden = model.refiner.mlp[-1].weight.grad  # zero-initialised layer, so only the selection can move it
    assert hidden is not None and hidden.abs().sum() > 0


def test_forward_and_backward_under_bf16_autocast():
    model = seeded_model(small_config()).train()
    batch = make_batch(10)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        pred, loss, _ = model(batch)
    assert pred.dtype == torch.float32  # ctrl + shift: the residual keeps the input precision
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_per_cell_matches_flop_counter(variant):
    model = seeded_model(small_config(variant)).eval()
    batch = dataclasses.replace(make_batch(11, s=16), target=None)
    with FlopCounterMode(display=False) as counter:
        model(batch)
    measured = counter.get_total_flops() / batch.n_cells
    estimate = model.flops_per_cell(16, n_candidates=K)
    # The counter misses CPU scaled_dot_product_attention kernels; the estimate counts them, so it is a bit larger.
    assert measured / 1.5 < estimate < measured * 1.5, (estimate, measured)
    assert model.num_params() == sum(p.numel() for p in model.parameters())


# --- learning -----------------------------------------------------------------------------------------------------


def cell_type_task(gen: torch.Generator, *, b: int = 32, s: int = 12, g: int = 24) -> tuple[Batch, torch.Tensor]:
    """Stage 1 cannot solve it: the query gene was measured in each of 3 cell types (3 candidates with the query's
    own embedding, so tied cosines), each with a different response; the target is control + the response measured
    in the target's cell type. Five unrelated candidates fill K = 8. Responses come from a fixed library of 16 with
    equal norms (so "pick the smallest delta" is no shortcut)."""
    lib = torch.randn(16, g, generator=torch.Generator().manual_seed(99))
    lib = 2.0 * g**0.5 * lib / lib.norm(dim=-1, keepdim=True)
    base = torch.linspace(0.5, 2.0, g)
    ctrl = base + 0.3 * torch.randn(b, s, g, generator=gen)
    target = base + 0.3 * torch.randn(b, s, g, generator=gen)  # fresh cells, not a copy of ctrl
    query = normalize(torch.randn(b, E, generator=gen), dim=-1)
    cand_emb = normalize(torch.randn(b, K, E, generator=gen), dim=-1)
    cand_emb[:, :N_TYPES] = query[:, None]
    cand_ct = torch.randint(0, N_TYPES, (b, K), generator=gen)
    cand_ct[:, :N_TYPES] = torch.stack([torch.randperm(N_TYPES, generator=gen) for _ in range(b)])
    cell_type = torch.randint(0, N_TYPES, (b,), generator=gen)
    cand_delta = lib[torch.rand(b, 16, generator=gen).argsort(-1)[:, :K]]  # (b, K, g), distinct responses
    right = (cand_ct[:, :N_TYPES] == cell_type[:, None]).float().argmax(-1)  # (b,)
    target = target + cand_delta[torch.arange(b), right][:, None]
    batch = Batch(
        ctrl=ctrl,
        query=query,
        cell_type=cell_type,
        cand_emb=cand_emb,
        cand_cell_type=cand_ct,
        cand_delta=cand_delta,
        cand_mask=torch.ones(b, K, dtype=torch.bool),
        target=target,
    )
    return batch.validate(), right


def test_ptrag_learns_to_pick_the_matching_candidate():
    torch.manual_seed(0)
    config = small_config(n_genes=24, d_model=48, n_select=1)
    model = PTRAG(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out, right = cell_type_task(torch.Generator().manual_seed(123), b=64)
    control_level = energy_distance(held_out.ctrl, held_out.target).mean().item()

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            _, loss, info = model(held_out)
        return loss.item(), (info["weights"].argmax(-1) == right).float().mean().item()

    loss0, acc0 = evaluate()
    assert loss0 == pytest.approx(control_level, rel=0.02)  # untrained: predicts control
    assert acc0 < 0.6  # stage 1 alone: a third of the tied candidates are right
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        model.train()
        batch, _ = cell_type_task(gen)
        _, loss, _ = model(batch, tau=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss1, acc1 = evaluate()
    assert loss1 < 0.5 * control_level, (loss1, control_level)
    assert acc1 > 0.8, acc1


# --- inference shortcuts: pooled output, precomputed encodings ---------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pooled_prediction_is_the_mean_of_the_cells(variant):
    model = seeded_model(small_config(variant, head_init_std=0.3)).eval()
    if model.copy_gain is not None:
        model.copy_gain.data.fill_(0.8)  # the copy path contributes too
    batch = dataclasses.replace(make_batch(3, n_valid=[8, 5, 2, 8]), target=None)
    with torch.no_grad():
        cells, _, info = model(batch)
        pooled, _, info_p = model(batch, pool=True)
    assert pooled.shape == (4, 1, G)
    assert (cells.mean(1, keepdim=True) - batch.ctrl.mean(1, keepdim=True)).abs().max() > 0.05  # a real shift
    torch.testing.assert_close(pooled, cells.mean(1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info_p["weights"], info["weights"])
    for i in (info, info_p):  # the mean a delta is measured from, in both modes
        torch.testing.assert_close(i["ctrl_mean"], batch.ctrl.mean(1))
    with pytest.raises(AssertionError, match="pool only at inference"):
        model(make_batch(3), pool=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_precomputed_cell_tokens_and_candidate_codes_change_nothing(variant):
    model = seeded_model(small_config(variant, head_init_std=0.3)).eval()
    batch = dataclasses.replace(make_batch(4, n_valid=[8, 8, 3, 1]), target=None)
    with torch.no_grad():
        ref, _, ref_info = model(batch)
        tokens = model.cells.mlp(batch.ctrl)  # (B, S, d)
        codes = {}
        if model.profiles is not None:
            proj, profile = model.encode_candidates(batch.cand_emb, batch.cand_delta)
            codes = {"cand_proj": proj, "cand_profile": profile}
        fast = dataclasses.replace(batch, cell_tokens=tokens, **codes).validate()
        got, _, info = model(fast)
        # the codes are what is used: scrambling them changes the prediction
        wrong = dataclasses.replace(fast, cell_tokens=tokens.flip(1) * 0.5)
        other, _, _ = model(wrong)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info["scores"], ref_info["scores"], rtol=1e-5, atol=1e-5)
    assert (other - ref).abs().max() > 1e-3
    if codes:
        with pytest.raises(AssertionError, match="come together"):
            dataclasses.replace(batch, cand_proj=codes["cand_proj"]).validate()
