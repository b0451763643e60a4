"""Contract tests: generated requests never get a 5xx, and responses match the OpenAPI schema.

Schemathesis generates requests from ``/openapi.json`` (valid and invalid ones: wrong types, missing fields,
non-JSON bodies) through the app's ASGI interface; it rarely names a real cell type or gene, so a hypothesis
test adds requests built from the model's own vocabulary, with malformed parts mixed in.
"""

from __future__ import annotations

import json
import math

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from test_api_app import settings_for, trained

from api.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]  # fmt: skip


KEY = "contract-key"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return trained(tmp_path_factory)


def _app(model):
    return create_app(settings_for(model, max_perturbations=8, max_cells=256, api_key=KEY))


@pytest.fixture(scope="module")
def api_schema(model):
    # Schemathesis runs the app's lifespan (the model loads once) and ends it after each test.
    schema = schemathesis.openapi.from_asgi("/openapi.json", _app(model))

    @schema.auth()
    class BearerKey:
        """The right key on generated requests; schemathesis still sends some without it (those must be 401)."""

        def get(self, case, context) -> str:
            return KEY

        def set(self, case, data: str, context) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_generated_requests_never_5xx_and_match_the_schema(case) -> None:
    case.call_and_validate(checks=CHECKS)


_TEXT = st.text(max_size=12)


@st.composite
def _bodies(draw, cell_types: list[str], genes: list[str], model_genes: list[str]):
    """Valid /predict bodies from the model's vocabulary, then up to two parts broken (wrong type, NaN, ragged
    rows, unknown names, too many cells...)."""
    gene = st.sampled_from(genes)
    label = st.one_of(gene, st.builds(lambda a, b: f"{a}+{b}", gene, gene))
    body = {
        "cell_type": draw(st.sampled_from(cell_types)),
        "perturbations": draw(st.lists(label, min_size=1, max_size=4)),
        "n_cells": draw(st.integers(1, 32)),
        "seed": draw(st.integers(0, 2**32)),
        "return_cells": draw(st.booleans()),
        "top_n": draw(st.integers(0, 30)),
    }
    if draw(st.booleans()):
        cols = draw(st.lists(st.sampled_from(model_genes), min_size=1, max_size=6, unique=True))
        rows = draw(st.lists(st.lists(st.floats(0, 5), min_size=len(cols), max_size=len(cols)), min_size=1,
                             max_size=3))  # fmt: skip
        body["control_cells"] = {"genes": cols, "values": rows}
    breaks = {
        "wrong_type": lambda b: b.update({draw(st.sampled_from(sorted(b))): draw(st.one_of(
            st.none(), _TEXT, st.integers(), st.floats(), st.lists(st.integers(), max_size=2)))}),
        "unknown_name": lambda b: b.update({draw(st.sampled_from(["cell_type", "perturbations"])): draw(_TEXT)}),
        "unknown_gene": lambda b: b["perturbations"].append(draw(_TEXT) + "+" + draw(gene)),
        "too_many_cells": lambda b: b.update(n_cells=draw(st.integers(257, 10**6))),
        "bad_number": lambda b: b.update(seed=draw(st.sampled_from([-1, 2**64])), top_n=-1),
        "bad_control": lambda b: b.update(control_cells={
            "genes": draw(st.lists(st.one_of(st.sampled_from(model_genes), _TEXT), max_size=4)),
            "values": draw(st.lists(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                       st.just(1e300)), max_size=5), max_size=3)),
        }),
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(breaks)), max_size=2, unique=True)):
        breaks[name](body)
    return body


def test_vocabulary_requests_never_5xx(model) -> None:
    with TestClient(_app(model), headers={"Authorization": f"Bearer {KEY}"}) as client:
        info = client.get("/info").json()
        _check_vocabulary_requests(client, info, list(model.genes[:10]))


def _check_vocabulary_requests(client: TestClient, info: dict, genes: list[str]) -> None:
    statuses: list[int] = []

    @given(_bodies(info["cell_types"], genes, info["genes"][:8]))
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(body: dict) -> None:
        # allow_nan: Python's JSON parser takes NaN/Infinity tokens, so a client may send them
        r = client.post("/predict", content=json.dumps(body, allow_nan=True),
                        headers={"content-type": "application/json"})  # fmt: skip
        statuses.append(r.status_code)
        assert r.status_code in (200, 413, 422), (r.status_code, r.text[:500])
        if r.status_code == 200:
            out = r.json()
            assert len(out["predictions"]) == len(body["perturbations"])
            assert all(len(p["delta"]) == info["n_genes"] for p in out["predictions"])
            assert all(math.isfinite(x) for p in out["predictions"] for x in p["delta"])
        else:
            assert "request_id" in r.json()

    check()
    assert statuses.count(200) >= 5 and statuses.count(422) >= 5  # both outcomes were exercised
