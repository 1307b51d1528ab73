"""ESMM refuses a mask on its CTR and CTCVR tasks (issue 12.9): the entire-space loss
(Ma et al., SIGIR 2018, Eq. 3) needs every impression."""

from __future__ import annotations

import pytest

from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.schema import Schema, TaskSpec
from mtlrec.testing import tiny_funnel_dataset


def _schema_with_mask(base: Schema, task: str, mask: str) -> Schema:
    tasks = [
        TaskSpec(**{**t.model_dump(), "mask": mask}) if t.name == task else t for t in base.tasks
    ]
    return Schema(features=base.features, tasks=tasks, group_column=base.group_column)


@pytest.mark.parametrize("task", ["ctr", "ctcvr"])
def test_esmm_refuses_a_mask_on_ctr_and_ctcvr(task: str) -> None:
    pre, _ = tiny_funnel_dataset(n=32)
    schema = _schema_with_mask(pre.schema, task, "click")
    with pytest.raises(ConfigError) as e:
        build_model("esmm", schema, pre.table_sizes(), {"tower_hidden": [4]})
    msg = str(e.value)
    assert f"task {task!r} has mask 'click'" in msg
    assert "entire space" in msg and "selection bias" in msg


def test_esmm_keeps_the_click_mask_of_cvr_and_renamed_roles() -> None:
    pre, _ = tiny_funnel_dataset(n=32)
    build_model("esmm", pre.schema, pre.table_sizes(), {"tower_hidden": [4]})  # cvr masked: ok
    # the check follows the configured role names, not the default ones
    renamed = Schema(
        features=pre.schema.features,
        tasks=[
            TaskSpec(name="click", kind="binary", mask="seen"),
            TaskSpec(name="buy_given_click", kind="binary", label="buy", mask="click"),
            TaskSpec(name="buy", kind="binary"),
        ],
    )
    roles = {"ctr_task": "click", "cvr_task": "buy_given_click", "ctcvr_task": "buy"}
    with pytest.raises(ConfigError, match="task 'click' has mask 'seen'"):
        build_model("esmm", renamed, pre.table_sizes(), {"tower_hidden": [4], **roles})
