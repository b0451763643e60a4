r"""Perturb-seq simulator: CRISPRi knockdowns in several cell lines, with the ground truth kept.

The project's embedded default dataset and its scale test bed. Cells come out in the layout of the Arc
Institute release of Replogle-Nadig (``obs['gene']``, ``obs['cell_line']``, ``obs['gem_group']``, control label
``'non-targeting'``, ``A+B`` for doubles), with raw counts in ``layers['counts']`` and log-normalised values in
``X``, so every reader, split and model in the project runs on it unchanged.

Generative model
----------------
Indices: gene ``g`` (``G`` genes), program ``m`` (``M``), cell line ``c`` (``C``), perturbed gene ``j`` (one of the
``P`` genes of the perturbation pool), cell ``i``. ``unit(x) = x / ||x||_2``. ``N(a, s)`` has standard deviation
``s``.

Programs::

    k_g ~ U{1, ..., max_programs_per_gene}                     programs per gene
    A[g, m] ~ U(0.5, 1.5) on k_g random programs, else 0        membership loadings       (G, M)
    S[m, g] ~ N(0, 1) on program_size random genes, else 0      program signatures        (M, G)
    alpha[c, m] = exp(N(0, program_activity_sd))                activity of m in line c   (C, M)

Baseline (log of the mean count at size factor 1)::

    mu[g] ~ N(log baseline_median, baseline_log_sd)
    mu[c, g] = mu[g] + N(0, line_baseline_sd)                   shared + line-specific

Single knockdown of ``j`` in line ``c`` (a shift of the log mean; ``K = program_size``, ``w = program_weight``,
``rho = cross_line_correlation``)::

    p[c, j] = sum_m A[j, m] alpha[c, m] S[m, :]                 program part, line-scaled
    u[j]    ~ N(0, 1) on gene_effect_size genes                 gene-specific, shared by all lines
    v[c, j] ~ N(0, 1) on private_effect_size genes              private to (c, j)
    s[c, j] = unit(sqrt(w) unit(p[c, j]) + sqrt(1 - w) unit(u[j]))
    rhobar[j] = mean over line pairs c != c' of <s[c, j], s[c', j]>
    a[j]^2  = min(1, rho / rhobar[j])
    r[c, j] = clip(||p[c, j]|| / mean_c' ||p[c', j]||, 1/3, 3)  lines running j's programs harder respond more
    e[j]    = exp(N(0, effect_size_sd)), or 0 for the no_effect_fraction of the pool without downstream effect
    delta[c, j] = clip(effect_size sqrt(K) e[j] r[c, j] (a[j] s[c, j] + sqrt(1 - a[j]^2) unit(v[c, j])),
                       -max_abs_effect, max_abs_effect)
    delta[c, j][j] = log kd[c, j],  kd[c, j] ~ U(knockdown_range)   CRISPRi: the target itself always drops

The shared shapes ``s[c, j]`` are nearly parallel across lines and the private parts are nearly orthogonal to
everything, so ``corr(delta[c, j], delta[c', j]) ~= a[j]^2 rhobar[j] = rho`` (off the target gene), whenever
``rho <= rhobar[j]``. Knockdowns of genes that share programs have similar effects; that is what retrieval
exploits.

Double knockdown ``A+B`` (pairs of genes perturbed singly in the same line; ``iota`` shared by all lines)::

    iota[A+B] ~ N(0, 1) on interaction_size genes
    delta[c, A+B] = delta[c, A] + delta[c, B] + interaction_scale effect_size sqrt(K) unit(iota[A+B])
    delta[c, A+B][A] = log kd[c, A],  delta[c, A+B][B] = log kd[c, B]

Screen design::

    pool     P genes drawn from the 2P best expressed (by mu[g]): screens target expressed genes
    singles  each line knocks down n_perturbations genes of the pool (its own random subset)
    doubles  each line has n_doubles pairs, drawn from ceil(1.5 n_doubles) pairs of genes that every line
             knocks down singly, so most doubles recur across lines
    cells    n_control_cells controls per line; round(cells_per_perturbation exp(N(0, cells_per_perturbation_sd)))
             (at least 1) per (line, knockdown)

Cells (cell ``i`` of line ``c``, perturbation ``q``, gem group ``k_i``; ``delta = 0`` for controls)::

    k_i ~ U{1, ..., n_gem_groups},  b[c, k, g] ~ N(0, batch_effect_sd)
    log s_i ~ N(-size_factor_sd^2 / 2, size_factor_sd)          size factor, mean 1
    z_i ~ N(0, cell_state_sd) in R^M                            cell-to-cell program noise
    log m[i, g] = min(15, mu[c, g] + delta[c, q][g] + b[c, k_i, g] + (z_i S)[g] + log s_i)
    phi[g] = exp(N(log dispersion, dispersion_log_sd)),  theta[g] = 1 / phi[g]
    counts[i, g] ~ NB(mean m[i, g], variance m + phi m^2) = Poisson(m[i, g] Gamma(theta[g], scale=phi[g]))
    X[i, g] = log1p(1e4 counts[i, g] / sum_g' counts[i, g'])    scanpy normalize_total(1e4) + log1p

GenePT-like embeddings of every pool gene (``W ~ N(0, 1)`` of shape ``(M, d)``, ``o`` a fixed unit vector,
``b = embedding_baseline_cosine``)::

    eps_j ~ N(0, I / d)
    emb[j] = unit(sqrt(b) o + sqrt(1 - b) unit(unit(A[j] W) + eps_j / sqrt(embedding_snr)))

so unrelated genes sit at cosine ~``b`` (like GenePT's ada-002 vectors) and the signal-to-noise power ratio of the
membership part is ``embedding_snr``.

Randomness and determinism
--------------------------
Everything derives from ``seed`` through ``np.random.SeedSequence(seed, spawn_key=...)``: key ``(0,)`` draws the
model above, ``(1, c, q)`` the cells of the group (line ``c``, perturbation label index ``q``) and ``(2,)`` the
embeddings. Each group is sampled and normalised on its own, so neither ``chunk_cells`` nor the number of worker
processes changes a single byte of the output, and changing an embedding parameter leaves the cells untouched.
Byte identity holds for one set of numpy/h5py/anndata versions: their random streams and file layouts are not
promised across releases.

Cell order: line by line (``cell_lines`` order); within a line the controls, then the singles, then the doubles,
in label order. The ground truth is in ``adata.uns['simulation']`` (see :func:`simulate`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem
from tqdm.auto import tqdm

from retrieval_service.atomic import atomic_path
from retrieval_service.embeddings import GeneEmbeddings

__all__ = [
    "CONTROL_LABEL",
    "DEFAULT_CELL_LINES",
    "SimulatorConfig",
    "default_cell_lines",
    "describe_h5ad",
    "gene_symbols",
    "simulate",
    "simulate_to_h5ad",
]

logger = logging.getLogger(__name__)

CONTROL_LABEL = "non-targeting"
DEFAULT_CELL_LINES = ("k562", "rpe1", "jurkat", "hepg2")
PRESETS = ("default", "replogle")
EMBEDDING_SOURCE = "simulated-genept"

# SeedSequence spawn keys of the three independent random streams (see the module docstring).
_MODEL_KEY, _CELLS_KEY, _EMBED_KEY = 0, 1, 2
_TARGET_SUM = 1e4  # normalize_total target, as in scanpy's and the Replogle release's log-normalised X
# exp() of a log mean above this would only come from absurd parameters; clipping keeps Poisson finite.
_MAX_LOG_MEAN = 15.0
# HDF5 chunk of the appended CSR arrays (elements). Writes happen in whole chunks, so the file layout is the
# same whatever chunk_cells is; 2**18 float32 = 1 MiB keeps tiny files small and big files fast.
_H5_BLOCK = 1 << 18


# --- configuration --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Every size and parameter of the generative model (see the module docstring for the equations).

    The defaults make the project's embedded dataset: 4 lines, ~300 single knockdowns each out of a pool of 320,
    ~50 cells per knockdown, 2000 genes (~65k cells). :meth:`replogle_scale` gives Replogle-Nadig's size.
    """

    # --- sizes ---
    n_genes: int = 2000
    """Genes measured (``G``); all are in ``var``, named by :func:`gene_symbols`."""
    n_programs: int = 40
    """Gene programs (``M``)."""
    cell_lines: tuple[str, ...] = DEFAULT_CELL_LINES
    """Cell line names, in output order (``obs['cell_line']``)."""
    n_perturbation_pool: int = 320
    """Genes that may be knocked down (``P``); each line perturbs ``n_perturbations`` of them."""
    n_perturbations: int = 300
    """Single-gene knockdowns per line, drawn from the pool, so most are shared between lines."""
    n_doubles: int = 20
    """Double knockdowns ``A+B`` per line, from that line's singles (mostly the same pairs in every line)."""
    cells_per_perturbation: int = 50
    """Median cells per (line, knockdown) group."""
    cells_per_perturbation_sd: float = 0.2
    """Log-scale spread of the group sizes (0: every group has exactly ``cells_per_perturbation``)."""
    n_control_cells: int = 600
    """``'non-targeting'`` cells per line."""
    n_gem_groups: int = 3
    """10x lanes per line (``obs['gem_group']``, 1-based); each has its own small batch effect."""

    # --- expression ---
    baseline_median: float = 0.3
    """Median over genes of the mean count per cell; with the defaults ~70% of entries are zero."""
    baseline_log_sd: float = 1.5
    """Spread of log mean expression over genes (shared by lines)."""
    line_baseline_sd: float = 0.3
    """Line-specific deviation of each gene's log mean."""
    size_factor_sd: float = 0.4
    """Log-normal spread of per-cell size factors (library size)."""
    dispersion: float = 0.2
    """Median NB over-dispersion ``phi`` (variance ``m + phi m^2``)."""
    dispersion_log_sd: float = 0.5
    """Spread of ``log phi`` over genes."""
    batch_effect_sd: float = 0.05
    """Per (line, gem group, gene) log-scale batch shift."""
    cell_state_sd: float = 0.1
    """Per-cell random program activity, giving gene-gene correlation within every group."""

    # --- programs and effects ---
    max_programs_per_gene: int = 3
    """Each gene belongs to 1 to this many programs."""
    program_size: int = 50
    """Genes in each program's signature (``K``); also the scale of a typical effect's support."""
    program_activity_sd: float = 0.5
    """Log-scale spread of program activity between lines."""
    program_weight: float = 0.7
    """Share of the shared effect that comes from programs (the rest is gene-specific)."""
    gene_effect_size: int = 30
    """Genes hit by the gene-specific shared effect of each knockdown."""
    private_effect_size: int = 30
    """Genes hit by the line-private effect of each (line, knockdown)."""
    cross_line_correlation: float = 0.6
    """Target correlation, off the target gene, of one knockdown's effects in two lines."""
    no_effect_fraction: float = 0.2
    """Fraction of the pool whose knockdown changes nothing but the target gene itself."""
    effect_size: float = 0.5
    """Typical |log fold change| of an affected gene for a knockdown of median strength."""
    effect_size_sd: float = 0.6
    """Log-scale spread of knockdown strength (few strong, many weak, as in Perturb-seq screens)."""
    max_abs_effect: float = 3.0
    """Cap on any off-target |delta| (natural log; 3 is a 20-fold change) so rare strong knockdowns stay sane."""
    knockdown_range: tuple[float, float] = (0.2, 0.4)
    """Remaining fraction of the target's expression, uniform in this range per (line, gene)."""
    interaction_scale: float = 0.1
    """Size of the non-additive part of a double knockdown, relative to ``effect_size``."""
    interaction_size: int = 20
    """Genes hit by each double's interaction term."""

    # --- embeddings ---
    embedding_dim: int = 1536
    """Dimension of the GenePT-like vectors (ada-002's 1536)."""
    embedding_snr: float = 1.0
    """Power ratio of program-membership signal to noise in the embeddings (``inf``: noiseless)."""
    embedding_baseline_cosine: float = 0.7
    """Cosine of two unrelated genes' embeddings (GenePT vectors share a large common direction)."""

    def __post_init__(self) -> None:
        # Normalise containers first so that configs read back from h5ad/JSON (lists, numpy types) compare equal.
        object.__setattr__(self, "cell_lines", tuple(str(c) for c in _as_sequence(self.cell_lines)))
        object.__setattr__(self, "knockdown_range", tuple(float(x) for x in _as_sequence(self.knockdown_range)))
        problems = self._problems()
        if problems:
            msg = "invalid SimulatorConfig: " + "; ".join(problems)
            raise ValueError(msg)

    def _problems(self) -> list[str]:
        out: list[str] = []
        ints_min = {
            "n_genes": 1,
            "n_programs": 1,
            "n_perturbation_pool": 1,
            "n_perturbations": 1,
            "n_doubles": 0,
            "cells_per_perturbation": 1,
            "n_control_cells": 1,
            "n_gem_groups": 1,
            "max_programs_per_gene": 1,
            "program_size": 1,
            "gene_effect_size": 1,
            "private_effect_size": 1,
            "interaction_size": 1,
            "embedding_dim": 1,
        }
        for name, lo in ints_min.items():
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool):
                out.append(f"{name} must be an integer, got {v!r}")
            elif v < lo:
                out.append(f"{name} must be >= {lo}, got {v}")
        nonneg = (
            "cells_per_perturbation_sd",
            "baseline_log_sd",
            "line_baseline_sd",
            "size_factor_sd",
            "dispersion_log_sd",
            "batch_effect_sd",
            "cell_state_sd",
            "program_activity_sd",
            "effect_size",
            "effect_size_sd",
            "interaction_scale",
        )
        for name in nonneg:
            v = getattr(self, name)
            if not (isinstance(v, int | float | np.number) and math.isfinite(v) and v >= 0):
                out.append(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("baseline_median", "dispersion", "max_abs_effect"):
            v = getattr(self, name)
            if not (isinstance(v, int | float | np.number) and math.isfinite(v) and v > 0):
                out.append(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("cross_line_correlation", "no_effect_fraction", "program_weight"):
            v = getattr(self, name)
            if not (isinstance(v, int | float | np.number) and 0 <= v <= 1):
                out.append(f"{name} must be in [0, 1], got {v!r}")
        b = self.embedding_baseline_cosine
        if not (isinstance(b, int | float | np.number) and 0 <= b < 1):
            out.append(f"embedding_baseline_cosine must be in [0, 1), got {b!r}")
        snr = self.embedding_snr
        if not (isinstance(snr, int | float | np.number) and snr > 0):
            out.append(f"embedding_snr must be > 0 (inf allowed), got {snr!r}")
        if not self.cell_lines:
            out.append("cell_lines must name at least one line")
        elif len(set(self.cell_lines)) != len(self.cell_lines) or any(not c for c in self.cell_lines):
            out.append(f"cell_lines must be distinct non-empty names, got {list(self.cell_lines)}")
        kd = self.knockdown_range
        if len(kd) != 2 or not (0 < kd[0] <= kd[1] <= 1):
            out.append(f"knockdown_range must be (lo, hi) with 0 < lo <= hi <= 1, got {kd}")
        if out:  # the cross-field checks below assume well-typed fields
            return out
        if self.n_perturbation_pool > self.n_genes:
            out.append(f"n_perturbation_pool ({self.n_perturbation_pool}) must be <= n_genes ({self.n_genes})")
        if self.n_perturbations > self.n_perturbation_pool:
            out.append(
                f"n_perturbations ({self.n_perturbations}) must be <= n_perturbation_pool ({self.n_perturbation_pool})"
            )
        max_pairs = self.n_perturbations * (self.n_perturbations - 1) // 2
        if self.n_doubles > max_pairs:
            out.append(f"n_doubles ({self.n_doubles}) exceeds the {max_pairs} pairs of {self.n_perturbations} genes")
        if self.max_programs_per_gene > self.n_programs:
            out.append(
                f"max_programs_per_gene ({self.max_programs_per_gene}) must be <= n_programs ({self.n_programs})"
            )
        for name in ("program_size", "gene_effect_size", "private_effect_size", "interaction_size"):
            if getattr(self, name) > self.n_genes:
                out.append(f"{name} ({getattr(self, name)}) must be <= n_genes ({self.n_genes})")
        return out

    # --- presets and round trips ---

    @classmethod
    def replogle_scale(cls, **overrides: Any) -> SimulatorConfig:
        """Replogle-Nadig's size: 4 lines x 2000 knockdowns x ~75 cells x 2000 genes (~610k cells).

        Every gene is in the pool and every line perturbs all of it, as in a genome-wide-essential screen
        restricted to 2000 measured genes; 3000 controls per line.
        """
        base = {
            "n_genes": 2000,
            "n_perturbation_pool": 2000,
            "n_perturbations": 2000,
            "cells_per_perturbation": 75,
            "n_control_cells": 3000,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SimulatorConfig:
        """The named preset (``'default'`` or ``'replogle'``) with ``overrides`` applied.

        When ``n_perturbations`` is overridden without ``n_perturbation_pool``, the pool keeps the preset's ratio
        of pool to per-line knockdowns (capped at ``n_genes``), so that one flag resizes a consistent dataset.
        """
        if name not in PRESETS:
            msg = f"unknown simulator preset {name!r}; choose one of {list(PRESETS)}"
            raise ValueError(msg)
        base = cls.replogle_scale() if name == "replogle" else cls()
        if "n_perturbations" in overrides and "n_perturbation_pool" not in overrides:
            ratio = base.n_perturbation_pool / base.n_perturbations
            n_genes = overrides.get("n_genes", base.n_genes)
            overrides["n_perturbation_pool"] = min(n_genes, round(overrides["n_perturbations"] * ratio))
        return dataclasses.replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (tuples become lists), JSON- and h5ad-serialisable."""
        out = dataclasses.asdict(self)
        out["cell_lines"] = list(self.cell_lines)
        out["knockdown_range"] = list(self.knockdown_range)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulatorConfig:
        """Inverse of :meth:`to_dict`; accepts numpy scalars and arrays, as read back from ``.h5ad``."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            msg = f"unknown SimulatorConfig fields {unknown}"
            raise ValueError(msg)
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            kwargs[k] = v
        return cls(**kwargs)


def _as_sequence(x: Any) -> Sequence[Any]:
    if isinstance(x, str):  # a bare string would otherwise become a tuple of characters
        return (x,)
    return list(np.asarray(x).tolist()) if isinstance(x, np.ndarray) else list(x)


def gene_symbols(n_genes: int) -> tuple[str, ...]:
    """Deterministic gene names ``GENE0001``... (zero-padded so that string order is index order)."""
    width = max(4, len(str(n_genes)))
    return tuple(f"GENE{i:0{width}d}" for i in range(1, n_genes + 1))


def default_cell_lines(n: int) -> tuple[str, ...]:
    """The first ``n`` of :data:`DEFAULT_CELL_LINES`, then ``line5``, ``line6``...."""
    if n < 1:
        msg = f"need at least one cell line, got n={n}"
        raise ValueError(msg)
    extra = tuple(f"line{i}" for i in range(len(DEFAULT_CELL_LINES) + 1, n + 1))
    return (DEFAULT_CELL_LINES + extra)[:n]


# --- the model: everything but the cells ----------------------------------------------------------------


@dataclass
class _Group:
    line: int  # index into config.cell_lines
    label: int  # index into _Model.labels
    n_cells: int
    delta_row: int  # row of _Model.delta, -1 for controls


@dataclass
class _Model:
    """The drawn parameters: everything a worker needs to sample any group (inherited by forked workers)."""

    config: SimulatorConfig
    seed: int
    genes: tuple[str, ...]
    labels: list[str]  # all perturbation labels, control first; the index keys each group's RNG
    groups: list[_Group]  # in cell order
    delta: np.ndarray  # (n_pairs, G) float32, one row per non-control group
    base: np.ndarray  # (C, G) float32 log mean at size factor 1
    batch: np.ndarray  # (C, n_gem, G) float32
    phi: np.ndarray  # (G,) float32 NB over-dispersion
    signature_t: sp.csr_matrix  # (G, M) float32, S transposed, for the per-cell program noise
    loadings: np.ndarray  # (G, M) float32, A
    signatures: np.ndarray  # (M, G) float32, S
    activity: np.ndarray  # (C, M) float32, alpha
    pool: np.ndarray  # (P,) int64 gene indices, ascending
    no_effect: np.ndarray  # (P,) bool
    knockdown: np.ndarray  # (C, P) float32 remaining fraction of each target

    @property
    def n_obs(self) -> int:
        return sum(g.n_cells for g in self.groups)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _unit(x: np.ndarray) -> np.ndarray:
    """Unit L2 norm along the last axis (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _sparse_rows(rng: np.random.Generator, n_rows: int, n_cols: int, k: int) -> np.ndarray:
    """``(n_rows, n_cols)`` float64, each row N(0, 1) on ``k`` distinct random columns and zero elsewhere."""
    out = np.zeros((n_rows, n_cols))
    cols = np.argpartition(rng.random((n_rows, n_cols)), k - 1, axis=1)[:, :k]  # k distinct columns per row
    np.put_along_axis(out, cols, rng.normal(size=(n_rows, k)), axis=1)
    return out


def _draw_pairs(
    rng: np.random.Generator, genes: np.ndarray, n: int, exclude: set[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Up to ``n`` distinct sorted pairs of ``genes``, none in ``exclude``, in draw order."""
    members = {int(g) for g in genes}
    seen = {p for p in exclude if p[0] in members and p[1] in members}
    n = min(n, len(members) * (len(members) - 1) // 2 - len(seen))
    out: list[tuple[int, int]] = []
    while len(out) < n:
        a, b = sorted(int(g) for g in rng.choice(genes, 2, replace=False))
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def _build_model(config: SimulatorConfig, seed: int) -> _Model:
    """Draw every parameter of the module docstring's model except the cells themselves."""
    cfg = config
    rng = _rng(seed, _MODEL_KEY)
    G, M, C, P = cfg.n_genes, cfg.n_programs, len(cfg.cell_lines), cfg.n_perturbation_pool
    genes = gene_symbols(G)

    # Programs: membership A (G, M), signatures S (M, G), activity alpha (C, M).
    n_member = rng.integers(1, cfg.max_programs_per_gene + 1, size=G)
    rank = np.argsort(rng.random((G, M)), axis=1).argsort(axis=1)  # a random permutation of programs per gene
    loadings = np.where(rank < n_member[:, None], rng.uniform(0.5, 1.5, size=(G, M)), 0.0)
    signatures = _sparse_rows(rng, M, G, cfg.program_size)
    activity = np.exp(rng.normal(0.0, cfg.program_activity_sd, size=(C, M)))

    # Baseline, dispersion, batches.
    mu = rng.normal(math.log(cfg.baseline_median), cfg.baseline_log_sd, size=G)
    base = mu + rng.normal(0.0, cfg.line_baseline_sd, size=(C, G))
    phi = np.exp(rng.normal(math.log(cfg.dispersion), cfg.dispersion_log_sd, size=G))
    batch = rng.normal(0.0, cfg.batch_effect_sd, size=(C, cfg.n_gem_groups, G))

    # The pool comes from the better-expressed half: screens target expressed genes, and knocking down an
    # unexpressed gene would show nothing, not even the target's own drop.
    candidates = np.argsort(-mu, kind="stable")[: min(G, 2 * P)]
    pool = np.sort(rng.choice(candidates, P, replace=False))
    no_effect = np.zeros(P, dtype=bool)
    no_effect[rng.choice(P, round(cfg.no_effect_fraction * P), replace=False)] = True
    strength = np.where(no_effect, 0.0, np.exp(rng.normal(0.0, cfg.effect_size_sd, size=P)))
    knockdown = rng.uniform(*cfg.knockdown_range, size=(C, P))

    # Single effects, line by line to keep (C, P, G) temporaries to one float32 array.
    w = cfg.program_weight
    gene_specific = _unit(_sparse_rows(rng, P, G, cfg.gene_effect_size))  # (P, G)
    shared = np.empty((C, P, G), dtype=np.float32)
    prog_norm = np.empty((C, P))
    for c in range(C):
        prog = (loadings[pool] * activity[c]) @ signatures  # (P, G)
        prog_norm[c] = np.linalg.norm(prog, axis=1)
        shared[c] = _unit(math.sqrt(w) * _unit(prog) + math.sqrt(1 - w) * gene_specific)
    if C > 1:
        # ||sum_c s_c||^2 = C + sum_{c != c'} <s_c, s_c'> for unit s_c.
        total = shared.sum(axis=0, dtype=np.float64)
        rhobar = ((total**2).sum(axis=1) - C) / (C * (C - 1))
    else:
        rhobar = np.ones(P)
    a2 = np.clip(cfg.cross_line_correlation / np.maximum(rhobar, 1e-12), 0.0, 1.0)
    line_scale = np.clip(prog_norm / np.maximum(prog_norm.mean(axis=0), 1e-12), 1 / 3, 3.0)  # (C, P)
    amplitude = cfg.effect_size * math.sqrt(cfg.program_size) * strength  # (P,)
    single = np.empty((C, P, G), dtype=np.float32)
    for c in range(C):
        private = _unit(_sparse_rows(rng, P, G, cfg.private_effect_size))
        mix = np.sqrt(a2)[:, None] * shared[c] + np.sqrt(1 - a2)[:, None] * private
        single[c] = np.clip((amplitude * line_scale[c])[:, None] * mix, -cfg.max_abs_effect, cfg.max_abs_effect)
        single[c, np.arange(P), pool] = np.log(knockdown[c])
    del shared

    # Which knockdowns each line has: singles, then doubles mostly shared between lines.
    line_singles = [np.sort(rng.choice(P, cfg.n_perturbations, replace=False)) for _ in range(C)]
    common = line_singles[0]
    for s in line_singles[1:]:
        common = np.intersect1d(common, s)
    candidates_pairs = _draw_pairs(rng, common, math.ceil(1.5 * cfg.n_doubles), set())
    line_doubles: list[list[tuple[int, int]]] = []
    for c in range(C):
        order = rng.permutation(len(candidates_pairs)) if candidates_pairs else np.array([], dtype=int)
        picked = [candidates_pairs[i] for i in order[: cfg.n_doubles]]
        picked += _draw_pairs(rng, line_singles[c], cfg.n_doubles - len(picked), set(picked))
        line_doubles.append(picked)
    all_pairs = sorted({p for ds in line_doubles for p in ds})
    interaction = cfg.interaction_scale * cfg.effect_size * math.sqrt(cfg.program_size)
    iota_rows = _unit(_sparse_rows(rng, len(all_pairs), G, cfg.interaction_size))
    iota = {p: interaction * v for p, v in zip(all_pairs, iota_rows, strict=True)}

    # Labels (control, pool singles, doubles; index = RNG key) and the groups in cell order.
    labels = [CONTROL_LABEL, *(genes[g] for g in pool)]
    single_label = {j: 1 + j for j in range(P)}
    pair_label = {p: len(labels) + i for i, p in enumerate(all_pairs)}
    labels += [f"{genes[pool[a]]}+{genes[pool[b]]}" for a, b in all_pairs]  # sorted, like format_perturbation
    groups: list[_Group] = []
    rows: list[np.ndarray] = []
    for c in range(C):
        groups.append(_Group(c, 0, cfg.n_control_cells, -1))
        members: list[tuple[int, np.ndarray]] = []
        for j in line_singles[c]:
            members.append((single_label[int(j)], single[c, j]))
        for a, b in sorted(line_doubles[c]):
            d = (single[c, a] + single[c, b] + iota[(a, b)]).astype(np.float32)
            d[pool[a]] = single[c, a, pool[a]]
            d[pool[b]] = single[c, b, pool[b]]
            members.append((pair_label[(a, b)], d))
        sizes = cfg.cells_per_perturbation * np.exp(rng.normal(0.0, cfg.cells_per_perturbation_sd, len(members)))
        for (label, d), n in zip(members, np.maximum(1, np.round(sizes)).astype(int), strict=True):
            groups.append(_Group(c, label, int(n), len(rows)))
            rows.append(d)
    delta = np.stack(rows) if rows else np.zeros((0, G), dtype=np.float32)

    sig32 = signatures.astype(np.float32)
    return _Model(
        config=cfg,
        seed=seed,
        genes=genes,
        labels=labels,
        groups=groups,
        delta=delta,
        base=base.astype(np.float32),
        batch=batch.astype(np.float32),
        phi=phi.astype(np.float32),
        signature_t=sp.csr_matrix(sig32.T),
        loadings=loadings.astype(np.float32),
        signatures=sig32,
        activity=activity.astype(np.float32),
        pool=pool.astype(np.int64),
        no_effect=no_effect,
        knockdown=knockdown.astype(np.float32),
    )


def _embeddings(model: _Model) -> GeneEmbeddings:
    """GenePT-like vectors of the pool genes (module docstring), from their own random stream."""
    cfg = model.config
    rng = _rng(model.seed, _EMBED_KEY)
    d = cfg.embedding_dim
    w = rng.normal(size=(cfg.n_programs, d))
    common = _unit(rng.normal(size=d))
    noise = rng.normal(size=(len(model.pool), d)) / math.sqrt(d)
    signal = _unit(model.loadings[model.pool].astype(np.float64) @ w)
    inner = _unit(signal + noise / math.sqrt(cfg.embedding_snr))
    b = cfg.embedding_baseline_cosine
    vectors = _unit(math.sqrt(b) * common + math.sqrt(1 - b) * inner).astype(np.float32)
    return GeneEmbeddings(tuple(model.genes[g] for g in model.pool), vectors, EMBEDDING_SOURCE)


# --- cells ----------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """CSR pieces of consecutive cells (one group or a chunk of groups)."""

    x: np.ndarray  # (nnz,) float32 log-normalised
    counts: np.ndarray  # (nnz,) float32 integer counts
    indices: np.ndarray  # (nnz,) int32 gene index
    row_nnz: np.ndarray  # (n,) int64
    total: np.ndarray  # (n,) float64 counts per cell
    gem: np.ndarray  # (n,) int16 0-based gem group

    @staticmethod
    def concat(blocks: Sequence[_Block]) -> _Block:
        return _Block(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in dataclasses.fields(_Block)))


def _sample_group(model: _Model, group: _Group) -> _Block:
    """The cells of one (line, perturbation) group, from the group's own RNG (module docstring, "Cells")."""
    cfg = model.config
    c, n = group.line, group.n_cells
    rng = _rng(model.seed, _CELLS_KEY, c, group.label)
    gem = rng.integers(0, cfg.n_gem_groups, size=n)
    sd = cfg.size_factor_sd
    log_sf = rng.normal(-0.5 * sd * sd, sd, size=n).astype(np.float32)
    log_mean = model.base[c] + model.batch[c, gem] + log_sf[:, None]  # (n, G)
    if group.delta_row >= 0:
        log_mean += model.delta[group.delta_row]
    if cfg.cell_state_sd > 0:
        z = rng.normal(0.0, cfg.cell_state_sd, size=(cfg.n_programs, n)).astype(np.float32)
        # scipy's sparse @ dense is a plain loop: unlike BLAS, its result cannot depend on the thread count.
        log_mean += (model.signature_t @ z).T
    np.minimum(log_mean, _MAX_LOG_MEAN, out=log_mean)
    lam = np.exp(log_mean)
    lam *= rng.standard_gamma(np.broadcast_to(1.0 / model.phi, lam.shape), dtype=np.float32)
    lam *= model.phi  # Gamma(theta, scale=phi) has mean 1
    counts = rng.poisson(lam)  # (n, G) int64
    flat = np.flatnonzero(counts)
    rows, cols = np.divmod(flat, counts.shape[1])
    vals = counts.ravel()[flat]
    total = counts.sum(axis=1).astype(np.float64)
    scale = _TARGET_SUM / np.where(total > 0, total, 1.0)
    x = np.log1p(vals * scale[rows]).astype(np.float32)
    return _Block(
        x=x,
        counts=vals.astype(np.float32),
        indices=cols.astype(np.int32),
        row_nnz=np.bincount(rows, minlength=n).astype(np.int64),
        total=total,
        gem=gem.astype(np.int16),
    )


def _sample_chunk(model: _Model, groups: Sequence[_Group]) -> _Block:
    return _Block.concat([_sample_group(model, g) for g in groups])


def _plan_chunks(groups: Sequence[_Group], chunk_cells: int) -> list[list[_Group]]:
    """Consecutive whole groups, about ``chunk_cells`` cells each (a group is never split)."""
    chunks: list[list[_Group]] = [[]]
    n = 0
    for g in groups:
        if n >= chunk_cells:
            chunks.append([])
            n = 0
        chunks[-1].append(g)
        n += g.n_cells
    return [ch for ch in chunks if ch]


_WORKER_MODEL: _Model | None = None


def _init_worker(model: _Model) -> None:
    global _WORKER_MODEL  # a worker process holds exactly one model
    _WORKER_MODEL = model


def _worker_chunk(groups: list[_Group]) -> _Block:
    assert _WORKER_MODEL is not None, "worker not initialised"
    return _sample_chunk(_WORKER_MODEL, groups)


def _iter_chunks(model: _Model, chunks: list[list[_Group]], *, n_workers: int) -> Iterator[_Block]:
    """Sampled chunks in order; with ``n_workers > 1``, at most ``2 * n_workers`` are in flight."""
    if n_workers <= 1:
        for ch in chunks:
            yield _sample_chunk(model, ch)
        return
    # fork where the OS has it: workers inherit the model without pickling it, and, unlike spawn, the caller's
    # script needs no `if __name__ == "__main__":` guard. Workers only run numpy/scipy code, none of the
    # thread pools (torch, OpenMP) that make forking a threaded parent risky.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        n_workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker, initargs=(model,)
    )
    try:
        todo = iter(chunks)
        pending: deque[Future[_Block]] = deque()
        for ch in todo:
            pending.append(pool.submit(_worker_chunk, ch))
            if len(pending) >= 2 * n_workers:
                break
        while pending:
            block = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_worker_chunk, nxt))
            yield block
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- AnnData assembly -----------------------------------------------------------------------------------


