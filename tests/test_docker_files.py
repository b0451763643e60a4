"""The container files: compose validity (docker-compose, the Compose Specification schema), the wiring between
services, the Dockerfiles, and the retrieval service started exactly as compose starts it.

No Docker engine is needed: the images are not built here. What can be checked without one is checked: every
command compose runs parses with the real CLI (or imports), and the retrieval service answers the compose
healthcheck when launched with compose's own command line and environment.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import httpx
import jsonschema
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERFILE_GPU = REPO / "docker" / "Dockerfile.gpu"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
SERVERS = ("retrieval", "api")
WRITERS = ("init", "train")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))  # resolves the anchors and `<<` merge keys


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file, for the keys these files use (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _argv(service: dict) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "use the exec form (a list): no shell between compose and the process"
    return [str(a) for a in command]


def _flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def _healthcheck_url(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", f"exec-form healthcheck expected, got {test}"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test))
    assert len(urls) == 1, test
    return urls[0]


# --- validity ----------------------------------------------------------------------------------------------


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_docker_compose_config_accepts_the_files(files: list[str]) -> None:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker-compose and no docker compose plugin (Debian: apt-get install docker-compose)")
    cmd = [*binary]
    for f in files:
        cmd += ["-f", f]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PTRAG_", "COMPOSE_"))}
    result = subprocess.run([*cmd, "config"], cwd=REPO, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"init", "retrieval", "api", "train"}
    assert set(resolved["volumes"]) == {"artifacts", "data"}
    published = {
        name: sorted(int(p["published"]) for p in svc.get("ports", [])) for name, svc in resolved["services"].items()
    }
    assert published == {"init": [], "retrieval": [8001], "api": [8000], "train": []}
    assert resolved["services"]["train"]["profiles"] == ["train"]
    gpu = "docker-compose.gpu.yml" in files
    for svc in resolved["services"].values():
        assert svc["build"]["dockerfile"] == ("docker/Dockerfile.gpu" if gpu else "docker/Dockerfile")
        assert ("deploy" in svc) == gpu


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_files_follow_the_compose_specification(validator, compose: dict) -> None:
    gpu = _load(COMPOSE_GPU)
    assert _errors(validator, compose) == []
    assert _errors(validator, gpu) == []
    assert _errors(validator, _merge(compose, gpu)) == []


def test_schema_rejects_what_compose_would(validator, compose: dict) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["api"]["depends_on"]["retrieval"]["condition"] = "service_ready"
    bad["services"]["retrieval"]["healtcheck"] = bad["services"]["retrieval"].pop("healthcheck")
    errors = " ".join(_errors(validator, bad))
    assert "service_ready" in errors and "healtcheck" in errors


# --- wiring ------------------------------------------------------------------------------------------------


def test_services_and_roles(services: dict) -> None:
    assert set(services) == {"init", "retrieval", "api", "train"}
    # a plain `docker compose up` runs everything but train; train is opt-in
    assert [name for name, svc in services.items() if "profiles" in svc] == ["train"]
    assert services["train"]["profiles"] == ["train"]
    # init and train run the same main job into the same run directory; init stops before the benchmark
    init, train = _argv(services["init"]), _argv(services["train"])
    assert init[:2] == train[:2] == ["ptrag", "run"]
    assert _flag(init, "--out") == _flag(train, "--out") == "/artifacts/default"
    assert "--no-benchmark" in init and "--no-benchmark" not in train and "--stop-after" not in train
    image = {(svc["image"], svc["build"]["dockerfile"]) for svc in services.values()}
    assert image == {("ptrag:latest", "docker/Dockerfile")}, "one image serves every role"


def test_start_order(services: dict) -> None:
    def deps(name: str) -> dict:
        return {k: v["condition"] for k, v in services[name].get("depends_on", {}).items()}

    assert deps("init") == {}
    assert deps("retrieval") == {"init": "service_completed_successfully"}
    assert deps("api") == {"init": "service_completed_successfully", "retrieval": "service_healthy"}
    assert deps("train") == {"init": "service_completed_successfully"}  # never two writers at once
    for name in WRITERS:
        assert services[name]["healthcheck"] == {"disable": True}
        assert services[name]["restart"] == "no"


def test_ports_and_healthchecks(services: dict) -> None:
    for name, port in (("retrieval", 8001), ("api", 8000)):
        argv = _argv(services[name])
        assert _flag(argv, "--host") == "0.0.0.0"
        assert int(_flag(argv, "--port")) == port
        assert [p.rsplit(":", 1)[1] for p in services[name]["ports"]] == [str(port)]
        url = urlparse(_healthcheck_url(services[name]))
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/readyz")
        health = urlparse(services[name]["environment"]["PTRAG_HEALTH_URL"])  # the image's own HEALTHCHECK
        assert (health.port, health.path) == (port, "/healthz")
        start_period = services[name]["healthcheck"]["start_period"]
        assert int(start_period.rstrip("s")) >= 60, "the index and checkpoint load before /readyz turns 200"


def test_api_points_at_the_retrieval_service_and_the_run_directory(services: dict) -> None:
    argv, env = _argv(services["api"]), services["api"]["environment"]
    url = urlparse(env["PTRAG_RETRIEVAL_URL"])
    assert url.hostname == "retrieval" and url.hostname in services
    assert url.port == int(_flag(_argv(services["retrieval"]), "--port"))
    assert _flag(argv, "--retrieval-url") == env["PTRAG_RETRIEVAL_URL"]
    assert _flag(argv, "--checkpoint") == env["PTRAG_CHECKPOINT"] == "/artifacts/default/train/ptrag/best.pt"
    assert _flag(argv, "--embeddings") == env["PTRAG_EMBEDDINGS"] == "/artifacts/default/simulated.embeddings.npz"
    assert env["PTRAG_API_KEY"] is None, "passed through from the host only when set there"
    # the index the retrieval service serves is the one init builds into the run directory
    assert services["retrieval"]["environment"]["PTRAG_INDEX_DIR"] == _flag(_argv(services["init"]), "--out") + "/index"


def _mounts(compose: dict, name: str) -> dict[str, tuple[str, str]]:
    """target -> (named volume, mode) of a service's volumes."""
    out = {}
    for spec in compose["services"][name].get("volumes", []):
        source, target, *mode = spec.split(":")
        assert source in compose["volumes"], f"{name}: {source} is not a named volume"
        out[target] = (source, mode[0] if mode else "rw")
    return out


