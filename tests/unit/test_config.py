"""Tests of mtlrec.config: strict validation, overrides, YAML round trip, the monitored key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlrec.config import ExperimentConfig, TrainingConfig, apply_overrides
from mtlrec.errors import ConfigError
from mtlrec.registry import MODELS, WEIGHTINGS
from mtlrec.schema import Schema, TaskSpec
from mtlrec.testing import tiny_schema

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "census"


def _base() -> dict[str, Any]:
    return {
        "data": {"train": "rows.csv", "split": {"fractions": [0.6, 0.2, 0.2], "seed": 3}},
        "schema": tiny_schema().model_dump(mode="json"),
        "model": {"name": "mmoe", "params": {"num_experts": 3, "expert_hidden": [8]}},
        "balancing": {"name": "static", "weights": {"click": 2.0}},
        "training": {
            "epochs": 2,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
            "early_stopping": {"patience": 2},
            "progress": False,
        },
        "output_dir": "runs/x",
    }


def _with(path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(_base())
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return d


def _err(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict(data)
    return str(e.value)


def test_base_config_is_valid() -> None:
    cfg = ExperimentConfig.from_dict(_base())
    assert cfg.training.optimizer.name == "adamw"
    assert cfg.training.optimizer.lr == 0.01
    assert cfg.balancing.params() == {"weights": {"click": 2.0}}
    assert cfg.schema_ == tiny_schema()
    assert cfg.data.split is not None and cfg.data.split.seed == 3


# -- unknown keys ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "bogus",
        "training.bogus",
        "training.optimizer.bogus",
        "training.early_stopping.bogus",
        "data.bogus",
        "data.split.bogus",
        "model.bogus",
    ],
)
def test_unknown_key_is_rejected_with_its_path(path: str) -> None:
    msg = _err(_with(path, 1))
    assert path in msg
    assert "unknown key" in msg


def test_unknown_key_in_the_schema_is_rejected() -> None:
    d = _base()
    d["schema"]["tasks"][0]["bogus"] = 1
    msg = _err(d)
    assert "bogus" in msg
    assert "unknown key" in msg


def test_error_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^my\.yaml: training\.bogus: unknown key"):
        ExperimentConfig.from_dict(_with("training.bogus", 1), source="my.yaml")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        ExperimentConfig.from_dict(["data"])  # type: ignore[arg-type]


# -- types and ranges --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("training.epochs", "many"),
        ("training.epochs", 0),
        ("training.batch_size", [1]),
        ("training.optimizer.lr", "fast"),
        ("training.optimizer.lr", -1.0),
        ("training.optimizer.name", "lamb"),
        ("training.optimizer.momentum", 1.0),
        ("training.grad_clip", 0.0),
        ("training.early_stopping.patience", 0),
        ("data.train", 5),
        ("model.params", "x"),
        ("output_dir", {"a": 1}),
    ],
)
def test_wrong_types_and_values_are_rejected(path: str, value: Any) -> None:
    msg = _err(_with(path, value))
    assert path in msg


def test_model_name_is_required() -> None:
    d = _base()
    del d["model"]["name"]
    assert "model.name" in _err(d)


def test_data_needs_exactly_one_source() -> None:
    both = _with("data.dataset", "census-income")
    assert "give either data.dataset or data.train" in _err(both)
    neither = _base()
    del neither["data"]["train"]
    assert "give either data.dataset or data.train" in _err(neither)
    ok = {"data": {"dataset": "census-income"}, "model": {"name": "mmoe"}}
    assert ExperimentConfig.from_dict(ok).data.dataset == "census-income"


@pytest.mark.parametrize("fractions", [[0.5, 0.2, 0.2], [0.7, 0.2, 0.2], [1.2, -0.1, -0.1]])
def test_split_fractions_must_sum_to_one(fractions: list[float]) -> None:
    msg = _err(_with("data.split.fractions", fractions))
    assert "data.split" in msg
    assert "sum to 1" in msg


def test_split_fractions_need_three_values() -> None:
    assert "data.split.fractions" in _err(_with("data.split.fractions", [0.5, 0.5]))


def test_sparse_embeddings_exclusions() -> None:
    msg = _err(
        _with("training.optimizer", {"sparse_embeddings": True, "embedding_weight_decay": 1})
    )
    assert "embedding_weight_decay" in msg
    msg = _err(
        _with("training.optimizer", {"name": "sgd", "sparse_embeddings": True, "momentum": 0.9})
    )
    assert "momentum" in msg


@pytest.mark.parametrize("version", [0, 2, 99])
def test_other_versions_are_refused(version: int) -> None:
    msg = _err(_with("version", version))
    assert f"config version {version} is not supported" in msg
    assert "version 1" in msg


def test_version_one_is_accepted() -> None:
    assert ExperimentConfig.from_dict(_with("version", 1)).version == 1


# -- YAML files and overrides -------------------------------------------------------------------
def _write(tmp_path: Path, data: dict[str, Any], name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_load_applies_typed_overrides(tmp_path: Path) -> None:
    d = _base()
    del d["training"]["early_stopping"]
    p = _write(tmp_path, d)
    cfg = ExperimentConfig.load(
        p,
        [
            "training.epochs=7",
            "training.optimizer.lr=0.05",
            "training.progress=true",
            "model.params.expert_hidden=[16, 4]",
            "training.early_stopping.patience=5",  # section created
            "training.grad_clip=1e-3",
            "balancing.weights.watch=0.5",
        ],
    )
    assert cfg.training.epochs == 7 and isinstance(cfg.training.epochs, int)
    assert cfg.training.optimizer.lr == 0.05
    assert cfg.training.progress is True
    assert cfg.model.params["expert_hidden"] == [16, 4]
    assert cfg.training.early_stopping is not None
    assert cfg.training.early_stopping.patience == 5
    assert cfg.training.grad_clip == pytest.approx(1e-3)
    assert cfg.balancing.params()["weights"] == {"click": 2.0, "watch": 0.5}
    # untouched values stay
    assert cfg.training.optimizer.name == "adamw"
    assert cfg.training.batch_size == 64
    # the relative data path resolves against the file's folder
    assert cfg.base_dir == str(tmp_path.resolve())
    assert Path(cfg.resolve_path(cfg.data.train or "")) == tmp_path.resolve() / "rows.csv"


def test_apply_overrides_parses_yaml_scalars_and_lists() -> None:
    out = apply_overrides(
        {"a": {"b": 1}},
        ["a.b=2", "a.c=2.5", "a.d=[1, 2]", "a.e=false", "a.f=hello", "x.y.z=null", "a.g='3'"],
    )
    assert out == {
        "a": {"b": 2, "c": 2.5, "d": [1, 2], "e": False, "f": "hello", "g": "3"},
        "x": {"y": {"z": None}},
    }
    assert isinstance(out["a"]["b"], int) and isinstance(out["a"]["c"], float)


def test_apply_overrides_does_not_modify_its_input() -> None:
    data = {"a": {"b": 1}}
    apply_overrides(data, ["a.b=2", "c.d=1"])
    assert data == {"a": {"b": 1}}


def test_override_value_may_contain_equals_signs() -> None:
    assert apply_overrides({}, ["a=x=y"]) == {"a": "x=y"}


@pytest.mark.parametrize("item", ["training.epochs", "=3", ""])
def test_malformed_override_is_rejected(item: str) -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({"training": {}}, [item])


def test_override_through_a_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'epochs' is not a section"):
        apply_overrides({"training": {"epochs": 3}}, ["training.epochs.x=1"])


def test_override_creating_an_unknown_key_is_rejected_on_validation(tmp_path: Path) -> None:
    p = _write(tmp_path, _base())
    with pytest.raises(ConfigError, match=r"training\.optimizer\.lrr: unknown key"):
        ExperimentConfig.load(p, ["training.optimizer.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"training\.epochs"):
        ExperimentConfig.load(p, ["training.epochs=[1,"])


def test_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ExperimentConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExperimentConfig.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="data"):
        ExperimentConfig.load(empty)


def test_to_yaml_round_trip(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(_base())
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = ExperimentConfig.load(p)
    assert again.model_dump() == cfg.model_dump()
    assert again.to_yaml() == cfg.to_yaml()
    # resolved: defaults are written out, base_dir is not
    text = yaml.safe_load(cfg.to_yaml())
    assert text["training"]["eval_batch_size"] == TrainingConfig().eval_batch_size
    assert text["version"] == 1
    assert "schema" in text and "schema_" not in text
    assert "base_dir" not in text


def test_to_yaml_round_trip_of_a_minimal_config(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({"data": {"dataset": "census-income"}, "model": {"name": "x"}})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert ExperimentConfig.load(p).model_dump() == cfg.model_dump()


# -- monitor key -------------------------------------------------------------------------------
def _monitor(value: str | None, schema: Schema | None = None) -> tuple[str, str]:
    cfg = ExperimentConfig.from_dict(_with("training.monitor", value))
    return cfg.monitor_key(schema or tiny_schema())


def test_monitor_default_is_the_first_tasks_auc() -> None:
    assert _monitor(None) == ("click", "auc")


def test_monitor_default_for_regression_and_multiclass() -> None:
    base = tiny_schema()
    reg = base.model_copy(update={"tasks": (base.tasks[1], base.tasks[0])})
    assert _monitor(None, reg) == ("watch", "mse")
    mc = base.model_copy(
        update={"tasks": (TaskSpec(name="cat", kind="multiclass", num_classes=3),)}
    )
    assert _monitor(None, mc) == ("cat", "accuracy")


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("click/logloss", ("click", "logloss")),
        ("watch/mse", ("watch", "mse")),
        ("mean/auc", ("mean", "auc")),
    ],
)
def test_monitor_explicit(value: str, key: tuple[str, str]) -> None:
    assert _monitor(value) == key


@pytest.mark.parametrize("value", ["nope/auc", "click", "click/", "/auc", "Click/auc"])
def test_monitor_bad_values_are_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match=r"training\.monitor") as e:
        _monitor(value)
    assert "click" in str(e.value) and "mean/metric" in str(e.value)


# -- example configs ---------------------------------------------------------------------------
_EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml")) if EXAMPLES.is_dir() else []


def _example_schema(cfg: ExperimentConfig) -> Schema:
    if cfg.schema_ is not None:
        schema = cfg.schema_
    else:
        from mtlrec.data.census import census_schema

        assert cfg.data.dataset == "census-income", cfg.data.dataset
        opts = cfg.data.options
        schema = census_schema(
            int(opts.get("task_group", 1)), embedding_dim=int(opts.get("embedding_dim", 8))
        )
    tasks = getattr(cfg, "tasks", None)
    return schema.select_tasks(tasks) if tasks else schema


@pytest.mark.skipif(not _EXAMPLE_FILES, reason="examples/census holds no YAML file yet")
@pytest.mark.parametrize("path", _EXAMPLE_FILES, ids=lambda p: p.name)
def test_census_example_configs_load_and_validate(path: Path) -> None:
    from mtlrec.models import build_model

    cfg = ExperimentConfig.load(path)
    MODELS.parse_params(cfg.model.name, cfg.model.params)
    WEIGHTINGS.parse_params(cfg.balancing.name, cfg.balancing.params())
    schema = _example_schema(cfg)
    task, metric = cfg.monitor_key(schema)
    assert task in (*schema.task_names, "mean") and metric
    # the model builds with these parameters (table sizes do not matter here)
    model = build_model(cfg.model.name, schema, {t: 10 for t in schema.tables()}, cfg.model.params)
    assert model.task_names == schema.task_names
    # and the file is already in resolved form
    assert ExperimentConfig.from_dict(yaml.safe_load(cfg.to_yaml())).model_dump() == (
        cfg.model_dump()
    )


# -- errors that say what to do (issue 13) -----------------------------------------------------
@pytest.mark.parametrize(
    ("path", "closest"),
    [
        ("trainig", "training"),
        ("training.epochz", "epochs"),
        ("training.optimizer.lrr", "lr"),
        ("training.early_stopping.patince", "patience"),
        ("data.splitt", "split"),
        ("data.split.fractons", "fractions"),
        ("model.parms", "params"),
    ],
)
def test_unknown_key_suggests_the_closest_valid_one(path: str, closest: str) -> None:
    msg = _err(_with(path, 1))
    assert f"{path}: unknown key (did you mean {closest!r}?)" in msg, msg


def test_unknown_key_of_a_feature_or_task_suggests_the_closest_field() -> None:
    d = _base()
    d["schema"]["features"][0]["embeding_dim"] = 4
    msg = _err(d)
    assert "embeding_dim: unknown key (did you mean 'embedding_dim'?)" in msg, msg
    d = _base()
    d["schema"]["tasks"][0]["lable"] = "y"
    msg = _err(d)
    assert "schema.tasks.0.lable: unknown key (did you mean 'label'?)" in msg, msg


def test_unknown_key_without_a_close_one_lists_the_valid_keys() -> None:
    msg = _err(_with("training.early_stopping.zzz", 1))
    assert "valid keys here: patience, min_delta" in msg, msg


def test_set_of_a_mistyped_key_suggests_the_closest(tmp_path: Path) -> None:
    p = _write(tmp_path, _base())
    with pytest.raises(ConfigError, match=r"training\.epochz: unknown key \(did you mean 'epochs'"):
        ExperimentConfig.load(p, ["training.epochz=3"])


@pytest.mark.parametrize(
    ("registry", "typo", "closest"),
    [(MODELS, "mmoee", "mmoe"), (MODELS, "MMoE", "mmoe"), (WEIGHTINGS, "gradnrom", "gradnorm")],
)
def test_mistyped_registry_name_suggests_the_closest(
    registry: Any, typo: str, closest: str
) -> None:
    with pytest.raises(ConfigError, match=rf"did you mean '{closest}'\?\); choose from: "):
        registry.get(typo)


def test_mistyped_fusion_name_suggests_the_closest() -> None:
    from mtlrec.registry import FUSIONS

    with pytest.raises(ConfigError, match=r"did you mean 'weighted_sum'\?"):
        FUSIONS.get("weighted_summ")


def test_unknown_model_parameter_suggests_the_closest_and_lists_them() -> None:
    with pytest.raises(ConfigError) as e:
        MODELS.parse_params("mmoe", {"num_expert": 3})
    msg = str(e.value)
    assert "model 'mmoe' has no parameter num_expert (did you mean 'num_experts'?)" in msg
    assert "it takes: " in msg and "expert_hidden" in msg and "mtlrec list mmoe" in msg


def test_registry_describes_parameters_with_types_defaults_and_help() -> None:
    rows = {p.name: p for p in MODELS.describe("mmoe")}
    assert rows["num_experts"].type.startswith("int") and rows["num_experts"].default == "8"
    assert rows["tower_hidden"].type == "list[int]"
    assert rows["tower_hidden"].default == "[64]"
    assert rows["tower_hidden"].help == "hidden widths of towers"
    assert rows["dropout"].type == "float (>= 0.0, < 1.0)"
    assert rows["activation"].default == '"relu"'
    assert rows["expert_hidden"].type == "list[int] (len >= 1)"


# -- switching model from the command line (issue 13) ------------------------------------------
def test_switching_model_keeps_shared_parameters_and_warns_about_the_rest(
    tmp_path: Path,
) -> None:
    from mtlrec.config import ConfigWarning

    d = _with("model.params.tower_hidden", [4])  # num_experts, expert_hidden, tower_hidden
    p = _write(tmp_path, d)
    with pytest.warns(ConfigWarning, match=r"model 'ple' has no parameter num_experts") as w:
        cfg = ExperimentConfig.load(p, ["model.name=ple"])
    assert cfg.model.name == "ple"
    assert cfg.model.params == {"expert_hidden": [8], "tower_hidden": [4]}
    assert "kept: expert_hidden, tower_hidden" in str(w[0].message)
    MODELS.parse_params("ple", cfg.model.params)  # builds
    # the same from Python
    with pytest.warns(ConfigWarning, match="num_experts"):
        same = ExperimentConfig.from_dict(d).with_model("ple")
    assert same.model == cfg.model


def test_switching_model_strictly_fails_listing_the_new_models_parameters(
    tmp_path: Path,
) -> None:
    p = _write(tmp_path, _base())
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.load(p, ["model.name=ple"], strict=True)
    msg = str(e.value)
    assert "model 'ple' has no parameter num_experts" in msg and "written for 'mmoe'" in msg
    for name in MODELS.param_names("ple"):
        assert name in msg
    with pytest.raises(ConfigError, match="num_experts"):
        ExperimentConfig.from_dict(_base()).with_model("ple", strict=True)


def test_switching_model_keeps_parameters_given_for_the_new_model(tmp_path: Path) -> None:
    import warnings

    p = _write(tmp_path, _base())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped: no warning
        cfg = ExperimentConfig.load(p, ["model.name=mmoe", "model.params.num_experts=5"])
    assert cfg.model.params == {"num_experts": 5, "expert_hidden": [8]}
    with pytest.warns(Warning, match="num_experts"):
        cfg = ExperimentConfig.load(p, ["model.name=ple", "model.params.experts_per_task=2"])
    assert cfg.model.params == {"expert_hidden": [8], "experts_per_task": 2}
    # a whole new params section is the new model's: nothing to switch, strict validation
    cfg = ExperimentConfig.load(p, ["model.name=ple", "model.params={num_levels: 1}"])
    assert cfg.model.params == {"num_levels": 1}


def test_switching_to_an_unknown_model_suggests_the_closest(tmp_path: Path) -> None:
    p = _write(tmp_path, _base())
    with pytest.raises(ConfigError, match=r"unknown model 'plee' \(did you mean 'ple'\?\)"):
        ExperimentConfig.load(p, ["model.name=plee"])


# -- where relative data paths start -----------------------------------------------------------
def test_a_config_may_name_its_base_dir_relative_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    p = _write(tmp_path / "sub", {**_base(), "base_dir": ".."})
    cfg = ExperimentConfig.load(p)
    assert Path(cfg.resolve_path("rows.csv")).resolve() == (tmp_path / "rows.csv").resolve()


def test_yaml_with_base_dir_reads_the_same_data_from_anywhere(tmp_path: Path) -> None:
    cfg = ExperimentConfig.load(_write(tmp_path, _base()))
    text = cfg.to_yaml(with_base_dir=True)
    assert yaml.safe_load(text)["base_dir"] == str(tmp_path.resolve())
    elsewhere = tmp_path / "moved" / "run"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.yaml").write_text(text)
    again = ExperimentConfig.load(elsewhere / "config.yaml")
    assert again.resolve_path("rows.csv") == cfg.resolve_path("rows.csv")
    assert again.model_dump() == cfg.model_dump()
