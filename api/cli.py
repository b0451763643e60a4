"""The ``ptrag`` command line: thin subcommands that call into ``model`` and ``retrieval_service``.

Each subcommand is registered by one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``func``; the function it calls lives in the package that owns the work. Heavy imports happen inside
the command functions so that ``ptrag --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


# --- registration: one function per subcommand ---------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptrag",
        description="PT-RAG: retrieval-augmented prediction of Perturb-seq knockdown responses.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def _add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The arguments that say how to read a Perturb-seq file (defaults: Arc's Replogle-Nadig release)."""
    from model.data.reading import DEFAULT_CELL_TYPE_COL, DEFAULT_CONTROL_LABEL, DEFAULT_PERT_COL

    p.add_argument("--data", required=required, help="Perturb-seq .h5ad file")
    p.add_argument("--pert-col", default=DEFAULT_PERT_COL, help="obs column with perturbation labels (A+B = double)")
    p.add_argument("--cell-type-col", default=DEFAULT_CELL_TYPE_COL, help="obs column with cell types")
    p.add_argument("--control-label", default=DEFAULT_CONTROL_LABEL, help="label of control cells")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--layer", default=None, help="expression from this layer instead of X")
    where.add_argument("--obsm-key", default=None, help="expression from this obsm matrix (e.g. X_hvg)")