def test_named_volumes_hold_every_path_the_commands_use(compose: dict) -> None:
    assert set(compose["volumes"]) == {"artifacts", "data"}
    for name, svc in compose["services"].items():
        mounts = _mounts(compose, name)
        words = _argv(svc) + [str(v) for v in svc.get("environment", {}).values() if v]
        paths = [w for w in words if w.startswith("/") and not w.startswith("//")]
        assert paths, name
        for path in paths:
            covering = [t for t in mounts if path == t or path.startswith(t + "/")]
            assert covering, f"{name}: {path} is on no named volume (lost with the container)"
            expected = "ro" if name in SERVERS else "rw"
            assert {mounts[t][1] for t in covering} == {expected}, f"{name}: {path} should be {expected}"
    writer_mounts = {"/artifacts": ("artifacts", "rw"), "/data": ("data", "rw")}
    assert _mounts(compose, "init") == _mounts(compose, "train") == writer_mounts


def test_gpu_override(compose: dict) -> None:
    gpu = _load(COMPOSE_GPU)
    assert set(gpu["services"]) == set(compose["services"]), "every service gets the GPU image"
    merged = _merge(compose, gpu)
    for name, svc in merged["services"].items():
        assert svc["build"] == {"context": ".", "dockerfile": "docker/Dockerfile.gpu"}, name
        assert svc["image"] == "ptrag:gpu"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert re.fullmatch(r"\$\{PTRAG_GPU_COUNT:-all\}|all|\d+", str(device["count"]))
        assert svc["command"] == compose["services"][name]["command"], "the override changes only image and GPUs"
    assert merged["services"]["train"]["profiles"] == ["train"]


