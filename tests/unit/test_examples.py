"""The example configs load, build their model with its parameters and train a step on
fixture data (census examples on a few hundred rows of the bundled file, the others on rows
made to match their schema), and the census ones are the demo's settings."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtlrec.config import ExperimentConfig
from mtlrec.demo import DEMO_MODELS, demo_config
from mtlrec.models.build import build_model
from mtlrec.registry import MODELS
from mtlrec.schema import DenseFeature, Schema, SequenceFeature
from mtlrec.train.run import load_run, train_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL = sorted(EXAMPLES.rglob("*.yaml"))
ROWS = 400  # one step: the batch holds the whole training split


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_example_config_validates(path: Path) -> None:
    cfg = ExperimentConfig.load(path)
    assert cfg.model.name in MODELS.names()
    MODELS.parse_params(cfg.model.name, cfg.model.params)  # the params are the model's


@pytest.fixture(scope="module")
def census_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first rows of the bundled census-income file, as a file of the same format."""
    from importlib import resources

    from mtlrec.data.census import FILE

    src = resources.files("mtlrec.datasets").joinpath(FILE)
    with gzip.open(str(src), "rt") as f:
        lines = [next(f) for _ in range(ROWS)]
    out = tmp_path_factory.mktemp("census") / "census-rows.csv"
    out.write_text("".join(lines))
    return out


def fixture_table(schema: Schema, n: int, seed: int = 0) -> pa.Table:
    """``n`` random rows with every column ``schema`` reads: a few categories per sparse
    feature, positive dense values, sequences of 0 to ``max_len`` items, both classes of
    every binary label, each label zero outside its task's mask."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {}
    for f in schema.features:
        if isinstance(f, DenseFeature):
            cols[f.source] = pa.array(rng.lognormal(0.0, 1.0, n))
        elif isinstance(f, SequenceFeature):
            table = f.table or f.name
            seqs = [
                f.separator.join(f"{table}{k}" for k in rng.integers(0, 12, rng.integers(0, 6)))
                for _ in range(n)
            ]
            cols[f.source] = pa.array(seqs)
        else:  # many groups when the column is the group id (split by group)
            many = 100 if f.source == schema.group_column else 12
            cols[f.source] = pa.array([f"{f.table or f.name}{k}" for k in rng.integers(0, many, n)])
    masks = {t.mask for t in schema.tasks if t.mask is not None}
    for m in masks:
        cols[m] = pa.array(rng.integers(0, 2, n))
    for t in schema.tasks:
        col = t.label_column
        if col in cols:
            continue
        if t.kind == "binary":
            y = rng.integers(0, 2, n)
            for other in schema.tasks:  # a label (e.g. conversion) only where its mask holds
                if other.label_column == col and other.mask is not None:
                    y = y * cols[other.mask].to_numpy()
            cols[col] = pa.array(y)
        elif t.kind == "multiclass":
            cols[col] = pa.array(rng.integers(0, t.num_classes or 2, n))
        else:
            cols[col] = pa.array(rng.normal(3.0, 1.0, n))
    if schema.group_column is not None and schema.group_column not in cols:
        cols[schema.group_column] = pa.array([f"g{k}" for k in rng.integers(0, 100, n)])
    return pa.table(cols)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_example_builds_its_model_and_trains_a_step(
    path: Path, tmp_path: Path, census_rows: Path
) -> None:
    example = ExperimentConfig.load(path)
    sets = [
        "training.epochs=1",
        f"training.batch_size={ROWS}",
        "training.progress=false",
        "training.num_threads=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    if example.data.dataset == "census-income":
        sets.append(f"data.options.path={census_rows}")
    else:
        assert example.data.dataset is None and example.schema_ is not None, path
        data = tmp_path / "rows.parquet"
        pq.write_table(fixture_table(example.schema_, ROWS), data)
        sets.append(f"data.train={data}")
    cfg = ExperimentConfig.load(path, sets)
    assert cfg.model == example.model and cfg.schema_ == example.schema_
    res = train_run(cfg)

    # the model of the example's name, with the example's parameters
    saved = json.loads((res.path / "model.json").read_text())
    params = MODELS.parse_params(example.model.name, example.model.params)
    assert saved["name"] == example.model.name
    assert saved["params"] == params.model_dump(mode="json")
    # one step, finite losses, and the weights moved from their initial values
    log = [json.loads(line) for line in (res.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]
    assert all(math.isfinite(v) for v in log[0]["train_loss"].values()), log[0]
    trained = load_run(res.path, checkpoint="last")
    torch.manual_seed(cfg.training.seed)
    initial = build_model(
        example.model.name, trained.schema, trained.preprocessor.table_sizes(), params
    )
    before, after = initial.state_dict(), trained.model.state_dict()
    assert before.keys() == after.keys()
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    assert moved, "one training step changed no weight"
    assert res.test_metrics is not None
    assert set(res.test_metrics) == {t.name for t in trained.schema.tasks}


CENSUS = [(m, None) for m in sorted(DEMO_MODELS) if m != "single_task"] + [
    ("single_task", ("income",)),
    ("single_task", ("never_married",)),
]


@pytest.mark.parametrize(("model", "tasks"), CENSUS)
def test_census_example_equals_demo(model: str, tasks: tuple[str, ...] | None) -> None:
    name = model + ("_" + "_".join(tasks) if tasks else "")
    cfg = ExperimentConfig.load(EXAMPLES / "census" / f"{name}.yaml")
    demo = demo_config(model, tasks=tasks)
    keep = {"data", "model", "training", "tasks", "output_dir"}
    assert cfg.model_dump(include=keep) == demo.model_dump(include=keep)


def test_census_params_file_of_the_seesaw_benchmark_matches_the_examples() -> None:
    """benchmarks/census_arch_params.yaml (for `mtlrec compare --model-params`) holds every
    census example's model.params, so the recorded seesaw table is the examples' models."""
    import yaml

    params = yaml.safe_load(
        (EXAMPLES.parent / "benchmarks" / "census_arch_params.yaml").read_text()
    )
    seen = set()
    for path in sorted((EXAMPLES / "census").glob("*.yaml")):
        cfg = ExperimentConfig.load(path)
        seen.add(cfg.model.name)
        assert params[cfg.model.name] == cfg.model.params, path.name
    assert set(params) == seen
