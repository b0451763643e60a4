"""Set losses against hand-computed values, numpy float64 references and geomloss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.losses import combined_loss, energy_distance, mmd_rbf, pseudobulk_mse
from model.nn import PTRAGConfig


@pytest.fixture(autouse=True)
def one_thread():
    """The sets are tiny: with the cores shared, a second OpenMP thread spins and slows tests down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def energy_ref(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """V-statistic energy distance per set, float64, straight from the definition."""
    return np.array(
        [
            2 * _dist(a, b).mean() - _dist(a, a).mean() - _dist(b, b).mean()
            for a, b in zip(x.double().numpy(), y.double().numpy(), strict=True)
        ]
    )


def mmd_ref(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> np.ndarray:
    out = []
    for a, b in zip(x.double().numpy(), y.double().numpy(), strict=True):
        z = np.concatenate([a, b])
        d2 = _dist(z, z) ** 2
        h2 = np.median(d2[~np.eye(len(z), dtype=bool)]) if bandwidth is None else bandwidth**2
        k = np.exp(-d2 / (2 * h2))
        n = len(a)
        out.append(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())
    return np.array(out)


def sets(seed: int = 0, *, b: int = 3, n: int = 7, m: int = 5, g: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, g, generator=gen), torch.randn(b, m, g, generator=gen) + 0.5


def test_energy_distance_hand_computed():
    # x = {0, 1}, y = {3, 5} on a line: E|X-Y| = (3+5+2+4)/4 = 3.5, E|X-X'| = 2/4 (V) or 1 (U), E|Y-Y'| = 4/4 or 2.
    x = torch.tensor([[[0.0], [1.0]]])
    y = torch.tensor([[[3.0], [5.0]]])
    assert energy_distance(x, y).item() == pytest.approx(2 * 3.5 - 0.5 - 1.0, abs=1e-5)
    assert energy_distance(x, y, unbiased=True).item() == pytest.approx(2 * 3.5 - 1.0 - 2.0, abs=1e-5)


def test_energy_distance_matches_numpy_reference():
    x, y = sets(1)
    np.testing.assert_allclose(energy_distance(x, y).numpy(), energy_ref(x, y), rtol=1e-4, atol=1e-5)


def test_energy_distance_precise_at_scale():
    # G = 2000 log-expression-like values: the norm expansion must not lose the (small) distance between the sets.
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 64, 2000, generator=gen) * 3
    y = torch.rand(2, 48, 2000, generator=gen) * 3 + 0.02
    np.testing.assert_allclose(energy_distance(x, y).numpy(), energy_ref(x, y), rtol=1e-3)


def test_energy_distance_is_twice_geomloss_energy():
    geomloss = pytest.importorskip("geomloss")
    x, y = sets(3, n=9, m=6)
    ours = energy_distance(x, y)
    theirs = geomloss.SamplesLoss("energy")(x, y)  # 0.5 <a - b, -|x - y| (a - b)>, uniform weights
    np.testing.assert_allclose(ours.numpy(), 2 * theirs.numpy(), rtol=1e-3)


def test_energy_distance_unbiased_matches_reference():
    x, y = sets(4)
    ref = []
    for a, b in zip(x.double().numpy(), y.double().numpy(), strict=True):
        n, m = len(a), len(b)
        ref.append(2 * _dist(a, b).mean() - _dist(a, a).sum() / (n * (n - 1)) - _dist(b, b).sum() / (m * (m - 1)))
    np.testing.assert_allclose(energy_distance(x, y, unbiased=True).numpy(), ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(0.1, 3.0))
def test_energy_and_mmd_zero_for_identical_positive_otherwise(seed, shift):
    x, _ = sets(seed)
    # x-y and x-x Gram entries come from the same numbers, so the terms cancel; allow rounding all the same.
    scale = energy_distance(x, x + 10.0).max().item()
    assert energy_distance(x, x).abs().max().item() < 1e-6 * scale
    assert mmd_rbf(x, x).abs().max().item() < 1e-5
    assert pseudobulk_mse(x, x).abs().max().item() == 0.0
    y = x + shift
    assert (energy_distance(x, y) > 1e-3).all()
    assert (mmd_rbf(x, y) > 1e-4).all()
    np.testing.assert_allclose(pseudobulk_mse(x, y).numpy(), shift**2, rtol=1e-4)


def test_gradients_finite_with_duplicated_points():
    x, y = sets(5)
    x = torch.cat([x, x[:, :2]], dim=1).requires_grad_()  # two cells appear twice
    for fn in (energy_distance, mmd_rbf, pseudobulk_mse):
        (grad,) = torch.autograd.grad(fn(x, y).sum(), x)
        assert torch.isfinite(grad).all(), fn.__name__
        assert grad.abs().sum() > 0, fn.__name__
    # x against itself: every distance on the diagonal is exactly zero.
    xs = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(energy_distance(xs, xs.detach()).sum(), xs)
    assert torch.isfinite(grad).all()


def test_energy_gradient_matches_finite_differences():
    x, y = sets(6, b=1, n=4, m=3, g=3)
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(energy_distance(xr, y).sum(), xr)
    # Central differences of the float64 reference.
    x64, y64, eps = x.double(), y.double(), 1e-5
    fd = torch.zeros_like(x64)
    for idx in np.ndindex(*x.shape):
        e = torch.zeros_like(x64)
        e[idx] = eps
        fd[idx] = float(energy_ref(x64 + e, y64)[0] - energy_ref(x64 - e, y64)[0]) / (2 * eps)
    np.testing.assert_allclose(grad.numpy(), fd.numpy(), atol=1e-3)


def test_mmd_matches_numpy_reference():
    x, y = sets(7)
    np.testing.assert_allclose(mmd_rbf(x, y).numpy(), mmd_ref(x, y), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mmd_rbf(x, y, bandwidth=2.5).numpy(), mmd_ref(x, y, 2.5), rtol=1e-4, atol=1e-6)
    per_set = torch.tensor([1.0, 2.0, 4.0])
    expected = [mmd_ref(x[i : i + 1], y[i : i + 1], float(h))[0] for i, h in enumerate(per_set)]
    np.testing.assert_allclose(mmd_rbf(x, y, bandwidth=per_set).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_pseudobulk_mse_matches_numpy():
    x, y = sets(8)
    ref = ((x.numpy().mean(1) - y.numpy().mean(1)) ** 2).mean(-1)
    np.testing.assert_allclose(pseudobulk_mse(x, y).numpy(), ref, rtol=1e-5)


def test_combined_loss_weights_and_terms():
    x, y = sets(9)
    config = PTRAGConfig(n_genes=10, emb_dim=4, energy_weight=0.5, mmd_weight=0.0, mse_weight=2.0)
    loss, terms = combined_loss(x, y, config)
    assert set(terms) == {"energy", "mse"}  # a zero weight skips the term
    expected = 0.5 * energy_distance(x, y).mean() + 2.0 * pseudobulk_mse(x, y).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["energy"].shape == (3,)
    assert not terms["energy"].requires_grad


def test_losses_run_in_float32_under_autocast():
    x, y = sets(10, g=64)
    ref = energy_distance(x, y)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = energy_distance(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the inputs remains, not bf16 arithmetic on the distance expansion.
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=2e-2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal B and G"):
        energy_distance(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="at least 2 points"):
        energy_distance(torch.zeros(1, 1, 4), torch.ones(1, 3, 4), unbiased=True)
