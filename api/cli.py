"""The ``ptrag`` command line: thin subcommands that call into ``model`` and ``retrieval_service``.

Each subcommand is registered by one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``func``; the function it calls lives in the package that owns the work. Heavy imports happen inside
the command functions so that ``ptrag --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
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
        **_data_kwargs(args),
    )
    summary = run_main_job(config)
    print(json.dumps(summary, indent=1))
    print(f"artifacts in {config.out}/ (summary.json, split.json, profiles.h5ad)")
    return 0


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

    from model.data.preprocess import prepare_expression
    from model.data.profiles import compute_profiles
    from model.data.reading import read_perturbseq
    from retrieval_service.atomic import atomic_path

    kw = _data_kwargs(args)
    adata = read_perturbseq(args.data, layer=args.layer, obsm_key=args.obsm_key, **kw)
    adata = prepare_expression(
        adata,
        layer=args.layer,
        obsm_key=args.obsm_key,
        n_top_genes=args.n_top_genes,
        pert_col=args.pert_col,
        control_label=args.control_label,
    )
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


_COMMANDS: list = [_add_run, _add_split, _add_profiles, _add_embed_genes]  # in the order shown by --help


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
