"""Training and prediction against a real retrieval service on 127.0.0.1 match the in-process store exactly."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from test_train import SMALL, _config, _params

from model.data.splits import Split
from model.examples import CandidateTable, retrieve_candidates
from model.pipeline import RunConfig, run_main_job
from model.predict import Predictor
from model.remote_store import RemoteStore
from model.train import train
from retrieval_service.app import Settings, create_app
from retrieval_service.client import RetrievalClient
from retrieval_service.embeddings import load_embeddings
from retrieval_service.store import Store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = tmp_path_factory.mktemp("remote") / "run"
    run_main_job(RunConfig(out=run, seed=0, simulator=SMALL, n_sample_cells=8, stop_after="index"))
    app = create_app(Settings(index_dir=run / "index"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    with RetrievalClient(url, timeout=10.0) as probe:
        deadline = time.monotonic() + 30
        while not probe.healthy():
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        probe.wait_ready(30)
    yield run, url
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_remote_candidates_equal_in_process(served):
    run, url = served
    split = Split.load(run / "split.json")
    local = Store.open(run / "index")
    emb = load_embeddings(run / "simulated.embeddings.npz")
    with RetrievalClient(url) as client:
        remote = RemoteStore(client, emb, control_label="non-targeting")
        assert len(remote) == len(local)
        cell_types = sorted({c for c, _ in split.train})
        for pairs in (split.train[:40], split.test):
            a = retrieve_candidates(local, pairs, cell_types=cell_types, k=8)
            b = retrieve_candidates(remote, pairs, cell_types=cell_types, k=8)
            np.testing.assert_array_equal(a.cand_ids, b.cand_ids)
            np.testing.assert_allclose(a.query, b.query, atol=1e-6)
        ta, tb = CandidateTable.from_store(local, cell_types), CandidateTable.from_store(remote, cell_types)
        torch.testing.assert_close(ta.keys, tb.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(ta.delta, tb.delta, atol=0, rtol=0)
        assert torch.equal(ta.cell_type, tb.cell_type)
        # A table other than the service's (one gene fewer) is refused: keys would not match the service's.
        with pytest.raises(ValueError, match="not the gene table the retrieval service was built with"):
            RemoteStore(client, emb.subset(emb.symbols[:-1]), control_label="non-targeting")


def test_training_and_prediction_over_http_match_local(served, tmp_path):
    run, url = served
    train(_config(run, tmp_path / "local", max_steps=4, eval_every=2))
    remote_cfg = _config(run, tmp_path / "remote", max_steps=4, eval_every=2, index="", retrieval_url=url,
                         embeddings=str(run / "simulated.embeddings.npz"))  # fmt: skip
    train(remote_cfg)
    pa, pb = _params(tmp_path / "local" / "last.pt"), _params(tmp_path / "remote" / "last.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    gene = Split.load(run / "split.json").test[0][1]
    local = Predictor.load(tmp_path / "local" / "last.pt").predict("rpe1", [gene], n_cells=8)[0]
    remote = Predictor.load(tmp_path / "remote" / "last.pt").predict("rpe1", [gene], n_cells=8)[0]
    np.testing.assert_allclose(local.cells, remote.cells, atol=1e-4)
    assert local.candidates["id"].tolist() == remote.candidates["id"].tolist()


def test_store_choice_is_explicit(tmp_path):
    from model.train import open_store

    with pytest.raises(ValueError, match="exactly one of --index"):
        open_store("", retrieval_url="", control_label="c")
    with pytest.raises(ValueError, match="needs --embeddings"):
        open_store("", retrieval_url="http://127.0.0.1:9", control_label="c")
    assert Path(tmp_path).exists()
