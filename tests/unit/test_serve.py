"""The scoring service: predictions equal Trainer.predict, 4xx naming the field for bad input,
limits, unknown categories, metadata, and no 5xx for any generated request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from _serving_runs import make_run
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlrec.serve import Scorer, create_app
from mtlrec.testing import tiny_table
from mtlrec.train.run import load_run

MAX = 50


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve"), "mmoe")


@pytest.fixture(scope="module")
def client(run: Path) -> TestClient:
    return TestClient(create_app(Scorer.load(run), max_candidates=MAX, max_body_bytes=64 << 10))


def _rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rows = tiny_table(n, seed=seed).drop(["click", "watch"]).to_pylist()
    for r in rows:  # the service takes sequences as lists
        r["hist"] = [x for x in r["hist"].split("|") if x]
    return rows


def _predict(run: Path, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    import pyarrow as pa

    loaded = load_run(run)
    table = pa.Table.from_pylist(rows)
    return loaded.trainer().predict(loaded.preprocessor.encode(table, targets=False))


def _detail_locs(r) -> list[list[Any]]:
    return [d["loc"] for d in r.json()["detail"]]


def test_score_equals_trainer_predict(client: TestClient, run: Path) -> None:
    rows = _rows(30)
    r = client.post("/score", json={"candidates": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tasks"] == ["click", "watch"] and body["model"] == "mmoe"
    want = _predict(run, rows)
    got = {t: np.array([c["predictions"][t] for c in body["results"]]) for t in body["tasks"]}
    assert [c["index"] for c in body["results"]] == list(range(30))
    for t in ("click", "watch"):
        np.testing.assert_allclose(got[t], want[t], atol=1e-6, rtol=0)


def test_context_is_broadcast_and_sort(client: TestClient, run: Path) -> None:
    rows = _rows(20, seed=2)
    ctx = {"user": "u3", "hist": ["i1", "i2"]}
    cands = [{"item": r["item"], "price": r["price"]} for r in rows]
    r = client.post("/score", json={"context": ctx, "candidates": cands, "sort_by": "click"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    want = _predict(run, [{**ctx, **c} for c in cands])
    clicks = [c["predictions"]["click"] for c in res]
    assert clicks == sorted(clicks, reverse=True)
    for c in res:
        assert c["predictions"]["click"] == pytest.approx(want["click"][c["index"]], abs=1e-6)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (
            {"candidates": [{"item": "i1", "price": 1.0, "hist": []}]},
            ["body", "candidates", 0, "user"],
        ),
        ({"candidates": [{**_rows(1)[0], "colour": "red"}]}, ["body", "candidates", 0, "colour"]),
        ({"candidates": [{**_rows(1)[0], "price": "cheap"}]}, ["body", "candidates", 0, "price"]),
        ({"candidates": [{**_rows(1)[0], "price": True}]}, ["body", "candidates", 0, "price"]),
        ({"candidates": [{**_rows(1)[0], "price": -5.0}]}, ["body", "candidates", 0, "price"]),
        ({"candidates": [{**_rows(1)[0], "item": True}]}, ["body", "candidates", 0, "item"]),
        ({"candidates": [{**_rows(1)[0], "hist": "i1|i2"}]}, ["body", "candidates", 0, "hist"]),
        ({"context": {"user": 1.5}, "candidates": _rows(1)}, ["body", "context", "user"]),
        ({"candidates": []}, ["body", "candidates"]),
        ({"candidates": _rows(MAX + 1)}, ["body", "candidates"]),
        ({"candidates": _rows(1), "sort_by": "nope"}, ["body", "sort_by"]),
        ({"candidates": _rows(1), "extra": 1}, ["body", "extra"]),
        ({}, ["body", "candidates"]),
    ],
)
def test_bad_input_is_422_naming_the_field(client: TestClient, body: dict, loc: list) -> None:
    r = client.post("/score", json=body)
    assert r.status_code == 422, r.text
    assert any(got[: len(loc)] == loc for got in _detail_locs(r)), r.text


def test_malformed_json_oversized_body_and_wrong_method(client: TestClient) -> None:
    r = client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    r = client.post(
        "/score", content=b"x" * (70 << 10), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert "larger than the limit" in r.json()["detail"]
    assert client.get("/score").status_code == 405


@pytest.fixture(scope="module")
def roomy(run: Path) -> TestClient:
    """A service that takes requests of several megabytes (and 50,000 candidates)."""
    return TestClient(create_app(Scorer.load(run), max_candidates=50_000, max_body_bytes=16 << 20))


@pytest.mark.parametrize(
    "what",
    ["too_many_candidates", "huge_string", "many_bad_values", "huge_unknown_key", "not_a_list"],
)
def test_a_large_bad_request_is_not_echoed_back(
    client: TestClient, roomy: TestClient, what: str
) -> None:
    row = _rows(1)[0]
    big = "x" * (3 << 20)
    c, body = {
        "too_many_candidates": (client, {"candidates": [row] * 20_000}),
        "huge_string": (roomy, {"candidates": [{**row, "price": big}]}),
        "many_bad_values": (roomy, {"candidates": [{**row, "price": "cheap" * 100}] * 20_000}),
        "huge_unknown_key": (roomy, {"candidates": [{**row, big: 1}]}),
        "not_a_list": (roomy, {"candidates": {str(i): row for i in range(20_000)}}),
    }[what]
    if c is client:  # the small service's body limit would answer 413 first
        c = TestClient(
            create_app(client.app.state.scorer, max_candidates=MAX, max_body_bytes=16 << 20)
        )
    sent = len(json.dumps(body))
    assert sent > 1 << 20
    r = c.post("/score", json=body)
    assert r.status_code == 422, r.text[:500]
    assert len(r.content) < 64 << 10, f"{len(r.content)} bytes answered to {sent} sent"
    detail = r.json()["detail"]
    assert detail and all("loc" in d and "msg" in d for d in detail)
    assert detail[0]["loc"][:2] == ["body", "candidates"]


def test_a_small_bad_input_is_still_echoed_whole(client: TestClient) -> None:
    r = client.post("/score", json={"candidates": [{**_rows(1)[0], "price": "cheap"}]})
    assert r.status_code == 422
    assert [d["input"] for d in r.json()["detail"]] == ["cheap"]


def test_integers_and_integral_floats_are_categories(client: TestClient) -> None:
    row = {**_rows(1)[0], "user": 7}
    a = client.post("/score", json={"candidates": [row]}).json()
    b = client.post("/score", json={"candidates": [{**row, "user": 7.0}]}).json()
    c = client.post("/score", json={"candidates": [{**row, "user": "7"}]}).json()
    assert a["results"] == b["results"] == c["results"]


def test_unknown_categories_and_nulls_are_scored(client: TestClient) -> None:
    before = client.get("/metadata").json()["unknown_categories"].get("item", 0)
    rows = _rows(3)
    rows[0]["item"] = "brand-new-item"
    rows[1]["price"] = None
    rows[2]["hist"] = ["brand-new", "i1"]
    r = client.post("/score", json={"candidates": rows})
    assert r.status_code == 200, r.text
    assert r.json()["unknown"] == {"item": 1, "hist": 1}
    meta = client.get("/metadata").json()
    assert meta["unknown_categories"]["item"] == before + 1


def test_metadata_healthz_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["model"] == "mmoe" and meta["backend"] == "torch"
    assert [t["name"] for t in meta["tasks"]] == ["click", "watch"]
    assert [f["name"] for f in meta["features"]] == ["user", "item", "price", "hist"]
    assert meta["max_candidates"] == MAX
    spec = client.get("/openapi.json").json()
    assert "/score" in spec["paths"]
    cand = spec["components"]["schemas"]["Candidate"]
    assert set(cand["properties"]) == {"user", "item", "price", "hist"}
    assert cand["additionalProperties"] is False


def test_fixed_context_features(run: Path) -> None:
    c = TestClient(create_app(Scorer.load(run), context_features=["user", "hist"]))
    rows = _rows(4)
    cands = [{"item": r["item"], "price": r["price"]} for r in rows]
    ok = c.post("/score", json={"context": {"user": "u1", "hist": []}, "candidates": cands})
    assert ok.status_code == 200, ok.text
    r = c.post("/score", json={"context": {"user": "u1"}, "candidates": cands})
    assert r.status_code == 422 and ["body", "context", "hist"] in _detail_locs(r)
    r = c.post("/score", json={"context": {"user": "u1", "hist": []}, "candidates": rows})
    assert r.status_code == 422 and ["body", "candidates", 0, "user"] in _detail_locs(r)


def test_export_backend_and_fusion(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("mtlrec.fusion")
    from mtlrec.export import export_run

    fusion = tmp_path / "fusion.json"
    fusion.write_text(
        json.dumps(
            {
                "format": 1,
                "kind": "weighted_sum",
                "tasks": ["click", "watch"],
                "params": {"weights": {"click": 1.0, "watch": 0.25}},
            }
        )
    )
    export_run(run, tmp_path / "ts", format="torchscript", fusion=fusion)
    c = TestClient(create_app(Scorer.load(tmp_path / "ts")))
    assert c.get("/metadata").json()["backend"] == "torchscript"
    rows = _rows(12)
    r = c.post("/score", json={"candidates": rows, "sort_by": "score"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    scores = [x["score"] for x in res]
    assert scores == sorted(scores, reverse=True)
    want = _predict(run, rows)
    for x in res:
        p = x["predictions"]
        assert p["click"] == pytest.approx(want["click"][x["index"]], abs=1e-5)
        assert x["score"] == pytest.approx(p["click"] + 0.25 * p["watch"], rel=1e-6)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.one_of(st.text(max_size=3), st.integers(), st.floats()), max_size=8),
)
candidate = st.dictionaries(
    st.sampled_from(["user", "item", "price", "hist", "other"]), field_values, max_size=5
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"candidates": st.lists(candidate, max_size=4)},
            optional={"context": candidate, "sort_by": st.sampled_from(["click", "watch", "x"])},
        ),
    )
)
def test_no_5xx_for_any_json_body(client: TestClient, body: Any) -> None:
    r = client.post(
        "/score", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        for c in r.json()["results"]:
            assert all(np.isfinite(v) for v in c["predictions"].values())


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_server_errors(client: TestClient, mode: str) -> None:
    """Requests generated from the OpenAPI document (valid ones, then invalid ones): never a
    5xx; a valid /score request gets 200 with a body matching ScoreResponse (or a 422 naming
    a feature given neither in the context nor in a candidate)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import settings as hsettings

    from mtlrec.serve.schemas import ScoreResponse

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    failures: list[str] = []
    for op in schema.get_all_operations():
        operation = op.ok()
        if mode == "negative" and operation.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters
        strategy = operation.as_strategy(schemathesis.GenerationMode(mode))

        @hsettings(max_examples=25, deadline=None, database=None)
        @given(case=strategy)
        def check(case: Any) -> None:
            resp = case.call()
            if resp.status_code >= 500:
                failures.append(f"{case.path}: {resp.status_code} {resp.text[:200]}")
            assert resp.status_code < 500
            if mode == "positive" and case.path == "/score":
                if resp.status_code == 200:
                    ScoreResponse.model_validate_json(resp.text)
                else:
                    assert resp.status_code == 422, resp.text
                    assert "neither in the context nor in this candidate" in resp.text

        check()
    assert not failures


