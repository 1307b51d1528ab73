"""`mtlrec fuse` then `mtlrec predict --fusion` on a tiny two-task run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml

from mtlrec.fusion import load_fusion

pytestmark = pytest.mark.slow  # three rounds of CLI calls (train, fuse, predict)


def _data(path: Path, n: int = 1500) -> None:
    rng = np.random.default_rng(0)
    user, item, price = rng.integers(0, 30, n), rng.integers(0, 40, n), rng.lognormal(0, 1, n)
    l1 = (item % 3 == 0) * 1.5 - 0.5 + 0.3 * np.log1p(price) + rng.normal(0, 1, n)
    l2 = (item % 4 == 0) * 1.5 - 1.0 + 0.2 * (user % 3) + rng.normal(0, 1, n)
    table = {
        "user": [f"u{u}" for u in user],
        "item": [f"i{i}" for i in item],
        "price": price,
        "click": (l1 > 0).astype(int),
        "conv": (l2 > 0).astype(int),
    }
    pacsv.write_csv(pa.table(table), path)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory: pytest.TempPathFactory, cli) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("fuse")
    _data(d / "d.csv")
    cfg = {
        "data": {"train": "d.csv", "split": {"fractions": [0.6, 0.2, 0.2], "seed": 0}},
        "schema": {
            "features": [
                {"type": "sparse", "name": "user", "embedding_dim": 4},
                {"type": "sparse", "name": "item", "embedding_dim": 4},
                {"type": "dense", "name": "price", "transform": "log1p_standardize"},
            ],
            "tasks": [{"name": "click", "kind": "binary"}, {"name": "conv", "kind": "binary"}],
            "group_column": "user",
        },
        "model": {"name": "mmoe", "params": {"num_experts": 2, "expert_hidden": [8]}},
        "training": {"epochs": 2, "batch_size": 256, "optimizer": {"lr": 0.01}},
        "output_dir": "run",
    }
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli.run("train", "c.yaml", "--no-progress", cwd=d)
    assert r.returncode == 0, r
    return d


def test_fuse_then_predict_with_the_fusion(fused_run: Path, cli) -> None:  # type: ignore[no-untyped-def]
    d = fused_run
    res = cli.run_all(
        {
            "cem": [
                "fuse",
                "run",
                "--output",
                "cem.json",
                "--objective",
                "click:1,conv:2",
                "--budget",
                "60",
                "--eval-split",
                "test",
                "--plot",
                "front.png",
            ],
            "lgbm": [
                "fuse",
                "run",
                "--output",
                "lgbm.json",
                "--method",
                "lgbm",
                "--label",
                "click + 2*conv",
            ],
            "bad": ["fuse", "run", "--output", "x.json", "--objective", "click:1,buy:2"],
        },
        cwd=d,
    )
    assert res["cem"].returncode == 0, res["cem"]
    assert "Pareto front" in res["cem"].stdout and "chosen (test)" in res["cem"].stdout
    assert (d / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert res["lgbm"].returncode == 0, res["lgbm"]
    assert (d / "lgbm.lgbm.txt").is_file()
    assert res["bad"].returncode == 2 and "['buy']" in res["bad"].stderr, res["bad"]
    meta = json.loads((d / "cem.json").read_text())["meta"]
    assert meta["objective"] >= meta["start_objective"]

    (d / "wrong.json").write_text((d / "cem.json").read_text().replace('"conv"', '"buy"'))
    res = cli.run_all(
        {
            "cem": [
                "predict",
                "run",
                "--input",
                "d.csv",
                "--output",
                "o1.csv",
                "--fusion",
                "cem.json",
            ],
            "lgbm": [
                "predict",
                "run",
                "--input",
                "d.csv",
                "--output",
                "o2.csv",
                "--fusion",
                "lgbm.json",
            ],
            "wrong": [
                "predict",
                "run",
                "--input",
                "d.csv",
                "--output",
                "o3.csv",
                "--fusion",
                "wrong.json",
            ],
        },
        cwd=d,
    )
    for name in ("cem", "lgbm"):
        assert res[name].returncode == 0, res[name]
    assert res["wrong"].returncode == 2
    assert "['buy']" in res["wrong"].stderr and "Traceback" not in res["wrong"].stderr
    for out, fusion in (("o1.csv", "cem.json"), ("o2.csv", "lgbm.json")):
        t = pacsv.read_csv(d / out)
        probs = {k: t.column(k).to_numpy() for k in ("click", "conv")}
        want = load_fusion(d / fusion)(probs)
        np.testing.assert_allclose(t.column("score").to_numpy(), want, rtol=1e-9)


def test_fuse_refuses_to_report_on_its_fit_split_unless_labelled(fused_run: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """Issue 12.10: ``--split test --eval-split test`` is refused; ``--allow-in-sample`` runs it
    and labels the report in-sample in every output (table, JSON rows, the fusion file)."""
    d = fused_run
    common = ["--method", "random", "--budget", "5", "--objective", "click:1,conv:1"]
    same = ["--split", "test", "--eval-split", "test"]
    res = cli.run_all(
        {
            "refused": ["fuse", "run", "--output", "same.json", *common, *same],
            "table": [
                "fuse",
                "run",
                "--output",
                "ins.json",
                *common,
                *same,
                "--allow-in-sample",
            ],
            "json": [
                "fuse",
                "run",
                "--output",
                "ins2.json",
                *common,
                *same,
                "--allow-in-sample",
                "--json",
            ],
            "honest": [
                "fuse",
                "run",
                "--output",
                "out.json",
                *common,
                "--eval-split",
                "test",
                "--json",
            ],
        },
        cwd=d,
    )
    r = res["refused"]
    assert r.returncode == 2, r
    assert "in-sample" in r.stderr and "--allow-in-sample" in r.stderr, r
    assert "Traceback" not in r.stderr and not (d / "same.json").exists()

    r = res["table"]
    assert r.returncode == 0, r
    assert "IN-SAMPLE" in r.stdout and "note: the test figures are in-sample" in r.stdout, r
    meta = json.loads((d / "ins.json").read_text())["meta"]
    assert meta["in_sample_eval"] is True
    assert "test_in_sample_objective" in meta and "test_in_sample_per_task" in meta
    assert "test_objective" not in meta  # the figure is never stored under the honest name

    r = res["json"]
    assert r.returncode == 0, r
    report = json.loads(r.stdout)
    assert report["in_sample_eval"] is True
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["chosen (test, in-sample)"]["in_sample"] is True
    assert rows["start (test, in-sample)"]["in_sample"] is False  # not fitted: a baseline
    assert rows["chosen (test)"]["in_sample"] is True  # the fit split's own row

    r = res["honest"]
    assert r.returncode == 0, r
    report = json.loads(r.stdout)
    assert report["in_sample_eval"] is False
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["chosen (valid)"]["in_sample"] is True
    assert rows["chosen (test)"]["in_sample"] is False
    meta = json.loads((d / "out.json").read_text())["meta"]
    assert "test_objective" in meta and "in_sample_eval" not in meta
