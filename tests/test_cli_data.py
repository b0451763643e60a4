"""The data-layer CLI commands end to end: split and profiles, with errors printed, not raised."""

from __future__ import annotations

import anndata as ad
import numpy as np
from conftest import make_toy_perturbseq

from api.cli import main
from model.data.splits import Split


def test_split_and_profiles_commands(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    make_toy_perturbseq(counts=True).write_h5ad(data)
    out = tmp_path / "split.json"
    assert (
        main(
            [
                "split",
                "--data",
                str(data),
                "--kind",
                "fewshot_celltype",
                "--target-cell-type",
                "rpe1",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    split = Split.load(out)
    assert split.seed == 3 and {c for c, _ in split.test} == {"rpe1"}
    assert "fewshot_celltype" in capsys.readouterr().out

    prof_path = tmp_path / "profiles.h5ad"
    assert (
        main(["profiles", "--data", str(data), "--n-sample-cells", "4", "--n-top-genes", "12", "--out", str(prof_path)])
        == 0
    )
    prof = ad.read_h5ad(prof_path)
    assert prof.obsm["cells"].shape[:2] == (10, 4)
    assert prof.uns["ptrag_profiles"]["params"]["n_sample_cells"] == 4
    # Raw counts were detected and log-normalised before the means were taken.
    assert float(np.asarray(prof.X).max()) < 15


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    make_toy_perturbseq().write_h5ad(data)
    code = main(
        [
            "split",
            "--data",
            str(data),
            "--pert-col",
            "perturbation",
            "--target-cell-type",
            "rpe1",
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "perturbation column 'perturbation' not in adata.obs" in err and "--pert-col" in err
    assert not (tmp_path / "s.json").exists()
    code = main(["split", "--data", str(data), "--target-cell-type", "liver", "--out", str(tmp_path / "s.json")])
    assert code == 2 and "'liver'" in capsys.readouterr().err
    assert main(["profiles", "--data", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "p.h5ad")]) == 2
    assert "no such file" in capsys.readouterr().err
