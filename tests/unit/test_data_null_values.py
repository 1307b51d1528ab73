"""One definition of a missing value (issue 13.2): the run's null tokens (``data.null_values``)
are saved with its encoders and applied alike by the CSV and Parquet readers, ``predict``, an
exported model and the scoring service -- the same rows give the same predictions, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtlrec.batch import OOV_ID
from mtlrec.config import ExperimentConfig
from mtlrec.data.columns import DEFAULT_NULL_VALUES, to_missing
from mtlrec.data.file_encoding import encode_file, fit_file
from mtlrec.data.io import read_table
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import DataError
from mtlrec.testing import tiny_schema, tiny_table
from mtlrec.train.run import load_run, train_run

FEATURES: list[dict[str, Any]] = [
    {"type": "sparse", "name": "user", "embedding_dim": 4},
    {"type": "sparse", "name": "item", "embedding_dim": 4, "table": "item"},
    {"type": "dense", "name": "price", "transform": "log1p_standardize"},
    {"type": "sequence", "name": "hist", "embedding_dim": 4, "table": "item", "max_len": 5},
]
TASKS: list[dict[str, Any]] = [
    {"name": "click", "kind": "binary"},
    {"name": "watch", "kind": "regression", "mask": "click"},
]


def raw_rows(n: int, seed: int) -> pa.Table:
    """tiny_table rows where the category ``NA`` is frequent (a quarter of the users), some
    users are real nulls, some prices are null and histories hold an ``NA`` element."""
    t = tiny_table(n, seed=seed)
    user = t.column("user").to_pylist()
    hist = t.column("hist").to_pylist()
    price = t.column("price").to_pylist()
    for i in range(n):
        if i % 4 == 1:
            user[i] = "NA"
        elif i % 9 == 2:
            user[i] = None
        if i % 5 == 3:
            hist[i] = "NA" if i % 2 else (hist[i] + "|NA" if hist[i] else "NA|i3")
        if i % 11 == 4:
            price[i] = None
    cols = {c: t.column(c) for c in t.column_names}
    cols.update(
        user=pa.array(user, pa.string()),
        hist=pa.array(hist, pa.string()),
        price=pa.array(price, pa.float64()),
    )
    return pa.table(cols)


def write_both(table: pa.Table, folder: Path, stem: str) -> tuple[Path, Path]:
    csv, parquet = folder / f"{stem}.csv", folder / f"{stem}.parquet"
    pacsv.write_csv(table, csv)
    pq.write_table(table, parquet)
    return csv, parquet


def train(folder: Path, data: Path, null_values: list[str] | None) -> Path:
    d: dict[str, Any] = {"train": str(data), "split": {"fractions": [0.8, 0.1, 0.1], "seed": 0}}
    if null_values is not None:
        d["null_values"] = null_values
    cfg = ExperimentConfig.from_dict(
        {
            "data": d,
            "schema": {"features": FEATURES, "tasks": TASKS},
            "model": {
                "name": "mmoe",
                "params": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
            },
            "training": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": {"lr": 0.05},
                "progress": False,
                "num_threads": 1,
            },
            "output_dir": str(folder / "run"),
        }
    )
    return train_run(cfg, overwrite=True).path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("nulls")
    # trained on Parquet: before the fix, "NA" was a category there but a null in CSV
    _, train_pq = write_both(raw_rows(300, seed=1), d, "train")
    run = train(d, train_pq, None)
    score = raw_rows(120, seed=2)
    csv, parquet = write_both(score, d, "score")
    return {"dir": d, "run": run, "table": score, "csv": csv, "parquet": parquet}


def _service_rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.drop(["click", "watch"]).to_pylist()
    for r in rows:  # the service takes a sequence as a list (an "NA" element stays one)
        r["hist"] = None if r["hist"] is None else [x for x in r["hist"].split("|") if x]
    return rows


def _service(app_source: Path, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from mtlrec.serve import Scorer, create_app

    client = TestClient(create_app(Scorer.load(app_source)))
    r = client.post("/score", json={"candidates": rows})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    return {t: np.array([c["predictions"][t] for c in res], np.float32) for t in ("click", "watch")}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    for t in ("click", "watch"):
        x, y = np.asarray(a[t], np.float32), np.asarray(b[t], np.float32)
        assert x.shape == y.shape and np.array_equal(x, y), f"{what}: {t} differs"


def test_every_path_reads_na_and_nulls_alike(setup: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mtlrec.cli import app

    loaded = load_run(setup["run"])
    pre = loaded.preprocessor
    assert pre.null_values == DEFAULT_NULL_VALUES
    assert json.loads((setup["run"] / "encoders.json").read_text())["null_values"] == list(
        DEFAULT_NULL_VALUES
    )
    trainer = loaded.trainer()
    enc_csv = encode_file(pre, setup["csv"], targets=False)[0]
    enc_pq = encode_file(pre, setup["parquet"], targets=False)[0]
    # the encoded rows themselves: "NA" and a null are both the OOV id
    assert np.array_equal(enc_csv.sparse.numpy(), enc_pq.sparse.numpy())
    user = enc_pq.sparse[:, 0].numpy()
    assert (user[1::4] == OOV_ID).all() and user[2] == OOV_ID
    for k in enc_csv.sequences:
        assert np.array_equal(enc_csv.sequences[k].numpy(), enc_pq.sequences[k].numpy())
    assert np.array_equal(enc_csv.dense.numpy(), enc_pq.dense.numpy())
    want = trainer.predict(enc_pq)
    _same(trainer.predict(enc_csv), want, "CSV vs Parquet")
    # the same table from Python (a dict of columns)
    py = {c: setup["table"].column(c).to_pylist() for c in ("user", "item", "price", "hist")}
    _same(trainer.predict(pre.encode(py, targets=False)), want, "dict of columns")
    # `mtlrec predict` on both files
    runner = CliRunner()
    for src in (setup["csv"], setup["parquet"]):
        out = tmp_path / f"pred_{src.suffix[1:]}.parquet"
        res = runner.invoke(
            app, ["predict", str(setup["run"]), "--input", str(src), "--output", str(out)]
        )
        assert res.exit_code == 0, res.output
        got = pq.read_table(out)
        _same({t: got.column(t).to_numpy() for t in ("click", "watch")}, want, f"predict {src}")
    # the service on the run folder: "NA" as a string, a real null as JSON null
    rows = _service_rows(setup["table"])
    assert rows[1]["user"] == "NA" and rows[2]["user"] is None
    _same(_service(setup["run"], rows), want, "POST /score")
    # the exported model, by itself and behind the service
    from mtlrec.export import ExportedModel, export_run

    export_run(setup["run"], tmp_path / "ts", format="torchscript")
    exported = ExportedModel.load(tmp_path / "ts")
    assert exported.preprocessor.null_values == DEFAULT_NULL_VALUES
    ex = exported.score_raw(read_table(setup["parquet"]))
    _same(exported.score_raw(pacsv.read_csv(setup["csv"])), ex, "export: CSV table")
    _same(exported.score_raw(_service_rows_as_table(setup["table"])), ex, "export: lists")
    _same(_service(tmp_path / "ts", rows), ex, "POST /score on the export")
    for t in ("click", "watch"):  # and the export is the eager model
        np.testing.assert_allclose(ex[t], want[t], rtol=0, atol=1e-5)


def _service_rows_as_table(table: pa.Table) -> pa.Table:
    return pa.Table.from_pylist(_service_rows(table))


def test_custom_null_values_keep_na_a_category_in_csv_and_parquet(tmp_path: Path) -> None:
    _, parquet = write_both(raw_rows(300, seed=1), tmp_path, "train")
    run = train(tmp_path, tmp_path / "train.csv", [])
    cfg_text = (run / "config.yaml").read_text()
    assert "null_values: []" in cfg_text
    pre = load_run(run).preprocessor
    assert pre.null_values == ()
    assert "NA" in pre.tables["user"].vocab.to_pylist()  # read from CSV, kept as a value
    a = encode_file(pre, tmp_path / "train.csv")[0]
    b = encode_file(pre, parquet)[0]
    assert np.array_equal(a.sparse.numpy(), b.sparse.numpy())
    assert (a.sparse[1::4, 0] != OOV_ID).all()
    assert np.array_equal(a.sequences["hist"].numpy(), b.sequences["hist"].numpy())


def test_to_missing_rule() -> None:
    tokens = ("NA", "?")
    got = to_missing(pa.array(["a", "NA", "", None, "?", " NA", "na"]), tokens).to_pylist()
    assert got == ["a", None, None, None, None, " NA", "na"]  # exact, case-sensitive
    assert to_missing(pa.array([1.5, float("nan"), None]), tokens).to_pylist() == [1.5, None, None]
    assert to_missing(pa.array([1, 2]), tokens).to_pylist() == [1, 2]
    d = pa.array(["NA", "x", "NA"]).dictionary_encode()
    assert to_missing(d, tokens).to_pylist() == [None, "x", None]
    assert to_missing(pa.array(["NA", ""], pa.large_string()), ()).to_pylist() == ["NA", None]


def test_read_table_reads_csv_and_parquet_alike(tmp_path: Path) -> None:
    t = pa.table({"c": ["a", "NA", None, "?", "b"], "x": [1.0, None, float("nan"), 2.0, 3.0]})
    csv, parquet = write_both(t, tmp_path, "t")
    a, b = read_table(csv, string_columns=["c"]), read_table(parquet)
    assert a.to_pylist() == b.to_pylist()
    assert a.column("c").to_pylist() == ["a", None, None, None, "b"]
    a, b = (
        read_table(csv, string_columns=["c"], null_values=[]),
        read_table(parquet, null_values=[]),
    )
    assert a.column("c").to_pylist() == b.column("c").to_pylist() == ["a", "NA", None, "?", "b"]


def test_tokens_apply_to_labels_masks_and_dense_text() -> None:
    schema = tiny_schema(sequences=False)
    t = tiny_table(50, sequences=False)
    price = pa.array([str(v) for v in t.column("price").to_pylist()[:-1]] + ["n/a"], pa.string())
    watch = pa.array(["MISSING" if v is None else str(v) for v in t.column("watch").to_pylist()])
    t = t.set_column(2, "price", price).set_column(
        t.schema.get_field_index("watch"), "watch", watch
    )
    with pytest.raises(DataError, match="expected a number, found 'n/a'"):
        Preprocessor.fit(schema, t)
    pre = Preprocessor.fit(schema, t, null_values=["n/a", "MISSING"])
    ds = pre.encode(t)
    enc = pre.dense["price"]
    assert ds.dense[-1, 0].item() == pytest.approx((0.0 - enc.mean) / enc.std)  # the fill
    assert pre.null_values == ("n/a", "MISSING")


def test_saved_tokens_round_trip_and_old_encoders_get_the_default() -> None:
    pre = Preprocessor.fit(tiny_schema(), tiny_table(100), null_values=["?", "-"])
    back = Preprocessor.from_json(pre.schema, pre.to_json())
    assert back.null_values == ("?", "-")
    old = pre.to_dict()
    del old["null_values"]  # encoders.json written before the tokens were saved
    assert Preprocessor.from_dict(pre.schema, old).null_values == DEFAULT_NULL_VALUES


def test_fit_file_saves_the_given_tokens(tmp_path: Path) -> None:
    _, parquet = write_both(raw_rows(200, seed=3), tmp_path, "t")
    pre = fit_file(tiny_schema(), parquet, null_values=["x"])
    assert pre.null_values == ("x",)
    assert "NA" in pre.tables["user"].vocab.to_pylist()