def test_cli_serve_bad_folder_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mtlrec.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "Traceback" not in r.output


def test_context_value_is_encoded_once(client: TestClient, run: Path) -> None:
    rows = _rows(5, seed=6)
    cands = [{"item": r["item"], "price": r["price"]} for r in rows]
    ctx = {"user": "a-new-user", "hist": ["i1", "unseen"]}
    r = client.post("/score", json={"context": ctx, "candidates": cands})
    assert r.status_code == 200, r.text
    assert r.json()["unknown"] == {"user": 1, "hist": 1}  # counted once, not per candidate
    want = _predict(run, [{**ctx, **c} for c in cands])
    got = [c["predictions"]["watch"] for c in r.json()["results"]]
    np.testing.assert_allclose(got, want["watch"], atol=1e-6, rtol=0)


def test_connections_get_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's multi-worker listening socket is made without a protocol number, so asyncio
    leaves Nagle on for its connections (a head + body answer then waits ~40 ms for the
    client's delayed ACK); the service's protocol switches it off on every connection."""
    import socket

    from mtlrec.serve import protocol

    made: list[Any] = []
    monkeypatch.setattr(protocol._Base, "connection_made", lambda self, t: made.append(t))

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str) -> Any:
            return self.sock if name == "socket" else None

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # as uvicorn binds it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
                proto = object.__new__(protocol.NoDelayProtocol)
                t = Transport(conn)
                proto.connection_made(t)  # type: ignore[arg-type]
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                assert made == [t]  # uvicorn's own set-up still runs
                client.sendall(b"x")
                assert conn.recv(1) == b"x"
