"""``mtlrec tune``: the space and its shortcuts, the Pareto front on hand-made points, pruning,
and a tiny search that writes its storage, resumes after being stopped, and writes the table,
the plot and the best configs per latency budget."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from _serving_runs import FEATURES, TASKS

from mtlrec.config import ConfigWarning, ExperimentConfig
from mtlrec.errors import ConfigError
from mtlrec.testing import tiny_table
from mtlrec.train.callbacks import Callback

optuna = pytest.importorskip("optuna")

from mtlrec.analysis.tuning import (  # noqa: E402
    DEFAULT_SPACE,
    PruningCallback,
    TuneSettings,
    apply_values,
    default_space,
    latency_ms,
    pareto_front,
    parse_space,
    run_tune,
)

SPACE = {"num_experts": [2, 3], "gate_depth": {"low": 0, "high": 1}, "lr": 0.01}


def _config(folder: Path, model: str = "mmoe", **training) -> ExperimentConfig:
    data = folder / "tiny.parquet"
    if not data.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(tiny_table(300), data)
    return ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.6, 0.2, 0.2], "seed": 0}},
            "schema": {"features": FEATURES, "tasks": TASKS},
            "model": {"name": model, "params": {"expert_hidden": [8], "tower_hidden": [4]}},
            "training": {
                "epochs": 1,
                "batch_size": 64,
                "progress": False,
                "num_threads": 1,
                **training,
            },
            "output_dir": str(folder / "run"),
        }
    )


# -- Pareto front -------------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points() -> None:
    pts = [
        (0.90, 1.0),  # 0: fastest
        (0.93, 2.0),  # 1: front
        (0.92, 2.5),  # 2: beaten by 1 (better and faster)
        (0.93, 3.0),  # 3: same quality as 1, slower: dominated
        (0.96, 4.0),  # 4: front (best)
        (0.96, 4.0),  # 5: equal to 4: neither dominates the other
        (0.89, 0.9),  # 6: front (fastest, worst)
        (0.95, 9.0),  # 7: beaten by 4
    ]
    assert pareto_front(pts) == [6, 0, 1, 4, 5]
    # lower is better (a loss): the same points read the other way
    assert pareto_front(
        [(0.2, 1.0), (0.1, 2.0), (0.3, 0.5), (0.25, 1.5)], higher_is_better=False
    ) == [
        2,
        0,
        1,
    ]
    assert pareto_front([]) == []


# -- space --------------------------------------------------------------------------------------
def test_shortcuts_resolve_per_model(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    mmoe = apply_values(cfg, {"num_experts": 4, "gate_depth": 2, "gate_width": 8, "lr": 0.005})
    assert mmoe.model.params["num_experts"] == 4
    assert mmoe.model.params["gate_hidden"] == [8, 8]
    assert mmoe.training.optimizer.lr == 0.005
    ple = apply_values(cfg, {"model.name": "ple", "num_experts": 3, "gate_depth": 0})
    assert ple.model.name == "ple"
    assert ple.model.params["experts_per_task"] == ple.model.params["shared_experts"] == 3
    assert ple.model.params["gate_hidden"] == []
    assert ple.model.params["expert_hidden"] == [8]  # kept: PLE takes it
    widths = apply_values(cfg, {"expert_width": 16, "tower_width": 2, "balancing": "dwa"})
    assert widths.model.params["expert_hidden"] == [16]
    assert widths.model.params["tower_hidden"] == [2]
    assert widths.balancing.name == "dwa"
    dotted = apply_values(cfg, {"training.batch_size": 32, "model.params.dropout": 0.1})
    assert dotted.training.batch_size == 32 and dotted.model.params["dropout"] == 0.1
    with pytest.warns(ConfigWarning, match="expert_hidden"):
        sb = cfg.with_model("shared_bottom")
    with pytest.raises(ConfigError, match="num_experts: model 'shared_bottom'"):
        apply_values(sb, {"num_experts": 4})
    assert "num_experts" not in default_space("shared_bottom")
    assert default_space("mmoe") == DEFAULT_SPACE


def test_space_parsing_and_grid() -> None:
    dims = {d.name: d for d in parse_space(SPACE)}
    assert dims["num_experts"].grid() == [2, 3]
    assert dims["gate_depth"].grid() == [0, 1]
    assert dims["lr"].grid() is None and dims["lr"].fixed == 0.01
    with pytest.raises(ConfigError, match="float range"):
        parse_space({"lr": {"low": 0.001, "high": 0.01}})[0].grid()
    with pytest.raises(ConfigError, match="fixed for a search"):
        parse_space({"data.train": ["a.csv"]})
    with pytest.raises(ConfigError, match="neither a dotted config key"):
        parse_space({"experts": [2]})
    with pytest.raises(ConfigError, match="a range is"):
        parse_space({"gate_depth": {"low": 3, "high": 1}})


# -- pruning ------------------------------------------------------------------------------------
def test_a_trial_reporting_a_bad_value_is_pruned() -> None:
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )
    good = study.ask()
    for epoch in (1, 2, 3):
        PruningCallback(good).on_epoch_end(None, None, {"epoch": epoch, "monitor": {"value": 0.9}})
    study.tell(good, 0.9)
    fine = study.ask()
    PruningCallback(fine).on_epoch_end(None, None, {"epoch": 1, "monitor": {"value": 0.95}})
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        PruningCallback(bad).on_epoch_end(None, None, {"epoch": 1, "monitor": {"value": 0.5}})


def test_latency_is_per_1000_rows_on_one_thread() -> None:
    import torch

    from mtlrec.models import build_model
    from mtlrec.testing import tiny_dataset

    pre, ds = tiny_dataset(n=100)
    small = build_model("mmoe", pre.schema, pre.table_sizes(), {"num_experts": 2})
    big = build_model(
        "mmoe", pre.schema, pre.table_sizes(), {"num_experts": 16, "expert_hidden": [512, 256]}
    )
    rows = ds.features_at(torch.arange(1000) % len(ds))
    threads = torch.get_num_threads()
    a = latency_ms(small, rows, repeats=5)
    b = latency_ms(big, rows, repeats=5)
    assert torch.get_num_threads() == threads  # restored
    assert 0 < a < b


# -- a tiny search ------------------------------------------------------------------------------
class _InterruptNextTrial(Callback):
    """Stops the process (as Ctrl-C would) in the first step of the trial it is given to."""

    def on_step_end(self, trainer, state) -> None:
        raise KeyboardInterrupt


def test_a_tiny_search_writes_storage_resumes_and_reports(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=2, checkpoint_every_steps=1)
    out = tmp_path / "tune"
    settings = TuneSettings(trials=2, space=SPACE, latency_repeats=2, pruner="none")
    res = run_tune(cfg, out, settings)
    assert (out / "study.db").is_file() and (out / "tune.yaml").is_file()
    done = [t for t in res["trials"] if t["state"] == "complete"]
    assert len(done) == 2
    for t in done:
        assert t["latency_ms"] > 0 and t["n_params"] > 0
        assert set(t["params"]) == {"num_experts", "gate_depth"}
        assert 0 <= t["test"]["click"]["auc"] <= 1
        assert (out / t["run_dir"] / "summary.json").is_file()
    # the same target again: nothing more to run
    assert len(run_tune(cfg, out, settings)["trials"]) == 2
    # stopped inside the third trial ...
    more = TuneSettings(trials=3, space=SPACE, latency_repeats=2, pruner="none")
    with pytest.raises(KeyboardInterrupt):
        run_tune(cfg, out, more, callbacks=[_InterruptNextTrial()])
    stored = optuna.load_study(study_name="mtlrec-tune", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in stored.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    # every epoch's validation value went to the pruner
    assert sorted(stored.trials[0].intermediate_values) == [1, 2]
    # the trial's value is its best epoch's (auc: the largest)
    assert max(stored.trials[0].intermediate_values.values()) == stored.trials[0].value
    cut = stored.trials[2]
    # ... then resumed: the stopped trial runs again (from its run folder), the count goes on
    res = run_tune(cfg, out, more)
    states = [(t["number"], t["state"], t["retry_of"]) for t in res["trials"]]
    assert states == [
        (0, "complete", None),
        (1, "complete", None),
        (2, "fail", None),
        (3, "complete", 2),
    ]
    again = res["trials"][3]
    assert again["params"] == cut.params and again["run_dir"] == cut.user_attrs["run_dir"]
    # outputs: Pareto table, best configs per latency budget, report section
    front = res["pareto"]
    assert front and set(front) <= {0, 1, 3}
    assert (out / "pareto.md").read_text().count("\n|") >= 4
    files = sorted(p.name for p in out.glob("best_under_*ms.yaml"))
    assert files and len(files) == len(res["best_under"])
    best = ExperimentConfig.load(out / files[-1])
    number = res["best_under"][files[-1]]
    trial = res["trials"][number]
    assert best.model.params["num_experts"] == trial["params"]["num_experts"]
    assert best.data.train == cfg.data.train
    from mtlrec.analysis.report import build_report

    page = build_report(out)
    assert "<h2>Tuning</h2>" in page and "data:image/png;base64" in page
    # latencies measured again, interleaved, replace the trials' own (no trial runs again)
    again = TuneSettings(trials=3, space=SPACE, latency_repeats=2, pruner="none", remeasure=2)
    res = run_tune(cfg, out, again)
    lat = json.loads((out / "latency.json").read_text())
    assert len(res["trials"]) == 4 and "interleaved" in res["latency"]
    for t in res["trials"]:
        if t["state"] == "complete":
            assert len(lat["rounds"][str(t["number"])]) == 2
            assert t["latency_ms"] == lat["ms"][str(t["number"])]
            assert t["latency_ms_in_trial"] > 0
    # another space in the same folder is refused
    with pytest.raises(ConfigError, match="another space"):
        run_tune(cfg, out, TuneSettings(trials=4, space={"num_experts": [4]}))


def test_budgets_pick_the_best_trial_under_each(tmp_path: Path) -> None:
    from mtlrec.analysis.tuning import write_outputs

    study = optuna.create_study(direction="maximize")
    for value, lat in ((0.90, 1.0), (0.95, 3.0), (0.93, 2.0), (0.99, 10.0)):
        t = study.ask({"num_experts": optuna.distributions.IntDistribution(1, 20)})
        t.set_user_attr("latency_ms", lat)
        t.set_user_attr("n_params", 10)
        t.set_user_attr("config", {"model": {"name": "mmoe", "params": {"num_experts": 2}}})
        study.tell(t, value)
    cfg = _config(tmp_path)
    res = write_outputs(tmp_path / "o", study, cfg, "click/auc", True, budgets=(0.5, 2.5, 5.0))
    assert res["best_under"] == {"best_under_2.5ms.yaml": 2, "best_under_5ms.yaml": 1}
    assert res["pareto"] == [0, 2, 1, 3]
    text = (tmp_path / "o" / "best_under_5ms.yaml").read_text()
    assert "trial (number 1)" in text and yaml.safe_load(text)["model"]["name"] == "mmoe"
    data = json.loads((tmp_path / "o" / "tune.json").read_text())
    assert [t["latency_ms"] for t in data["trials"]] == [1.0, 3.0, 2.0, 10.0]


def test_cli_grid_runs_every_combination_and_prints_the_front(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mtlrec.cli import app

    _config(tmp_path)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(_config(tmp_path).to_yaml(with_base_dir=True))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"num_experts": [2, 3], "gate_depth": 0}}))
    r = CliRunner().invoke(
        app,
        [
            "tune",
            str(cfg_path),
            "--grid",
            "--space",
            str(space),
            "--output",
            str(tmp_path / "grid"),
            "--latency-repeats",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Pareto front" in r.output and "best_under_" in r.output
    res = json.loads((tmp_path / "grid" / "tune.json").read_text())
    assert sorted(t["params"]["num_experts"] for t in res["trials"]) == [2, 3]
    assert all(t["state"] == "complete" for t in res["trials"])