def _obs(model: _Model, total: np.ndarray, gem: np.ndarray) -> pd.DataFrame:
    """``obs`` in cell order from the per-cell total counts ``(n_obs,)`` and 0-based gem groups ``(n_obs,)``."""
    cfg = model.config
    present = sorted({g.label for g in model.groups})
    code_of = {lab: i for i, lab in enumerate(present)}
    sizes = np.array([g.n_cells for g in model.groups])
    gene_codes = np.repeat([code_of[g.label] for g in model.groups], sizes)
    line_codes = np.repeat([g.line for g in model.groups], sizes)
    names: list[str] = []
    for c, line in enumerate(cfg.cell_lines):
        n_line = int((line_codes == c).sum())
        names += [f"{line}_{i:07d}" for i in range(n_line)]
    return pd.DataFrame(
        {
            "gene": pd.Categorical.from_codes(gene_codes, categories=[model.labels[i] for i in present]),
            "cell_line": pd.Categorical.from_codes(line_codes, categories=list(cfg.cell_lines)),
            "gem_group": gem.astype(np.int64) + 1,
            "UMI_count": total.astype(np.float64),
        },
        index=pd.Index(names, dtype=object),
    )


def _var(model: _Model) -> pd.DataFrame:
    return pd.DataFrame(index=pd.Index(list(model.genes), dtype=object))