def _data_kwargs(args: argparse.Namespace) -> dict:
    return {"pert_col": args.pert_col, "cell_type_col": args.cell_type_col, "control_label": args.control_label}


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: simulated default (or --data) -> profiles, split, embeddings")
    _add_data_args(p, required=False)
    p.add_argument("--embeddings", default=None, help="gene embeddings (GenePT pickle/CSV/npz); needed with --data")
    p.add_argument("--out", default="artifacts/default", help="run directory (reused if present: resumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        dest="split_kind",
        default="fewshot_celltype",
        choices=["fewshot_celltype", "unseen_perturbation", "zeroshot_celltype"],
    )
    p.add_argument(
        "--target-cell-type", default=None, help="target of the cell-type protocols (default rpe1 when simulated)"
    )
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--train-steps", type=int, default=200, help="training steps of the serving model")
    p.add_argument("--stop-after", default="benchmark", choices=["index", "train", "benchmark"],
                   help="last step: index (data only), train (plus the serving model), benchmark (all)")  # fmt: skip
    p.add_argument("--no-benchmark", dest="stop_after", action="store_const", const="train",
                   help="same as --stop-after train: the data, index and serving model, no benchmark")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="benchmark seeds (e.g. 0 1 2)")
    p.add_argument("--bench-steps", type=int, default=120, help="training steps per neural model in the benchmark")
    p.add_argument("--models", nargs="+", default=None, help="models to benchmark (default: all)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from model.pipeline import RunConfig, run_main_job

    config = RunConfig(
        out=args.out,
        data=args.data,
        embeddings=args.embeddings,
        seed=args.seed,
        layer=args.layer,
        obsm_key=args.obsm_key,
        n_top_genes=args.n_top_genes,
        split_kind=args.split_kind,
        target_cell_type=args.target_cell_type,
        train_steps=args.train_steps,
        stop_after=args.stop_after,
        bench_seeds=tuple(args.seeds),
        bench_steps=args.bench_steps,
        bench_models=tuple(args.models or ()),
        command=_command_line(),
        **_data_kwargs(args),
    )
    summary = run_main_job(config)
    print(json.dumps(summary, indent=1))
    print(f"artifacts in {config.out}/ (summary.json, split.json, profiles.h5ad, index/)")
    if summary["checkpoint"]:
        print(f"serving model: {summary['checkpoint']}")
    if summary["report"]:
        _print_report(summary["report"])
    return 0


def _command_line() -> str:
    import shlex
    from pathlib import Path

    # `ptrag ...` and `python -m api.cli ...` run the same command: record it the way users type it
    return (
        shlex.join(["ptrag", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("ptrag", "cli.py") else shlex.join(sys.argv)
    )


def _print_report(report: str) -> None:
    """The report's main table and where its plots are."""
    from pathlib import Path

    lines = Path(report).read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    print("\n".join(lines[start:end]))  # the first table: the main one
    print(f"report: {report}; plots: {', '.join(str(p) for p in sorted(Path(report).parent.glob('*.png')))}")


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    from model.baselines import BASELINES
    from model.config import VARIANTS

    models = (*VARIANTS, *BASELINES)
    p = sub.add_parser("benchmark", help="train and score every model on one split for several seeds -> report")
    _add_data_args(p)
    p.add_argument("--embeddings", required=True, help="gene embeddings (GenePT pickle/CSV/npz)")
    p.add_argument("--out", required=True, help="benchmark directory (resumes: finished model x seed runs are kept)")
    p.add_argument("--split", dest="split_kind", default="fewshot_celltype",
                   choices=["fewshot_celltype", "unseen_perturbation", "zeroshot_celltype"])  # fmt: skip
    p.add_argument("--target-cell-type", default=None, help="target of the cell-type protocols")
    p.add_argument("--cell-types", nargs="+", default=(), help="restrict the benchmark to these cell types")
    p.add_argument("--test-frac", type=float, default=0.3)
    p.add_argument("--val-frac", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=list(models), choices=models, metavar="MODEL",
                   help=f"models to run (default all): {' '.join(models)}")  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="training steps per neural model")
    p.add_argument("--train-config", default=None, help="YAML/TOML of TrainConfig fields for the neural models")
    p.add_argument("--max-pred-cells", type=int, default=256)
    p.add_argument("--n-top-genes", type=int, default=2000, help="HVGs when --data holds raw counts")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.config import read_config_file
    from model.eval.benchmark import BenchmarkConfig, run_benchmark, write_benchmark_report

    train = read_config_file(args.train_config) if args.train_config else {}
    data = Path(args.data)
    out = Path(args.out)
    if args.layer or args.obsm_key or not _is_prepared(data):
        data = _prepare_for_benchmark(args, out)
    config = BenchmarkConfig(
        out=out, data=data, embeddings=args.embeddings, split_kind=args.split_kind,
        target_cell_type=args.target_cell_type, cell_types=tuple(args.cell_types), test_frac=args.test_frac,
        val_frac=args.val_frac, seeds=tuple(args.seeds), models=tuple(args.models), steps=args.steps, train=train,
        max_pred_cells=args.max_pred_cells, progress=args.progress, command=_command_line(), **_data_kwargs(args),
    )  # fmt: skip
    report = write_benchmark_report(config, run_benchmark(config))
    _print_report(str(report))
    return 0


def _is_prepared(path) -> bool:
    """Whether ``path`` is cells this package prepared (``ptrag run`` writes them): then they are used as is."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "uns" in f and "ptrag_preprocess" in f["uns"]
    except OSError as err:
        msg = f"cannot read {path} as .h5ad ({err})"
        raise CLIError(msg) from err


def _prepare_for_benchmark(args: argparse.Namespace, out) -> object:
    """Read and prepare a user's Perturb-seq file once into ``out/prepared.h5ad`` (log-normalised, HVGs)."""
    from model.data.preprocess import load_prepared
    from retrieval_service.atomic import atomic_path

    path = out / "prepared.h5ad"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        cells = load_prepared(args.data, layer=args.layer, obsm_key=args.obsm_key, n_top_genes=args.n_top_genes,
                              **_data_kwargs(args))  # fmt: skip
        with atomic_path(path) as tmp:
            cells.write_h5ad(tmp)
    return path


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="make a seeded train/val/test split and write it as JSON")
    _add_data_args(p)
    p.add_argument(
        "--kind", default="fewshot_celltype", choices=["fewshot_celltype", "unseen_perturbation", "zeroshot_celltype"]
    )
    p.add_argument("--target-cell-type", default=None)
    p.add_argument("--test-frac", type=float, default=0.3)
    p.add_argument("--val-frac", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="split JSON to write")
    p.set_defaults(func=_split)


def _split(args: argparse.Namespace) -> int:
    from model.data.reading import read_perturbseq
    from model.data.splits import make_split

    adata = read_perturbseq(args.data, layer=args.layer, obsm_key=args.obsm_key, **_data_kwargs(args))
    split = make_split(
        adata,
        kind=args.kind,
        target_cell_type=args.target_cell_type,
        test_frac=args.test_frac,
        val_frac=args.val_frac,
        seed=args.seed,
        **_data_kwargs(args),
    )
    split.save(args.out)
    print(split.summary())
    print(f"wrote {args.out}")
    return 0


def _add_profiles(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="per (cell type, perturbation) profiles as a pseudobulk .h5ad")
    _add_data_args(p)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-sample-cells", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".h5ad to write")
    p.set_defaults(func=_profiles)


def _profiles(args: argparse.Namespace) -> int:
    import numpy as np

    from model.data.preprocess import load_prepared
    from model.data.profiles import compute_profiles
    from retrieval_service.atomic import atomic_path

    kw = _data_kwargs(args)
    adata = load_prepared(args.data, layer=args.layer, obsm_key=args.obsm_key, n_top_genes=args.n_top_genes, **kw)
    prof = compute_profiles(adata, n_sample_cells=args.n_sample_cells, rng=np.random.default_rng(args.seed), **kw)
    with atomic_path(args.out) as tmp:
        prof.write_h5ad(tmp)
    print(f"{prof.n_obs} groups ({int(prof.obs['is_control'].sum())} control) x {prof.n_vars} genes -> {args.out}")
    return 0


def _add_embed_genes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed-genes", help="embed gene texts with the local MiniLM model (GenePT recipe) -> .npz")
    p.add_argument(
        "--text",
        action="append",
        required=True,
        metavar="JSON",
        help="gene text JSON/JSON.gz {symbol: text}; repeat for fallback files (the first file with a gene wins)",
    )
    p.add_argument("--out", required=True, help=".npz to write (symbols, vectors, source)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--genes", default=None, help="comma-separated genes to embed (default: every gene with text)")
    which.add_argument("--genes-file", default=None, help="file with the genes to embed, one per line")
    p.add_argument("--cache-dir", default=None, help="per-gene vector cache: re-runs embed only new or changed texts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model-path", default=None, help="sentence-transformers model dir (default: bundled MiniLM)")
    p.set_defaults(func=_embed_genes)


def _embed_genes(args: argparse.Namespace) -> int:
    from collections import Counter
    from pathlib import Path

    from model.data.gene_text import embed_gene_texts, load_gene_texts

    texts, origin = load_gene_texts(*args.text, return_origin=True)
    if args.genes is not None or args.genes_file is not None:
        raw = args.genes if args.genes is not None else Path(args.genes_file).read_text(encoding="utf-8")
        requested = list(dict.fromkeys(g.strip() for g in raw.replace(",", "\n").splitlines() if g.strip()))
    else:
        requested = list(texts)
    have = [g for g in requested if g in texts]
    missing = [g for g in requested if g not in texts]
    if not have:
        msg = f"none of the {len(requested)} requested genes has text in {', '.join(args.text)}"
        raise CLIError(msg)
    emb = embed_gene_texts(
        {g: texts[g] for g in have}, model_path=args.model_path, batch_size=args.batch_size, cache_dir=args.cache_dir
    )
    emb.save_npz(args.out)
    counts = Counter(origin[g] for g in emb.symbols)
    print(f"embedded {len(emb)} genes ({emb.source}, dim {emb.dim}) -> {args.out}")
    for path in args.text:
        print(f"  {counts.get(str(Path(path)), 0)} from {path}")
    if missing:
        print(f"{len(missing)} requested genes have no text: {', '.join(missing)}")
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="retrieval index directories (FAISS index + profile store)")
    index_sub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)
    _add_index_build(index_sub)
    _add_index_info(index_sub)


