"""training.freeze: frozen parameters are bit-identical after training, hold no optimiser
state, are announced in one line; a pattern matching nothing is an error."""

from __future__ import annotations

import re

import pytest
import torch

from mtlrec.config import OptimizerConfig, TrainingConfig
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.freeze import freeze_parameters, name_matches
from mtlrec.train.trainer import Trainer

PARAMS = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


@pytest.mark.parametrize(
    ("name", "pattern", "hit"),
    [
        ("embedding.tables.d4.weight", "embedding.*", True),
        ("heads.towers.click.layers.0.weight", "towers.click.*", True),
        ("heads.towers.click.layers.0.weight", "towers.watch.*", False),
        ("levels.1.experts.groups.0.weights.0", "experts.*", True),
        ("task_experts.weight", "experts.*", False),  # a dot must start the suffix
        ("experts.weights.0", "Experts.*", False),  # case-sensitive
    ],
)
def test_pattern_matching(name: str, pattern: str, hit: bool) -> None:
    assert name_matches(name, pattern) is hit


@pytest.mark.parametrize("sparse", [False, True])
def test_frozen_parameters_do_not_move_and_have_no_state(
    sparse: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    pre, ds = tiny_dataset(160)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainingConfig(
        epochs=2,
        batch_size=32,
        progress=False,
        freeze=["embedding.*", "towers.click.*"],
        optimizer=OptimizerConfig(lr=0.05, weight_decay=0.01, sparse_embeddings=sparse),
    )
    trainer = Trainer(model, ds.schema, config=cfg)
    assert "frozen" not in capsys.readouterr().err  # said when training starts
    trainer.fit(ds, ds)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("frozen:")]
    assert len(lines) == 1
    assert "frozen: 5 of" in lines[0] and "embedding.* (1)" in lines[0]
    assert "towers.click.* (4)" in lines[0]
    frozen = set(trainer.frozen.frozen_names)
    assert len(frozen) == 5
    moved = 0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n  # bit for bit
            assert not p.requires_grad
        else:
            moved += not torch.equal(p, before[n])
    assert moved > 0
    # optimiser memory: no state entry, and in no group, for a frozen parameter
    params = dict(model.named_parameters())
    in_groups = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for n in frozen:
        assert params[n] not in trainer.optimizer.state
        assert id(params[n]) not in in_groups
    assert len(trainer.optimizer.state) == len(params) - len(frozen)


def test_a_pattern_matching_nothing_is_an_error() -> None:
    pre, ds = tiny_dataset(40)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS)
    with pytest.raises(ConfigError, match=re.escape("'tower.clik.*' matches no parameter")):
        freeze_parameters(model, ["experts.*", "tower.clik.*"])
    with pytest.raises(ConfigError, match="matches no parameter"):
        Trainer(model, ds.schema, config=TrainingConfig(freeze=["nothing"], progress=False))


def test_no_patterns_freeze_nothing_and_say_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    pre, ds = tiny_dataset(40)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS)
    Trainer(model, ds.schema, config=TrainingConfig(progress=False))
    assert "frozen" not in capsys.readouterr().err
    assert all(p.requires_grad for p in model.parameters())