def _truth(model: _Model) -> dict[str, Any]:
    """``uns['simulation']``: only h5ad-serialisable values (numpy arrays, str/int/float scalars, dicts)."""
    cfg = model.config
    pairs = [g for g in model.groups if g.delta_row >= 0]
    return {
        "config": {k: np.asarray(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()},
        "seed": int(model.seed),
        "cell_lines": np.asarray(cfg.cell_lines, dtype=object),
        "delta": model.delta,
        "delta_cell_line": np.asarray([cfg.cell_lines[g.line] for g in pairs], dtype=object),
        "delta_perturbation": np.asarray([model.labels[g.label] for g in pairs], dtype=object),
        "baseline_log_mean": model.base,
        "batch_effect": model.batch,
        "dispersion": model.phi,
        "program_loadings": model.loadings,
        "program_signatures": model.signatures,
        "program_activity": model.activity,
        "perturbation_pool": np.asarray([model.genes[g] for g in model.pool], dtype=object),
        "no_effect": np.asarray([model.genes[g] for g in model.pool[model.no_effect]], dtype=object),
        "knockdown": model.knockdown,
    }


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}"
        raise ValueError(msg)
    return int(seed)


def simulate(config: SimulatorConfig | None = None, *, seed: int = 0) -> tuple[ad.AnnData, GeneEmbeddings]:
    """Simulate a Perturb-seq dataset in memory (use :func:`simulate_to_h5ad` for Replogle-Nadig scale).

    Parameters
    ----------
    config
        The model's sizes and parameters; ``None`` for the defaults.
    seed
        Non-negative; the same seed and config give the same arrays, bit for bit.

    Returns
    -------
    adata
        ``(n_cells, n_genes)``, cells in the order of the module docstring.

        adata.X
            CSR float32, ``log1p(1e4 * counts / counts per cell)``.
        adata.layers['counts']
            CSR float32 raw counts (integers), same sparsity as ``X``.
        adata.obs
            ``gene`` (categorical perturbation label: ``'non-targeting'``, ``'A'`` or ``'A+B'``),
            ``cell_line`` (categorical), ``gem_group`` (int64, 1-based), ``UMI_count`` (float64).
        adata.var_names
            Gene symbols from :func:`gene_symbols`.
        adata.uns['simulation']
            ``config`` (dict of :class:`SimulatorConfig` fields), ``seed``, ``cell_lines``;
            ``delta`` ``(n_pairs, G)`` float32, the true shift of the log mean of every (line, perturbation)
            pair, labelled by ``delta_cell_line`` and ``delta_perturbation`` ``(n_pairs,)`` (controls: zero, omitted);
            ``baseline_log_mean`` ``(C, G)``, ``batch_effect`` ``(C, n_gem_groups, G)``, ``dispersion`` ``(G,)``;
            ``program_loadings`` ``(G, M)``, ``program_signatures`` ``(M, G)``, ``program_activity`` ``(C, M)``;
            ``perturbation_pool`` ``(P,)`` and ``knockdown`` ``(C, P)`` (remaining fraction of each target);
            ``no_effect``: the pool genes whose knockdown changes only the target.
    embeddings
        :class:`~retrieval_service.embeddings.GeneEmbeddings` of the ``P`` pool genes, ``(P, embedding_dim)``
        float32 unit rows, source ``'simulated-genept'``.
    """
    config = config if config is not None else SimulatorConfig()
    seed = _check_seed(seed)
    start = time.perf_counter()
    model = _build_model(config, seed)
    block = _sample_chunk(model, model.groups)
    indptr = np.concatenate([[0], np.cumsum(block.row_nnz)])
    shape = (model.n_obs, config.n_genes)
    adata = ad.AnnData(
        X=sp.csr_matrix((block.x, block.indices, indptr), shape=shape),
        obs=_obs(model, block.total, block.gem),
        var=_var(model),
        layers={"counts": sp.csr_matrix((block.counts, block.indices.copy(), indptr.copy()), shape=shape)},
        uns={"simulation": _truth(model)},
    )
    logger.info("simulated %d cells x %d genes in %.1fs", *shape, time.perf_counter() - start)
    return adata, _embeddings(model)


