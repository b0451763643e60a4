"""Simulator at Replogle-Nadig scale: wall time, cells/s, output size and peak memory.

Generates ``SimulatorConfig.replogle_scale()`` (4 lines x 2000 knockdowns x ~75 cells x 2000 genes, ~630k
cells) with ``simulate_to_h5ad`` into a temporary directory, in a child process so that its memory is measured
alone, and writes a Markdown table (with the exact command line) to ``benchmarks/results/simulator_scale.md``.

Peak memory is measured two ways: the kernel's high-water mark (``ru_maxrss``) of the generating process and of
its worker processes, and the sampled peak of the process tree's summed RSS (every 50 ms from ``/proc``), which
is what "peak memory" means when workers run beside the writer.

    python benchmarks/simulator_scale.py                    # full scale, 2 workers
    python benchmarks/simulator_scale.py --fraction 0.05    # a quick check (5% of the knockdowns)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from model.data.simulator import SimulatorConfig, describe_h5ad, simulate_to_h5ad  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "simulator_scale.md"


def scaled_config(fraction: float) -> SimulatorConfig:
    """Replogle-Nadig scale with the knockdowns and controls scaled by ``fraction`` (genes and lines kept)."""
    full = SimulatorConfig.replogle_scale()
    n_pert = max(2, round(full.n_perturbations * fraction))
    return SimulatorConfig.replogle_scale(
        n_perturbation_pool=n_pert,
        n_perturbations=n_pert,
        n_control_cells=max(1, round(full.n_control_cells * fraction)),
        n_doubles=min(full.n_doubles, n_pert * (n_pert - 1) // 2),
    )


# --- the child: generate, report its own and its workers' high-water marks ---------------------------------


def child(args: argparse.Namespace) -> None:
    config = scaled_config(args.fraction)
    start = time.perf_counter()
    simulate_to_h5ad(
        config,
        args.path,
        seed=args.seed,
        chunk_cells=args.chunk_cells,
        n_workers=args.workers,
        progress=False,
    )
    wall = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest of the (reaped) worker processes.
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    report = {
        "wall_s": wall,
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "maxrss_self": me.ru_maxrss * 1024,
        "maxrss_workers": kids.ru_maxrss * 1024,
    }
    print("BENCH " + json.dumps(report), flush=True)


# --- the parent: run the child, sample the tree's RSS, write the table ------------------------------------


def _tree_rss(pid: int) -> int:
    """Summed resident memory (bytes) of ``pid`` and all its descendants, from /proc; 0 once gone."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="ptrag-simbench-") as tmp:
        path = Path(tmp) / "replogle_sim.h5ad"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--path",
            str(path),
            "--fraction",
            str(args.fraction),
            "--workers",
            str(args.workers),
            "--chunk-cells",
            str(args.chunk_cells),
            "--seed",
            str(args.seed),
        ]
        peak = 0
        load_before = os.getloadavg()[0]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = proc.communicate()
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise SystemExit(f"child failed with status {proc.returncode}")
        report = json.loads(next(line for line in stdout.splitlines() if line.startswith("BENCH "))[6:])
        info = describe_h5ad(path)
        load_after = os.getloadavg()[0]
    n, g, nnz = info["n_cells"], info["n_genes"], info["nnz"]
    # In memory, X and layers['counts'] are two CSR matrices: float32 data + int32 indices + int64 indptr each.
    matrix_bytes = 2 * (nnz * (4 + 4) + (n + 1) * 8)
    return {
        **report,
        **info,
        "peak_tree_rss": peak,
        "matrix_bytes": matrix_bytes,
        "dense_bytes": 2 * n * g * 4,
        "load": (load_before, load_after),
    }


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def write_markdown(res: dict, args: argparse.Namespace, out: Path) -> None:
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    peak = max(res["peak_tree_rss"], res["maxrss_self"])
    rows = [
        ("cells x genes", f"{res['n_cells']:,} x {res['n_genes']:,}"),
        ("cell lines / perturbation labels", f"{len(res['cell_lines'])} / {res['n_perturbations']:,}"),
        ("nonzeros (density)", f"{res['nnz']:,} ({res['density']:.1%})"),
        ("wall time (model + sampling + writing)", f"{res['wall_s']:.1f} s"),
        ("throughput", f"{res['n_cells'] / res['wall_s']:,.0f} cells/s"),
        ("CPU time, all processes (user + sys)", f"{res['cpu_s']:.1f} s"),
        ("output matrices in memory (X + counts, CSR)", _gib(res["matrix_bytes"])),
        ("same as dense float32", _gib(res["dense_bytes"])),
        (".h5ad file size", _gib(res["file_bytes"])),
        ("peak RSS, process tree (sampled every 50 ms)", _gib(res["peak_tree_rss"])),
        ("peak RSS, writer process (ru_maxrss)", _gib(res["maxrss_self"])),
        ("peak RSS, largest worker (ru_maxrss)", _gib(res["maxrss_workers"])),
        ("peak RSS / output matrices", f"{peak / res['matrix_bytes']:.2f}"),
    ]
    lines = [
        "# Simulator at Replogle-Nadig scale",
        "",
        "Generated by `benchmarks/simulator_scale.py`; `simulate_to_h5ad` streams chunks of whole perturbation",
        "groups into the `.h5ad`, so peak memory is set by `--chunk-cells` and the ground truth, not by the output.",
        "",
        "```",
        command,
        "```",
        "",
        f"fraction {args.fraction}, {args.workers} worker(s), chunk_cells {args.chunk_cells}, seed {args.seed}; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"1-min load average {res['load'][0]:.1f} before, {res['load'][1]:.1f} after (other jobs share the CPUs: "
        "wall time is an upper bound, CPU time is the stable figure)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the knockdowns to generate")
    parser.add_argument("--workers", type=int, default=2, help="sampling processes")
    parser.add_argument("--chunk-cells", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp-dir", default=None, help="where the temporary .h5ad goes (default: system temp)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown results file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    write_markdown(run(args), args, args.out)


if __name__ == "__main__":
    main()