# --- the commands exist ------------------------------------------------------------------------------------


def _check_command(argv: list[str], pyproject: dict) -> None:
    import importlib

    scripts = pyproject["project"]["scripts"]
    if argv[0] in scripts:
        module, func = scripts[argv[0]].split(":")
        assert (module, func) == ("api.cli", "main")
        from api.cli import _build_parser

        args = _build_parser().parse_args(argv[1:])  # SystemExit (a failure) on an unknown command or flag
        assert callable(args.func)
    elif argv[0] == "uvicorn":
        module, attr = argv[1].split(":")
        assert module.split(".")[0] in {"retrieval_service", "model", "api"}
        assert getattr(importlib.import_module(module), attr) is not None
    else:
        pytest.fail(f"{argv[0]} is neither a console script of the package nor uvicorn")


def test_every_compose_command_exists(services: dict, pyproject: dict) -> None:
    for svc in services.values():
        _check_command(_argv(svc), pyproject)


def test_dockerfile_default_command_exists(pyproject: dict) -> None:
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        (cmd,) = [args for kw, args in _instructions(path) if kw == "CMD"]
        _check_command(json.loads(cmd), pyproject)


# --- Dockerfiles -------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_structure(path: Path) -> None:
    ins = _instructions(path)
    stages = [args.split() for kw, args in ins if kw == "FROM"]
    assert len(stages) >= 2, "multi-stage: a builder and a slim runtime"
    assert [s[-1] for s in stages] == ["builder", "runtime"] and all(s[-2].upper() == "AS" for s in stages)
    runtime = ins[[i for i, (kw, _) in enumerate(ins) if kw == "FROM"][-1] :]
    assert any(kw == "COPY" and args.startswith("--from=builder /opt/venv") for kw, args in runtime)
    assert not any(kw == "RUN" and "pip install" in args for kw, args in runtime), "install in the builder only"
    users = [args for kw, args in runtime if kw == "USER"]
    assert users and users[-1] not in {"root", "0"} and not users[-1].startswith(("root:", "0:"))
    assert any(kw == "RUN" and "useradd --system --uid 10001 --gid ptrag" in args for kw, args in runtime)
    (health,) = [args for kw, args in ins if kw == "HEALTHCHECK"]
    assert "urllib.request" in health and "PTRAG_HEALTH_URL" in health and "curl" not in health
    env = " ".join(args for kw, args in runtime if kw == "ENV")
    assert "PTRAG_HEALTH_URL=http://127.0.0.1:8000/healthz" in env and "HF_HUB_OFFLINE=1" in env
    assert any(kw == "RUN" and "chown ptrag:ptrag /artifacts /data" in args for kw, args in runtime)


def _arg(ins: list[tuple[str, str]], name: str) -> str:
    (value,) = [args.split("=", 1)[1] for kw, args in ins if kw == "ARG" and args.startswith(name + "=")]
    return value


def test_cpu_image_pins_torch_first(pyproject: dict) -> None:
    ins = _instructions(DOCKERFILE)
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert pin == f"torch=={_arg(ins, 'TORCH_VERSION')}"
    runs = [args for kw, args in ins if kw == "RUN" and "pip install" in args]
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[0] and "torch==${TORCH_VERSION}" in runs[0]
    assert "faiss-gpu" not in (DOCKERFILE.read_text(encoding="utf-8"))


