"""Load test of ``POST /predict``: latency and throughput with 1 and 16 concurrent clients.

Not a test. One run:

1. starts ``uvicorn api.app:app`` on 127.0.0.1 in a subprocess, serving a checkpoint (default: the main job's
   ``artifacts/default/train/ptrag/best.pt`` with ``artifacts/default/index``), once per ``--model-threads``
   setting (default: 1 thread, then the libraries' default of one per core);
2. for each client count, every client (a thread with its own ``httpx.Client``) sends ``--requests`` requests
   back to back: one perturbation, 64 control cells, a different seed per request (so no two requests are the
   same and nothing could be coalesced); latency is the time to the full response body, and the client checks
   the status (and parses one response in 50 fully: parsing 100 kB of JSON in 16 client threads would take CPU
   from the server on a small machine);
3. reports p50/p99 latency, requests/s, errors and the server's micro-batcher counters for each phase;
4. profiles one request in process (where the time goes: validation, retrieval, forward, response encoding) and
   the forward pass batched 16 at a time;
5. writes the Markdown report ``benchmarks/results/predict_load.md``.

When the default checkpoint cannot be read by this code (missing, or written by an older version of the
trainer), a model of the same architecture (the run's ``config.json``) is trained for two steps into a temporary
directory: latency does not depend on how long a model was trained.

Usage::

    python benchmarks/predict_load.py                                  # default artifacts, 1 and 16 clients
    python benchmarks/predict_load.py --checkpoint RUN/best.pt --index RUN/../index --requests 50
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_RUN = ROOT / "artifacts" / "default"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_checkpoint(checkpoint: Path, work: Path) -> tuple[Path, str]:
    """The checkpoint to serve, and a note when a stand-in of the same architecture had to be trained."""
    from model.train import load_checkpoint

    try:
        load_checkpoint(checkpoint)
        return checkpoint, ""
    except (FileNotFoundError, ValueError) as err:
        reason = str(err)
    config_path = checkpoint.parent / "config.json"
    if not config_path.exists():
        raise SystemExit(f"cannot read {checkpoint} ({reason}) and there is no {config_path} to train a stand-in")
    from model.config import TrainConfig
    from model.train import train

    values = json.loads(config_path.read_text())
    values.update(run_dir=str(work / "model"), max_steps=2, eval_every=2, warmup_steps=1, progress=False)
    train(TrainConfig(**values))
    note = (
        f"{checkpoint} could not be read by this version ({reason}); served instead a model of the same "
        f"architecture ({config_path}) trained for 2 steps: latency does not depend on training length."
    )
    return work / "model" / "last.pt", note


class Server:
    """``uvicorn api.app:app`` in a subprocess, configured through PTRAG_* variables."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 1) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(workers), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        self.log = open(log, "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=self.log, stderr=self.log)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    r = client.get("/readyz")
                    if r.status_code == 200:
                        return
                    if r.json().get("status") == "failed":
                        raise SystemExit(f"server could not load the model: {r.json()['detail']}")
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise SystemExit("server not ready in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _stdlib_post(url: str) -> Callable[[bytes], tuple[int, bytes]]:
    """POST /predict over one keep-alive ``http.client`` connection (reopened after an error)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def post(data: bytes) -> tuple[int, bytes]:
        try:
            conn.request("POST", "/predict", body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            conn.close()  # the next request reconnects
            raise

    return post


def _httpx_post(url: str) -> Callable[[bytes], tuple[int, bytes]]:
    http = httpx.Client(base_url=url, timeout=60)

    def post(data: bytes) -> tuple[int, bytes]:
        r = http.post("/predict", content=data, headers={"Content-Type": "application/json"})
        return r.status_code, r.content

    return post


CLIENTS = {"stdlib": _stdlib_post, "httpx": _httpx_post}


def run_clients(url: str, n_clients: int, n_requests: int, body: dict, *, seed0: int, kind: str = "stdlib") -> dict:
    """``n_clients`` threads, ``n_requests`` each, back to back; latencies in ms, errors, wall time, and the CPU
    time per request of this (client) process."""
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    errors: list[str] = []
    barrier = threading.Barrier(n_clients + 1)

    def client(c: int) -> None:
        post = CLIENTS[kind](url)
        barrier.wait()
        for i in range(n_requests):
            data = json.dumps({**body, "seed": seed0 + c * n_requests + i}).encode()
            start = time.perf_counter()
            try:
                status, content = post(data)
            except (OSError, http.client.HTTPException, httpx.HTTPError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies[c].append((time.perf_counter() - start) * 1000)
            if status != 200:
                errors.append(f"HTTP {status}: {content[:200]!r}")
            elif i % 50 == 0 and len(json.loads(content)["predictions"]) != 1:
                errors.append("wrong number of predictions")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    lat = np.asarray([x for per in latencies for x in per])
    return {
        "clients": n_clients,
        "requests": n_clients * n_requests,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
        "rps": n_clients * n_requests / wall,
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": wall,
        "client_cpu_ms": cpu * 1000 / (n_clients * n_requests),
    }


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children (uvicorn's worker processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for p in [pid, *map(int, children)]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return float("nan")
    return total


def profile_in_process(
    checkpoint: Path, index: Path, cell_type: str, gene: str, threads: int | None, device: str
) -> list:
    """Median ms of each step of one request, and of the forward pass over 16 items, in this process, with the
    model on ``device`` (the server's: outputs are copied to numpy, so CUDA timings include the wait)."""
    import orjson
    import torch
    from threadpoolctl import threadpool_limits

    from api.app import _prediction
    from model.predict import Predictor

    if threads is not None:
        torch.set_num_threads(threads)
        threadpool_limits(limits=threads)
    p = Predictor.load(checkpoint, index=index, device=device)

    def ms(f, n: int = 30) -> float:
        for _ in range(3):
            f()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    # As served without return_cells: control cells from the cache, only the mean of the predicted cells.
    items = p.make_items(cell_type, [gene], n_cells=64, cells=False)
    pairs = [(it.cell_type, it.query_label or it.perturbation) for it in items]
    queries = p._retrieve(pairs, items)
    (pred,) = p.predict_items(items)
    many = [it for s in range(16) for it in p.make_items(cell_type, [gene], n_cells=64, seed=s, cells=False)]
    many_q = p._retrieve([(it.cell_type, it.perturbation) for it in many], many)

    def response() -> bytes:
        out = _prediction(pred, p.genes, top_n=20, cells=False)
        body = {"request_id": "x", "cell_type": cell_type, "model_variant": "ptrag", "genes": p.genes, "n_cells": 64,
                "control_cells": None, "predictions": [out], "warnings": []}  # fmt: skip
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    body = response()
    rows = [
        ("make_items (validate names, draw 64 control cells)", ms(lambda: p.make_items(cell_type, [gene]))),
        ("stage-1 retrieval (1 query)", ms(lambda: p._retrieve(pairs, items))),
        ("forward pass, 1 item (B=1, S=64)", ms(lambda: p._forward(items, queries, [0], pool=True))),
        ("predict_items, 1 item (retrieval + forward + candidate tables)", ms(lambda: p.predict_items(items))),
        ("response: top genes, candidates, JSON encoding (orjson)", ms(response)),
        (f"JSON decoding in the client ({len(body) / 1000:.0f} kB)", ms(lambda: json.loads(body))),
        ("forward pass, 16 items (B=16), per item",
         ms(lambda: p._forward(many, many_q, list(range(16)), pool=True), 10) / 16),
        ("predict_items, 16 items, per item", ms(lambda: p.predict_items(many), 10) / 16),
    ]  # fmt: skip
    return rows


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"


def serve_and_load(args, checkpoint: Path, workers: int, threads: int, log: Path) -> tuple[dict, str, str, list]:
    """One server (``workers`` uvicorn processes, PTRAG_MODEL_THREADS=threads, 0: the libraries' default): every
    client count in turn."""
    env = {"PTRAG_CHECKPOINT": str(checkpoint), "PTRAG_INDEX_DIR": str(args.index), "PTRAG_DEVICE": args.device}
    for name, value in (("PTRAG_BATCH_WAIT_MS", args.batch_wait_ms), ("PTRAG_BATCH_GRACE_MS", args.batch_grace_ms)):
        if value is not None:
            env[name] = str(value)
    if threads:
        env["PTRAG_MODEL_THREADS"] = str(threads)
    from api.affinity import pins_workers  # as `ptrag serve --pin-cores` decides

    env["PTRAG_PIN_CORES"] = str(int(pins_workers(args.pin_cores, workers)))
    server = Server(env, log, workers=workers)
    results = []
    try:
        server.wait_ready()
        time.sleep(2.0 * (workers - 1))  # /readyz answered by one worker: give the others time to load
        with httpx.Client(base_url=server.url, timeout=30) as http:
            info = http.get("/info").json()
            cell_type = args.cell_type or info["cell_types"][-1]
            from retrieval_service.store import Store

            gene = args.gene or Store.open(args.index).index.embeddings.symbols[0]
            body = {"cell_type": cell_type, "perturbations": [gene], "n_cells": 64}
            run_clients(server.url, 2 * workers, 20, body, seed0=10**6, kind=args.client)  # warm-up, every worker
            # Rounds of every client count in turn: this machine's speed drifts by up to a quarter between minutes,
            # so a ratio is taken between phases of the same round, seconds apart, and the rounds are all reported.
            for rnd, n in ((rnd, n) for rnd in range(1, args.rounds + 1) for n in args.clients):
                start, cpu0 = http.get("/info").json()["batcher"], process_tree_cpu(server.proc.pid)
                r = run_clients(server.url, n, args.requests, body, seed0=rnd * 10**7 + n * 10**5, kind=args.client)
                end, cpu1 = http.get("/info").json()["batcher"], process_tree_cpu(server.proc.pid)
                # largest_call is a running maximum: it describes this phase only when the phase raised it.
                largest = end["largest_call"] if end["largest_call"] > start["largest_call"] else None
                r |= {k: end[k] - start[k] for k in ("calls", "items")} | {"largest_call": largest}
                r |= {"threads": threads, "workers": workers, "server_cpu_ms": (cpu1 - cpu0) * 1000 / r["requests"]}
                r["round"] = rnd
                results.append(r)
                print(f"round {rnd}, workers {workers}, threads {threads or 'default'}, {n:>2} clients: "
                      f"p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms, {r['rps']:.1f} req/s, {r['errors']} errors, CPU per request "
                      f"{r['server_cpu_ms']:.1f} ms server, {r['client_cpu_ms']:.1f} ms client",
                      flush=True)  # fmt: skip
    finally:
        server.stop()
    return info, cell_type, gene, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "train" / "ptrag" / "best.pt")
    ap.add_argument("--index", type=Path, default=DEFAULT_RUN / "index")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=100, help="requests per client")
    ap.add_argument("--cell-type", default=None, help="default: the model's last cell type")
    ap.add_argument("--gene", default=None, help="default: the first gene of the embedding table")
    ap.add_argument("--model-threads", type=int, nargs="+", default=[1],
                    help="PTRAG_MODEL_THREADS per server run (0: the libraries' default, one per core)")  # fmt: skip
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker processes per server run")
    ap.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="stdlib",
        help="load generator: stdlib http.client (lean: it shares the cores with the server), or httpx",
    )
    ap.add_argument("--pin-cores", choices=["auto", "on", "off"], default="auto",
                    help="PTRAG_PIN_CORES, as `ptrag serve --pin-cores` sets it")  # fmt: skip
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="PTRAG_BATCH_WAIT_MS (default: the server's)")
    ap.add_argument("--batch-grace-ms", type=float, default=None, help="PTRAG_BATCH_GRACE_MS (default: the server's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="the server's PTRAG_DEVICE")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every client count per server")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict_load.md")
    args = ap.parse_args()
    command = "python " + shlex.join(["benchmarks/predict_load.py", *sys.argv[1:]])

    work = Path(tempfile.mkdtemp(prefix="predict_load_"))
    checkpoint, note = ensure_checkpoint(args.checkpoint, work)
    before = machine()
    results = []
    for workers in args.workers:
        for threads in args.model_threads:
            log = work / f"server-{workers}-{threads}.log"
            info, cell_type, gene, part = serve_and_load(args, checkpoint, workers, threads, log)
            results += part
    after = machine()
    first = args.model_threads[0] or None
    device = info["device"]
    rows = profile_in_process(checkpoint, args.index, cell_type, gene, first, device) if args.profile else []
    write_report(args, command, info, cell_type, gene, results, rows, note, before, after)


def write_report(args, command, info, cell_type, gene, results, rows, note, before, after) -> None:
    from api.affinity import pins_workers

    pinning = ", ".join(
        f"{w} worker(s) {'pinned, one core each' if pins_workers(args.pin_cores, w) else 'not pinned'}"
        for w in args.workers
    )
    lines = [
        "# POST /predict under load",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {before} before the run, {after.split(', load average ')[1]} after (shared with other jobs).",
        f"Model: {info['model_variant']}, {info['n_genes']} genes, {len(info['cell_types'])} cell types, store "
        f"{info['retrieval']}; checkpoint step {info['checkpoint_step']}.",
        f"Server: `uvicorn api.app:app --workers N` in its own process(es), "
        f"PTRAG_BATCH_WAIT_MS={info['limits']['batch_wait_ms']}, "
        f"PTRAG_BATCH_GRACE_MS={info['limits']['batch_grace_ms']}, "
        f"PTRAG_BATCH_MAX_ITEMS={info['limits']['batch_max_items']}; workers and PTRAG_MODEL_THREADS as in the table "
        f"(each worker loads the model and runs its own micro-batcher); model on `{info['device']}`; "
        f"`--pin-cores {args.pin_cores}`: {pinning} (api/affinity.py).",
        f"Requests: `{cell_type}`, one perturbation (`{gene}`), 64 control cells, JSON response (delta, profile, top "
        f"genes, 32 candidates), a different seed per request; {args.requests} requests per client, back to back; "
        f"{args.rounds} rounds of every client count per server (ratios compare phases of the same round).",
        f"Load generator: `{args.client}` client threads in this process, on the same {os.cpu_count()} cores as the "
        "server; the "
        "CPU columns are CPU seconds per request of the server's processes and of the client process.",
    ]
    if note:
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        "| workers | model threads | round | clients | requests | p50 (ms) | p99 (ms) | mean (ms) | requests/s "
        "| vs 1 client (same round) | errors | server CPU ms/request | client CPU ms/request | forward passes "
        "| perturbations per pass (mean / max) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def same(a: dict, b: dict) -> bool:
        return a["threads"] == b["threads"] and a["workers"] == b["workers"] and a["round"] == b["round"]

    for r in results:
        single = next((x for x in results if same(x, r) and x["clients"] == 1), None)
        ratio = f"{r['rps'] / single['rps']:.2f}x" if single else "-"
        # With several workers /info answers from one of them: its counters are not the whole server's.
        largest = r["largest_call"] if r["largest_call"] is not None else "not above an earlier phase's"
        passes = f"{r['calls']} | {r['items'] / r['calls']:.1f} / {largest}" if r["workers"] == 1 and r[
            "calls"] else "n/a (per worker) | n/a"  # fmt: skip
        lines.append(
            f"| {r['workers']} | {r['threads'] or 'default'} | {r['round']} | {r['clients']} | {r['requests']} | "
            f"{r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['mean_ms']:.1f} | {r['rps']:.1f} | {ratio} | {r['errors']} | "
            f"{r['server_cpu_ms']:.1f} | {r['client_cpu_ms']:.1f} | {passes} |"
        )
    lines += ["", "Targets (per server setting):"]
    for workers in args.workers:
        for threads in args.model_threads:
            mine = [r for r in results if r["threads"] == threads and r["workers"] == workers]
            singles = {r["round"]: r for r in mine if r["clients"] == 1}
            multis = {r["round"]: r for r in mine if r["clients"] == 16}
            errors = sum(r["errors"] for r in mine)
            parts = []
            if singles:
                p50 = statistics.median(r["p50_ms"] for r in singles.values())
                verdict = "met" if p50 < 30 else "missed"
                parts.append(f"single-client p50 {p50:.1f} ms (median of rounds) < 30: {verdict}")
            ratios = [multis[k]["rps"] / singles[k]["rps"] for k in sorted(singles.keys() & multis.keys())]
            if ratios:
                ratio = statistics.median(ratios)
                each = ", ".join(f"{x:.2f}x" for x in ratios)
                parts.append(f"16 clients {ratio:.2f}x (median of rounds: {each}) >= 4x: "
                             f"{'met' if ratio >= 4 else 'missed'}")  # fmt: skip
            parts.append(f"{errors} errors: {'met' if errors == 0 else 'missed'}")
            lines.append(f"- {workers} worker(s), model threads {threads or 'default'}: " + "; ".join(parts))
            examples = [e for r in mine for e in r["error_examples"]]
            if examples:
                lines.append(f"  (e.g. {examples[:3]})")
    if rows:
        lines += [
            "",
            f"## Where the time goes (one request, in process, model on `{info['device']}`, model threads "
            f"{args.model_threads[0] or 'default'}; median ms)",
            "",
            "| step | ms |",
            "|---|---:|",
            *[f"| {name} | {value:.2f} |" for name, value in rows],
        ]
        per_item = dict(rows)["forward pass, 16 items (B=16), per item"]
        single = next((r for r in results if r["threads"] == args.model_threads[0] and r["clients"] == 1
                       and r["workers"] == 1 and r["round"] == 1), None)  # fmt: skip
        if single and info["device"] == "cpu":
            bound = 1000 / per_item
            lines += [
                "",
                f"The forward pass is compute-bound (batching 16 sets cuts its cost per set only from "
                f"{dict(rows)['forward pass, 1 item (B=1, S=64)']:.1f} to {per_item:.1f} ms): on one model thread, "
                f"16 clients cannot exceed 1000 / {per_item:.1f} = {bound:.0f} requests/s, "
                f"{bound / single['rps']:.1f}x the single-client rate, before any HTTP, JSON or client work, which "
                "share the same cores here.",
            ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
