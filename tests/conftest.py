"""Shared fixtures. Real reference data lives in ../shared/data beside the project; tests skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the calling test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (shared reference data is optional)")
    return path


@pytest.fixture
def perturbench_path() -> Path:
    return shared_file("perturbench_devel.h5ad")


def make_toy_perturbseq(
    *,
    n_genes: int = 30,
    cell_types: tuple[str, ...] = ("k562", "rpe1"),
    perturbations: tuple[str, ...] = ("GENE01", "GENE02", "GENE03", "GENE01+GENE02"),
    cells_per_group: int = 12,
    n_controls: int = 40,
    counts: bool = False,
    seed: int = 0,
):
    """A small Perturb-seq AnnData with Replogle-Nadig column names and a known shift per perturbation.

    Perturbation ``GENEkk`` lowers gene ``GENEkk`` by 2 log units and raises gene ``kk + 10`` by 1, so tests
    can check computed deltas against these numbers.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:02d}" for i in range(n_genes)]
    rows, obs = [], []
    for ct_i, ct in enumerate(cell_types):
        base = 2.0 + 0.3 * ct_i + 0.1 * np.arange(n_genes) % 1.5
        for pert, n in [("non-targeting", n_controls)] + [(p, cells_per_group) for p in perturbations]:
            shift = np.zeros(n_genes)
            if pert != "non-targeting":
                for g in pert.split("+"):
                    k = int(g[4:])
                    shift[k] -= 2.0
                    shift[(k + 10) % n_genes] += 1.0
            rows.append(base + shift + rng.normal(0, 0.1, size=(n, n_genes)))
            obs += [(pert, ct, f"{ct}_b{j % 2}") for j in range(n)]
    x = np.clip(np.vstack(rows), 0, None).astype(np.float32)
    obs_df = pd.DataFrame(obs, columns=["gene", "cell_line", "gem_group"])
    obs_df.index = [f"cell{i}" for i in range(len(obs_df))]
    if counts:
        x = rng.poisson(np.expm1(x) * 3).astype(np.float32)
    return ad.AnnData(X=x, obs=obs_df, var=pd.DataFrame(index=genes))


@pytest.fixture
def toy_adata():
    return make_toy_perturbseq()