def test_gpu_image_has_cuda_torch_and_faiss_gpu(pyproject: dict) -> None:
    ins = _instructions(DOCKERFILE_GPU)
    assert _arg(ins, "CUDA_BASE").startswith("nvidia/cuda:12.")
    assert [args for kw, args in ins if kw == "FROM"] == ["${CUDA_BASE} AS builder", "${CUDA_BASE} AS runtime"]
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert pin == f"torch=={_arg(ins, 'TORCH_VERSION')}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", _arg(ins, "TORCH_INDEX_URL"))
    runs = " ".join(args for kw, args in ins if kw == "RUN")
    assert "faiss-gpu-cu12" in runs and "not d.startswith('faiss-cpu')" in runs
    assert "pip install --no-deps ." in runs and "StandardGpuResources" in runs
    assert any(d.startswith("faiss-cpu") for d in pyproject["project"]["dependencies"]), "what the GPU image drops"


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [x for x in lines if x and not x.startswith("#")]
    assert rules[0] == "**", "exclude everything, then allow what the image needs"
    allowed = {x[1:].rstrip("/") for x in rules if x.startswith("!")}
    copied = set()
    for path in (DOCKERFILE, DOCKERFILE_GPU):
        for kw, args in _instructions(path):
            if kw == "COPY" and not args.startswith("--from"):
                copied.update(args.split()[:-1])
    assert copied == allowed == {"pyproject.toml", "README.md", "retrieval_service", "model", "api"}
    for needed in allowed:
        assert (REPO / needed).exists()


# --- the retrieval service, started as compose starts it ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrieval_service.embeddings import GeneEmbeddings
    from retrieval_service.store import build_store

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(20)]
    emb = GeneEmbeddings(genes, rng.standard_normal((len(genes), 8)).astype(np.float32), "test-emb")
    labels = genes[:10] * 2
    return build_store(
        tmp_path_factory.mktemp("compose") / "index",
        cell_types=["k562"] * 10 + ["rpe1"] * 10,
        labels=labels,
        arrays={"delta": rng.standard_normal((20, 4)).astype(np.float32)},
        gene_embeddings=emb,
        split_id="compose-test",
    )


def _probe(command: list[str], env: dict[str, str]) -> int:
    return subprocess.run(command, env=env, capture_output=True, timeout=20, check=False).returncode


def test_retrieval_service_runs_as_compose_wires_it(services: dict, small_index: Path) -> None:
    svc = services["retrieval"]
    argv = _argv(svc)
    port = _free_port()
    # compose's command line, on loopback and a free port; python -m uvicorn is the console script's module
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)
    assert argv[0] == "uvicorn"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTRAG_")}
    env.update({k: str(v) for k, v in svc["environment"].items()})
    assert env["PTRAG_INDEX_DIR"] == "/artifacts/default/index"
    env["PTRAG_INDEX_DIR"] = str(small_index)  # the volume's path, here
    health = [part.replace(":8001/", f":{port}/") for part in svc["healthcheck"]["test"][1:]]
    assert health[0] == "python"
    health[0] = sys.executable  # the image's python is on PATH; here, the one running the tests
    dockerfile_health = re.search(r'CMD (python -c ".*")', dict(_instructions(DOCKERFILE))["HEALTHCHECK"])
    image_health = [sys.executable, "-c", dockerfile_health.group(1).split('"')[1]]
    env["PTRAG_HEALTH_URL"] = env["PTRAG_HEALTH_URL"].replace(":8001/", f":{port}/")
    log = small_index.parent / f"uvicorn-{port}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 30
        while _probe(health, env) != 0:  # compose's own healthcheck command, as the container runs it
            assert proc.poll() is None, f"the service exited: {log.read_text()}"
            assert time.monotonic() < deadline, "not ready in 30 s"
            time.sleep(0.2)
        assert _probe(image_health, env) == 0  # the Dockerfile's HEALTHCHECK, against /healthz
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/readyz").json() == {"status": "ready", "n_entries": 20, "detail": None}
            r = client.post("/search", json={"genes": ["G3"], "k": 2, "cell_types": ["rpe1"]})
            assert r.status_code == 200, r.text
            (hit,) = r.json()["results"]
            assert (hit["query"], hit["ids"][0], hit["labels"][0]) == ("G3", 13, "G3")  # itself, in rpe1
            assert hit["cell_types"] == ["rpe1", "rpe1"] and abs(hit["scores"][0] - 1.0) < 1e-5
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    # with the service gone, both checks report unhealthy
    assert _probe(health, env) != 0
    assert _probe(image_health, env) != 0
