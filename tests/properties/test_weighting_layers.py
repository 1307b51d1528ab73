"""GradNorm's ``W`` over every registered model (issue 12.1): the tensor ``layer: last`` takes
the gradient norms on is the last shared layer's weight matrix, declared by the model
(``MultiTaskModel.last_shared_layer``), and every loss task's loss reaches it.

The old heuristic (the last shared parameter with 2+ dimensions) picked a 3-D expert bias, a
gate, or (ESMM, AITM) a layer the CTR loss never reaches, whose gradient norm is 0.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from torch import nn

from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.registry import MODELS
from mtlrec.testing import tiny_dataset, tiny_funnel_dataset
from mtlrec.weighting import build_weighting

# two-layer experts and bottoms everywhere, so that a stacked bank's last layer has a 3-D bias
SMALL: dict[str, dict[str, Any]] = {
    "mmoe": {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "omoe": {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "shared_bottom": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "single_task": {"bottom_hidden": (8,), "tower_hidden": (4,)},
    "cgc": {"experts_per_task": 2, "shared_experts": 1, "expert_hidden": (8, 6)},
    "ple": {"num_levels": 3, "experts_per_task": 2, "shared_experts": 1, "expert_hidden": (8, 6)},
    "ml_mmoe": {"num_levels": 2, "num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "soft_sharing": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "asymmetric_sharing": {"bottom_hidden": (8, 6), "tower_hidden": (8,)},
    "customized_sharing": {"shared_hidden": (8, 6), "specific_hidden": (6,), "tower_hidden": (4,)},
    "cross_stitch": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "sluice": {"bottom_hidden": (8, 8), "tower_hidden": (8,)},
    "esmm": {"tower_hidden": (6, 4)},
    "aitm": {"tower_hidden": (8, 6), "head_hidden": (4,)},
    "stem": {"expert_hidden": (8, 6), "tower_hidden": (4,)},
    "mose": {"bottom_hidden": 6, "num_experts": 3, "expert_hidden": 5, "tower_hidden": (4,)},
    # routes open with probability 0.99 at first: a sampled closed route would void the check
    "snr_trans": {"subnetworks": (3, 2), "subnetwork_hidden": (8, 6), "init_open": 0.99},
    "snr_aver": {"subnetworks": (3, 2), "subnetwork_hidden": (8, 6), "init_open": 0.99},
    "esm2": {"ctavr_task": None, "tower_hidden": (6, 4)},  # the tiny funnel has no action
    "dbmtl": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
}
FUNNEL = {"esmm", "esm2"}


@cache
def data(name: str) -> tuple[Preprocessor, ColumnarDataset]:
    return tiny_funnel_dataset(n=96, seed=0) if name in FUNNEL else tiny_dataset(n=96, seed=0)


def build(name: str, **over: Any) -> MultiTaskModel:
    pre, _ = data(name)
    torch.manual_seed(1)  # seed 0 gives ml_mmoe a dead watch tower (no gradient upstream)
    return build_model(name, pre.schema, pre.table_sizes(), {**SMALL.get(name, {}), **over})


def check_every_task_reaches(model: MultiTaskModel, name: str, w: nn.Parameter) -> None:
    pre, ds = data(name)
    batch = ds.take(slice(0, len(ds)))
    for spec in pre.schema.tasks:
        if spec.name not in model.loss_task_names:
            continue
        assert bool(batch.masks[spec.name].any()), f"{spec.name} has no row: the test is void"
        loss = MultiTaskLoss([spec])(model(batch.features), batch)[spec.name]
        tables = model.embedding_parameters()
        upstream = torch.autograd.grad(loss, tables, retain_graph=True, allow_unused=True)
        assert any(u is not None and bool(u.any()) for u in upstream), (
            f"{name}: {spec.name}'s loss reaches no table (a dead tower): the test is void"
        )
        (g,) = torch.autograd.grad(loss, [w], allow_unused=True)
        assert g is not None and float(g.abs().sum()) > 0, (
            f"{name}: the loss of {spec.name} does not reach GradNorm's W"
        )


def check_weight_matrix(model: MultiTaskModel, name: str, w: nn.Parameter) -> None:
    pname = {id(p): n for n, p in model.named_parameters()}[id(w)]
    assert id(w) in {id(p) for p in model.shared_parameters()}, f"{name}: {pname} not shared"
    assert id(w) not in {id(p) for p in model.embedding_parameters()}, f"{name}: a table"
    assert w.dim() >= 2, f"{name}: {pname} {tuple(w.shape)} is not a matrix"
    assert "bias" not in pname and "gate" not in pname, f"{name}: {pname} is a bias or a gate"
    if w.dim() == 3:  # a stacked bank [E, in, out]; a stacked bias is [E, 1, out]
        assert w.shape[1] > 1, f"{name}: {pname} {tuple(w.shape)} is a stacked bias"


@pytest.mark.parametrize("name", MODELS.names())
def test_gradnorm_last_layer_is_a_shared_weight_matrix_every_task_reaches(name: str) -> None:
    model = build(name)
    gn = build_weighting("gradnorm", model.loss_task_names)
    dense_shared = [
        p
        for p in model.shared_parameters()
        if id(p) not in {id(e) for e in model.embedding_parameters()}
    ]
    if not dense_shared:  # nothing shared but tables (single_task): refused, with a reason
        assert model.last_shared_layer() is None
        with pytest.raises(ConfigError, match="no shared layer"):
            gn.grad_parameters(model)
        return
    chosen = gn.grad_parameters(model)
    assert len(chosen) == 1
    check_weight_matrix(model, name, chosen[0])
    check_every_task_reaches(model, name, chosen[0])
    assert chosen[0] is model.last_shared_layer()  # the model's declaration, nothing else


@pytest.mark.parametrize(
    ("name", "over"),
    [
        ("ple", {"num_levels": 1}),
        ("ple", {"num_levels": 2, "expert_hidden": (8,)}),
        ("mmoe", {"expert_hidden": (8,)}),  # one layer: the fused [in, E * out] weight
        ("esmm", {"base": "shared_bottom", "bottom_hidden": (8, 6)}),
        ("customized_sharing", {"shared_hidden": (6,), "specific_hidden": (6,)}),  # fused
        ("stem", {"expert_hidden": (8,)}),
    ],
)
def test_last_shared_layer_in_other_configurations(name: str, over: dict[str, Any]) -> None:
    model = build(name, **over)
    w = model.last_shared_layer()
    assert w is not None
    check_weight_matrix(model, name, w)
    check_every_task_reaches(model, name, w)
