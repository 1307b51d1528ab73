"""The example configs load, and the census ones are the demo's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlrec.config import ExperimentConfig
from mtlrec.demo import DEMO_MODELS, demo_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path: Path) -> None:
    cfg = ExperimentConfig.load(path)
    assert cfg.model.name


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