def _add_index_build(index_sub: argparse._SubParsersAction) -> None:
    p = index_sub.add_parser("build", help="build the retrieval store of a split's training perturbations")
    _add_data_args(p)
    p.add_argument("--embeddings", required=True, help="gene embeddings (GenePT pickle/CSV/npz)")
    p.add_argument("--split", required=True, help="split JSON; only its training pairs are stored")
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument("--index-type", default="flat", choices=["flat", "ivf", "hnsw"])
    p.add_argument("--n-top-genes", type=int, default=2000, help="genes kept when --data holds cells")
    p.add_argument("--n-sample-cells", type=int, default=16, help="cells cached per profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    p.set_defaults(func=_index_build)


def _index_build(args: argparse.Namespace) -> int:
    import anndata as ad
    import numpy as np

    from model.data.preprocess import load_prepared
    from model.data.profiles import compute_profiles
    from model.data.splits import Split
    from model.index_build import build_perturbation_index
    from retrieval_service.embeddings import load_embeddings

    kw = _data_kwargs(args)
    split = Split.load(args.split)
    embeddings = load_embeddings(args.embeddings)
    adata = ad.read_h5ad(args.data, backed="r")
    is_profiles = "ptrag_profiles" in adata.uns
    adata.file.close()
    if is_profiles:  # `ptrag profiles` output: use as is
        profiles = ad.read_h5ad(args.data)
    else:
        cells = load_prepared(args.data, layer=args.layer, obsm_key=args.obsm_key, n_top_genes=args.n_top_genes, **kw)
        profiles = compute_profiles(cells, n_sample_cells=args.n_sample_cells, rng=np.random.default_rng(args.seed),
                                    **kw)  # fmt: skip
    out = build_perturbation_index(profiles, embeddings, split, args.out, index_type=args.index_type,
                                   overwrite=args.overwrite, **kw)  # fmt: skip
    print(f"wrote {out} (split {split.split_id}); inspect with `ptrag index info {out}`")
    return 0


def _add_index_info(index_sub: argparse._SubParsersAction) -> None:
    p = index_sub.add_parser("info", help="print an index directory's manifest and verify its checksums")
    p.add_argument("dir", metavar="DIR", help="index directory")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 checksums")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_index_info)


def _index_info(args: argparse.Namespace) -> int:
    import json

    from retrieval_service.manifest import Manifest

    # StoreError is a ValueError: a corrupted or mismatched store ends as one line, exit status 2.
    m = Manifest.load(args.dir, verify=not args.no_verify)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2, sort_keys=True))
    else:
        per_type = ", ".join(f"{ct}: {n}" for ct, n in m.cell_types.items())
        arrays = ", ".join(f"{k} {v['dtype']} {tuple(v['shape'])}" for k, v in m.arrays.items()) or "none"
        extras = ", ".join(f"{k} {v['dtype']} {tuple(v['shape'])}" for k, v in m.extras.items()) or "none"
        print(f"index directory  {args.dir}")
        print(f"format           v{m.format_version}, built {m.built_at} by ptrag {m.package_version}")
        print(f"entries          {m.n_entries} ({per_type})")
        print(f"keys             dim {m.embedding_dim} from {m.embedding_source!r} ({m.n_genes} genes)")
        print(f"index            {m.index_type} {m.index_params}")
        print(f"split            {m.split_id!r}, {m.held_out_count} held-out pairs excluded")
        print(f"arrays           {arrays}")
        print(f"extras           {extras}")
    verified = "sha256 verified" if not args.no_verify else "sizes checked (sha256 not verified)"
    print(f"files            {len(m.checksums)} files, {sum(m.sizes.values()) / 1e6:.1f} MB: OK, {verified}")
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="simulate a Perturb-seq dataset (.h5ad) and GenePT-like embeddings of its genes (.npz)"
    )
    p.add_argument("--out", required=True, help=".h5ad to write")
    p.add_argument("--embeddings-out", default=None, help=".npz to write (default: <out without .h5ad>.embeddings.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--preset",
        choices=["default", "replogle"],
        default="default",
        help="default: 4 lines x 300 knockdowns x ~50 cells (~65k cells); replogle: 4 x 2000 x ~75 (~630k cells)",
    )
    g = p.add_argument_group("model (each flag overrides the preset; see model.data.simulator.SimulatorConfig)")
    g.add_argument("--n-genes", type=int)
    g.add_argument("--n-programs", type=int)
    lines = g.add_mutually_exclusive_group()
    lines.add_argument("--n-cell-lines", type=int, help="the first N of k562, rpe1, jurkat, hepg2 (then line5, ...)")
    lines.add_argument("--cell-lines", help="comma-separated cell line names")
    g.add_argument("--n-perturbations", type=int, help="single knockdowns per line (the pool keeps its ratio to it)")
    g.add_argument("--perturbation-pool", type=int, dest="n_perturbation_pool", help="genes that may be knocked down")
    g.add_argument("--n-doubles", type=int, help="A+B double knockdowns per line")
    g.add_argument("--cells-per-perturbation", type=int)
    g.add_argument("--n-control-cells", type=int, help="non-targeting cells per line")
    g.add_argument("--cross-line-correlation", type=float)
    g.add_argument("--no-effect-fraction", type=float)
    g.add_argument("--embedding-dim", type=int)
    g.add_argument("--embedding-snr", type=float)
    p.add_argument("--chunk-cells", type=int, default=8192, help="cells sampled and written at a time")
    p.add_argument("--workers", type=int, default=1, help="sampling processes (output is identical for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)


_SIMULATE_FIELDS = (
    "n_genes",
    "n_programs",
    "n_perturbations",
    "n_perturbation_pool",
    "n_doubles",
    "cells_per_perturbation",
    "n_control_cells",
    "cross_line_correlation",
    "no_effect_fraction",
    "embedding_dim",
    "embedding_snr",
)


def _simulate(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from model.data.simulator import SimulatorConfig, default_cell_lines, describe_h5ad, simulate_to_h5ad

    overrides = {k: getattr(args, k) for k in _SIMULATE_FIELDS if getattr(args, k) is not None}
    if args.cell_lines is not None:
        overrides["cell_lines"] = tuple(s.strip() for s in args.cell_lines.split(",") if s.strip())
    elif args.n_cell_lines is not None:
        overrides["cell_lines"] = default_cell_lines(args.n_cell_lines)
    config = SimulatorConfig.preset(args.preset, **overrides)
    out = Path(args.out)
    emb = Path(args.embeddings_out or out.with_name(out.name.removesuffix(".h5ad") + ".embeddings.npz"))
    start = time.perf_counter()
    simulate_to_h5ad(
        config,
        out,
        seed=args.seed,
        chunk_cells=args.chunk_cells,
        n_workers=args.workers,
        embeddings_path=emb,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    info = describe_h5ad(out)
    print(
        f"simulated {info['n_cells']:,} cells x {info['n_genes']:,} genes, {len(info['cell_lines'])} cell lines "
        f"({', '.join(info['cell_lines'])}), {info['n_perturbations']:,} perturbations, "
        f"{1 - info['density']:.1%} zeros, in {elapsed:.1f}s (seed {args.seed})"
    )
    print(f"  data       -> {out} ({info['file_bytes'] / 1e6:,.1f} MB)")
    print(f"  embeddings -> {emb} ({config.n_perturbation_pool} genes, dim {config.embedding_dim})")
    return 0


# in the order shown by --help
def _add_train(sub: argparse._SubParsersAction) -> None:
    import dataclasses

    from model.config import TrainConfig

    p = sub.add_parser("train", help="train PT-RAG (or a variant); resumes from RUN_DIR/last.pt when present")
    p.add_argument("--config", default=None, help="YAML or TOML file of TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=f"default: {f.default!r}")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os

    from model.config import TrainConfig
    from model.train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = TrainConfig.from_file(args.config, **overrides) if args.config else TrainConfig(**overrides)
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        summary = {k: result[k] for k in ("step", "best_val", "stopped_early")}
        print(json.dumps(summary | {"run_dir": config.run_dir}))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict perturbed cells from a checkpoint; writes .h5ad")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt or last.pt")
    p.add_argument("--cell-type", required=True)
    p.add_argument("--genes", required=True, help="comma-separated perturbations, A+B for a double")
    p.add_argument("--n-cells", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", default=None, help="technical batch (e.g. gem group), for a model trained with one")
    p.add_argument("--index", default=None, help="retrieval store (default: the one the checkpoint was trained on)")
    p.add_argument("--retrieval-url", default=None, help="a running retrieval service instead of --index")
    p.add_argument("--embeddings", default=None, help="with --retrieval-url: the gene table the service was built from")
    p.add_argument("--out", required=True, help=".h5ad to write")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from model.predict import Predictor
    from retrieval_service.atomic import atomic_path

    genes = [g.strip() for g in args.genes.split(",") if g.strip()]
    predictor = Predictor.load(
        args.checkpoint, index=args.index, retrieval_url=args.retrieval_url, embeddings=args.embeddings
    )
    adata = predictor.predict_anndata(args.cell_type, genes, n_cells=args.n_cells, seed=args.seed, batch=args.batch)
    with atomic_path(args.out) as tmp:
        adata.write_h5ad(tmp)
    print(f"{adata.n_obs} predicted cells x {adata.n_vars} genes for {len(genes)} perturbation(s) -> {args.out}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve POST /predict over HTTP (uvicorn); more settings from PTRAG_* variables")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt or last.pt")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--index", default=None, help="retrieval store (default: the one the checkpoint was trained on)")
    where.add_argument("--retrieval-url", default=None, help="a running retrieval service instead of --index")
    p.add_argument("--embeddings", default=None, help="with --retrieval-url: the gene table the service was built from")
    p.add_argument("--aliases", default=None, help="gene alias map {old: new} (JSON/CSV/TSV) for request genes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes, each with the model and a micro-batcher: on a CPU, one per core "
                        "doubled throughput on 2 cores (benchmarks/results/predict_load.md); model threads default "
                        "to cores / workers")  # fmt: skip
    p.add_argument("--pin-cores", choices=["auto", "on", "off"], default="auto",
                   help="pin each worker to a core of its own: auto = with 2+ workers and no more workers than cores "
                        "(+13%% requests/s at 2 workers on 2 cores, see api/affinity.py)")  # fmt: skip
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    """Flags become the app's settings; the rest (PTRAG_API_KEY, limits, batching) comes from the environment."""
    from pathlib import Path

    import uvicorn

    from api.affinity import pins_workers
    from api.app import Settings, create_app

    if not Path(args.checkpoint).is_file():
        msg = f"no checkpoint at {args.checkpoint}"
        raise CLIError(msg)
    if args.workers < 1:
        msg = f"--workers must be >= 1, got {args.workers}"
        raise CLIError(msg)
    flags = {"checkpoint": args.checkpoint, "index_dir": args.index, "retrieval_url": args.retrieval_url,
             "embeddings": args.embeddings, "aliases": args.aliases, "device": args.device}  # fmt: skip
    flags = {k: v for k, v in flags.items() if v is not None}
    # The app writes one JSON access-log line per request itself: uvicorn's own access log would repeat it.
    level = "debug" if args.verbose else "info"
    common = {"host": args.host, "port": args.port, "access_log": False, "log_level": level}
    if args.workers == 1:
        uvicorn.run(create_app(Settings(**flags)), **common)
        return 0
    # Worker processes import the app by name and read their settings from the environment: pass the flags there.
    Settings(**flags)  # fail here, once, on a bad value
    for name, value in flags.items():
        os.environ[f"PTRAG_{name.upper()}"] = str(value)
    if "PTRAG_MODEL_THREADS" not in os.environ:  # workers x threads = cores: no oversubscription
        os.environ["PTRAG_MODEL_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    if pins_workers(args.pin_cores, args.workers):
        os.environ["PTRAG_PIN_CORES"] = "1"
    uvicorn.run("api.app:app", workers=args.workers, **common)
    return 0


def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="predict many rows against a running predict API (resumable) -> .h5ad + summary.csv"
    )
    p.add_argument("input", metavar="INPUT", help="CSV/TSV of cell_type,perturbation[,n_cells], or one gene per line")
    p.add_argument("--url", required=True, help="predict API base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--cell-type", default=None, help="cell type of every row (a gene list needs it)")
    p.add_argument("--n-cells", type=int, default=64, help="predicted cells per row without an n_cells column")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--retries", type=int, default=5, help="retries on 5xx, 429 and connection errors (not on 4xx)")
    p.add_argument("--backoff", type=float, default=0.5, help="seconds before the first retry; doubles after each")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--api-key", default=None, help="bearer token (default: $PTRAG_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of each request's control-cell draw")
    p.add_argument("--top-n", type=int, default=20, help="top up/down genes per row in the response")
    p.add_argument("--col-cell-type", default="cell_type", help="input column with the cell type")
    p.add_argument("--col-perturbation", default="perturbation", help="input column with the perturbation (A+B)")
    p.add_argument("--col-n-cells", default="n_cells", help="optional input column with cells per row")
    p.add_argument("--pert-col", default=None, help="obs column of the perturbation in the .h5ad (default gene)")
    p.add_argument("--cell-type-col", default=None, help="obs column of the cell type in the .h5ad (default cell_line)")
    p.add_argument("--control-label", default=None, help="label of the control cells (default non-targeting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    import os

    import httpx

    from api.batch_client import read_rows, run_batch

    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # not a line per row
    rows = read_rows(args.input, cell_type=args.cell_type, n_cells=args.n_cells, cell_type_col=args.col_cell_type,
                     perturbation_col=args.col_perturbation, n_cells_col=args.col_n_cells)  # fmt: skip
    result = run_batch(
        rows, args.out, url=args.url, api_key=args.api_key or os.environ.get("PTRAG_API_KEY"),
        concurrency=args.concurrency, retries=args.retries, backoff=args.backoff,
        timeout=httpx.Timeout(args.timeout, connect=min(10.0, args.timeout)), seed=args.seed, top_n=args.top_n,
        pert_col=args.pert_col, cell_type_col=args.cell_type_col, control_label=args.control_label,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"{result.n_done}/{result.n_rows} rows done ({result.n_skipped} by an earlier run), "
          f"{result.n_failed} failed; summary: {result.summary}")  # fmt: skip
    if result.h5ad is not None:
        print(f"predictions: {result.h5ad}")
    if result.failed is not None:
        print(f"failed rows: {result.failed} (rerun the same command to retry them)")
        return 1
    return 0


_COMMANDS: list = [
    _add_run, _add_simulate, _add_split, _add_profiles, _add_embed_genes, _add_index, _add_train, _add_predict,
    _add_benchmark, _add_serve,
    _add_batch,
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        if args.verbose:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ptrag {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