# --- streaming to .h5ad ---------------------------------------------------------------------------------


class _BlockAppender:
    """Appends to a resizable 1-D HDF5 dataset in whole ``_H5_BLOCK`` chunks.

    Writing only whole chunks (plus the tail at :meth:`close`) makes the sequence of HDF5 operations, and so
    the file's bytes, independent of how the caller slices its data.
    """

    def __init__(self, group: h5py.Group, name: str, dtype: type) -> None:
        self.ds = group.create_dataset(
            name, shape=(0,), maxshape=(None,), chunks=(_H5_BLOCK,), dtype=dtype, track_times=False
        )
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def append(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.n_pending += len(values)
        if self.n_pending >= _H5_BLOCK:
            buf = np.concatenate(self.pending)
            n_full = len(buf) // _H5_BLOCK * _H5_BLOCK
            for start in range(0, n_full, _H5_BLOCK):
                self._write(buf[start : start + _H5_BLOCK])
            self.pending = [buf[n_full:]]
            self.n_pending = len(buf) - n_full

    def close(self) -> None:
        if self.n_pending:
            self._write(np.concatenate(self.pending))
        self.pending, self.n_pending = [], 0

    def _write(self, values: np.ndarray) -> None:
        n = self.ds.shape[0]
        self.ds.resize((n + len(values),))
        self.ds[n:] = values


def _csr_group(parent: h5py.Group, name: str, shape: tuple[int, int]) -> h5py.Group:
    g = parent.create_group(name, track_order=False)
    g.attrs["encoding-type"] = "csr_matrix"
    g.attrs["encoding-version"] = "0.1.0"
    g.attrs["shape"] = np.asarray(shape, dtype=np.int64)
    return g


def simulate_to_h5ad(
    config: SimulatorConfig | None,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    chunk_cells: int = 8192,
    n_workers: int = 1,
    embeddings_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Simulate straight to an ``.h5ad`` file, chunk by chunk, in bounded memory.

    Same content as :func:`simulate` with the same ``config`` and ``seed`` (see there for the slots). ``X`` and
    ``layers['counts']`` are appended to the file's CSR datasets as chunks are sampled; only the per-cell
    ``obs`` columns and the ground truth are held whole. The output bytes do not depend on ``chunk_cells`` or
    ``n_workers``. The file appears at ``path`` only when complete (written beside it, then renamed).

    ``X`` and ``layers['counts']`` have the same sparsity pattern, so ``layers/counts/indices`` and
    ``layers/counts/indptr`` are HDF5 hard links to ``X/indices`` and ``X/indptr``: a quarter less to write
    and store. Readers (``anndata.read_h5ad``, backed mode, h5py) see two ordinary matrices; only an in-place
    edit of one matrix's structure through h5py would show in the other.

    Parameters
    ----------
    config
        ``None`` for the defaults; :meth:`SimulatorConfig.replogle_scale` for Replogle-Nadig scale.
    path
        Output ``.h5ad``.
    seed
        Non-negative integer.
    chunk_cells
        About this many cells (whole perturbation groups) are sampled and written at a time. Memory grows with
        it: a chunk of the default 8192 cells x 2000 genes is ~0.1 GiB of CSR arrays, held about twice in the
        writer and in each worker while it passes between them.
    n_workers
        Processes sampling chunks in parallel (``1``: in this process).
    embeddings_path
        Where to also write the GenePT-like embeddings (``GeneEmbeddings.save_npz``); ``None`` to skip.
    overwrite
        Replace existing output files; otherwise an existing ``path`` or ``embeddings_path`` is an error,
        raised before any work.
    progress
        Show a tqdm bar (cells).

    Returns
    -------
    path
        The written file, as a :class:`~pathlib.Path`.
    """
    config = config if config is not None else SimulatorConfig()
    seed = _check_seed(seed)
    path = Path(path)
    if chunk_cells < 1 or n_workers < 1:
        msg = f"chunk_cells and n_workers must be >= 1, got chunk_cells={chunk_cells}, n_workers={n_workers}"
        raise ValueError(msg)
    outputs = [path] + ([Path(embeddings_path)] if embeddings_path is not None else [])
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        msg = f"output already exists: {', '.join(existing)}; pass overwrite=True (CLI: --overwrite) or another path"
        raise FileExistsError(msg)

    start = time.perf_counter()
    model = _build_model(config, seed)
    n_obs, n_genes = model.n_obs, config.n_genes
    chunks = _plan_chunks(model.groups, chunk_cells)
    logger.info(
        "simulating %d cells x %d genes in %d chunks (%d worker%s); model drawn in %.1fs",
        n_obs, n_genes, len(chunks), n_workers, "" if n_workers == 1 else "s", time.perf_counter() - start,
    )  # fmt: skip
    row_nnz = np.empty(n_obs, dtype=np.int64)
    total = np.empty(n_obs, dtype=np.float64)
    gem = np.empty(n_obs, dtype=np.int16)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x_group = _csr_group(f, "X", (n_obs, n_genes))
        layers = f.create_group("layers")
        layers.attrs["encoding-type"] = "dict"
        layers.attrs["encoding-version"] = "0.1.0"
        counts_group = _csr_group(layers, "counts", (n_obs, n_genes))
        x_data = _BlockAppender(x_group, "data", np.float32)
        indices = _BlockAppender(x_group, "indices", np.int32)
        counts_data = _BlockAppender(counts_group, "data", np.float32)
        counts_group["indices"] = x_group["indices"]  # hard link: same sparsity pattern
        row = 0
        with tqdm(total=n_obs, unit="cell", desc="simulate", disable=not progress) as bar:
            t_write = 0.0
            for block in _iter_chunks(model, chunks, n_workers=n_workers):
                t0 = time.perf_counter()
                n = len(block.row_nnz)
                row_nnz[row : row + n], total[row : row + n], gem[row : row + n] = block.row_nnz, block.total, block.gem
                row += n
                x_data.append(block.x)
                counts_data.append(block.counts)
                indices.append(block.indices)
                t_write += time.perf_counter() - t0
                bar.update(n)
        assert row == n_obs, f"wrote {row} cells, expected {n_obs}"
        for appender in (x_data, counts_data, indices):
            appender.close()
        logger.info("cells sampled and written in %.1fs, of which writing %.1fs", time.perf_counter() - start, t_write)
        indptr = np.concatenate([[0], np.cumsum(row_nnz)]).astype(np.int64)
        x_group.create_dataset("indptr", data=indptr, track_times=False)
        counts_group["indptr"] = x_group["indptr"]
        write_elem(f, "obs", _obs(model, total, gem))
        write_elem(f, "var", _var(model))
        write_elem(f, "uns", {"simulation": _truth(model)})
        for empty in ("obsm", "varm", "obsp", "varp"):
            write_elem(f, empty, {})
    if embeddings_path is not None:
        _embeddings(model).save_npz(embeddings_path)
    elapsed = time.perf_counter() - start
    logger.info(
        "wrote %s: %d cells, %d nonzeros, %.1fs (%.0f cells/s)", path, n_obs, int(indptr[-1]), elapsed, n_obs / elapsed
    )
    return path


def describe_h5ad(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Sizes of a Perturb-seq ``.h5ad`` read from its metadata only (no matrix is loaded).

    Returns
    -------
    dict
        ``n_cells``, ``n_genes``, ``nnz``, ``density`` (fraction of nonzero entries of ``X``), ``cell_lines``
        (list), ``n_perturbations`` (distinct labels other than the control), ``file_bytes``.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        n_cells, n_genes = (int(s) for s in f["X"].attrs["shape"])
        nnz = int(f["X/data"].shape[0])
        lines = [s.decode() if isinstance(s, bytes) else str(s) for s in f["obs/cell_line/categories"][()]]
        labels = [s.decode() if isinstance(s, bytes) else str(s) for s in f["obs/gene/categories"][()]]
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "nnz": nnz,
        "density": nnz / max(n_cells * n_genes, 1),
        "cell_lines": lines,
        "n_perturbations": sum(lab != CONTROL_LABEL for lab in labels),
        "file_bytes": path.stat().st_size,
    }
