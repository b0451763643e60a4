"""Set-to-set losses between predicted and observed cell populations, batched over B sets.

Every function takes ``x`` of shape (B, N, G) and ``y`` of shape (B, M, G) (N and M may differ) and returns one
value per set, shape (B,). They run in float32 with autocast disabled: pairwise distances are differences of large
squared norms (G ~ 2000 genes), which bf16 would turn into noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model.nn.ptrag import PTRAGConfig

__all__ = ["combined_loss", "energy_distance", "mmd_rbf", "pseudobulk_mse"]


def _check_sets(x: Tensor, y: Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        msg = f"expected x (B, N, G) and y (B, M, G) with equal B and G, got {tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(msg)


def _squared_distances(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise squared Euclidean distances between and within two sets, clamped at 0.

    (B, N, G), (B, M, G) -> x-y (B, N, M), x-x (B, N, N), y-y (B, M, M), from the expansion |a|^2 + |b|^2 - 2 a.b:
    three bmm's and never a (B, N, M, G) difference tensor. The squared norms are read off the diagonals of the
    within-set Gram matrices rather than computed by another pass over (B, N, G), which on a CPU costs about as
    much as a bmm; as a bonus the within-set diagonals come out exactly 0. Both sets are first centred on y's mean
    (detached: distances are translation invariant), which keeps the norms, and so the cancellation, small.
    """
    centre = y.detach().mean(dim=1, keepdim=True)  # (B, 1, G)
    x, y = x - centre, y - centre
    gxx, gyy, gxy = torch.bmm(x, x.mT), torch.bmm(y, y.mT), torch.bmm(x, y.mT)  # (B, N, N), (B, M, M), (B, N, M)
    xn, yn = gxx.diagonal(dim1=1, dim2=2), gyy.diagonal(dim1=1, dim2=2)  # (B, N), (B, M)

    def expand(an: Tensor, bn: Tensor, gram: Tensor) -> Tensor:
        return (an[:, :, None] + bn[:, None, :] - 2.0 * gram).clamp_min(0.0)

    return expand(xn, yn, gxy), expand(xn, xn, gxx), expand(yn, yn, gyy)


def _sqrt(d2: Tensor) -> Tensor:
    """Distances from squared distances with finite gradients at zero distance.

    d/dz sqrt(z) is infinite at z = 0 (the diagonal of x vs x, or duplicated cells), so the square root is taken of
    max(z, eps): below eps the clamp passes no gradient, and the value is off by at most sqrt(eps) = 1e-6.
    """
    return d2.clamp_min(1e-12).sqrt()


def _offdiag(d: Tensor) -> Tensor:
    """The off-diagonal entries of (B, N, N) -> (B, N * (N - 1))."""
    return d[:, ~torch.eye(d.shape[-1], dtype=torch.bool, device=d.device)]


def _mean_offdiag(d: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of (B, N, N) -> (B,); the U-statistic of a within-set term."""
    if d.shape[-1] < 2:
        msg = f"the unbiased estimate needs at least 2 points per set, got {d.shape[-1]}"
        raise ValueError(msg)
    return _offdiag(d).mean(-1)


def energy_distance(x: Tensor, y: Tensor, *, unbiased: bool = False) -> Tensor:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| with Euclidean |.|, per set.

    Parameters
    ----------
    x, y
        (B, N, G) and (B, M, G) cell sets.
    unbiased
        False (default): the V-statistic, i.e. the energy distance between the two empirical distributions; it is
        >= 0 and 0 (up to float rounding) for identical sets, which makes it a proper training loss. True: the
        U-statistic, whose within-set terms skip the zero diagonal; unbiased for the population value but can be
        negative.

    Returns
    -------
    (B,) float32. Relation to geomloss: ``SamplesLoss("energy")(x, y)`` with uniform weights is half the
    V-statistic, ``energy_distance(x, y) == 2 * SamplesLoss("energy")(x, y)`` (geomloss uses 0.5 <a-b, K(a-b)>).
    """
    _check_sets(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        xy, xx, yy = (_sqrt(d2) for d2 in _squared_distances(x, y))  # (B, N, M), (B, N, N), (B, M, M)
        if unbiased:
            return 2.0 * xy.mean((-2, -1)) - _mean_offdiag(xx) - _mean_offdiag(yy)
        return 2.0 * xy.mean((-2, -1)) - xx.mean((-2, -1)) - yy.mean((-2, -1))


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidth: float | Tensor | None = None) -> Tensor:
    """Squared maximum mean discrepancy with a Gaussian kernel, biased (V-statistic) estimate, per set.

    k(a, b) = exp(-|a - b|^2 / (2 h^2)); MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y), >= 0 and 0 for identical sets.

    Parameters
    ----------
    x, y
        (B, N, G) and (B, M, G) cell sets.
    bandwidth
        h, a float or a (B,) tensor. None: the median heuristic, h = median of the pairwise distances between
        distinct points of the pooled set x + y, computed per set and detached (a scale, not something to train).

    Returns
    -------
    (B,) float32.
    """
    _check_sets(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        dxy, dxx, dyy = _squared_distances(x, y)  # (B, N, M), (B, N, N), (B, M, M)
        if bandwidth is None:
            # All ordered pairs of distinct points of the pooled set: x-y pairs appear twice, as in the full matrix.
            pooled = torch.cat([dxy.flatten(1), dxy.flatten(1), _offdiag(dxx), _offdiag(dyy)], dim=1).detach()
            h2 = torch.quantile(pooled, 0.5, dim=-1).clamp_min(1e-12)  # (B,) squared median distance
        else:
            h2 = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device).expand(x.shape[0]) ** 2  # (B,)
        kxy, kxx, kyy = (torch.exp(-d2 / (2.0 * h2[:, None, None])) for d2 in (dxy, dxx, dyy))
        return kxx.mean((-2, -1)) + kyy.mean((-2, -1)) - 2.0 * kxy.mean((-2, -1))


def pseudobulk_mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error between the set means (pseudobulk profiles), averaged over genes: (B,)."""
    _check_sets(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return (x.float().mean(1) - y.float().mean(1)).pow(2).mean(-1)


def combined_loss(pred: Tensor, target: Tensor, config: PTRAGConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the set losses, ``energy_weight * ED + mmd_weight * MMD^2 + mse_weight * pseudobulk MSE``.

    Terms whose weight is 0 are not computed (MMD costs as much as the energy distance).

    Returns
    -------
    loss
        Scalar: the weighted terms averaged over the B sets.
    terms
        ``{"energy" | "mmd" | "mse": (B,) detached per-set values}`` for the terms that were computed, for logging.
    """
    fns = {"energy": energy_distance, "mmd": mmd_rbf, "mse": pseudobulk_mse}
    weights = {"energy": config.energy_weight, "mmd": config.mmd_weight, "mse": config.mse_weight}
    loss = pred.new_zeros((), dtype=torch.float32)
    terms: dict[str, Tensor] = {}
    for name, weight in weights.items():
        if weight:
            value = fns[name](pred, target)  # (B,)
            loss = loss + weight * value.mean()
            terms[name] = value.detach()
    return loss, terms
