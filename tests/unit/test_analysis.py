"""Analysis: MTL gain and seesaw, gate utilisation and flags, label correlation, vectorised
runs, the HTML report."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlrec.analysis.compare import (
    CompareResult,
    check_models,
    mean_sd,
    mtl_gain,
    seesaw,
    write_compare,
)
from mtlrec.analysis.gates import (
    GateEntropyLogger,
    expert_utilisation,
    flag_experts,
    gate_entropy,
)
from mtlrec.analysis.relations import label_correlation
from mtlrec.analysis.vectorized import VectorizedRuns
from mtlrec.batch import Features
from mtlrec.config import TrainingConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.synthetic import mmoe_synthetic_schema
from mtlrec.errors import ConfigError
from mtlrec.models.build import build_model
from mtlrec.schema import DenseFeature, Schema, TaskSpec
from mtlrec.testing import tiny_dataset
from mtlrec.train.trainer import Trainer

# -- MTL gain and seesaw ------------------------------------------------------------------------


def test_mtl_gain_sign_follows_metric_direction() -> None:
    assert mtl_gain(0.75, 0.70, "auc") == pytest.approx(0.05)
    assert mtl_gain(0.65, 0.70, "auc") == pytest.approx(-0.05)
    assert mtl_gain(0.9, 1.0, "mse") == pytest.approx(0.1)  # lower MSE is a gain
    assert mtl_gain(1.1, 1.0, "mse") == pytest.approx(-0.1)
    with pytest.raises(ConfigError):
        mtl_gain(1.0, 1.0, "nonsense")


def test_seesaw_flag() -> None:
    assert seesaw([0.01, -0.02])
    assert not seesaw([0.01, 0.02])
    assert not seesaw([-0.01, -0.02])
    assert not seesaw([0.0, 0.01])
    assert not seesaw([math.nan, 0.01])
    assert not seesaw([])


def test_seesaw_ignores_gains_within_the_noise() -> None:
    # +0.02 clear (se 0.005), -0.0001 within 1.96 se (se 0.001): no seesaw
    assert not seesaw([0.02, -0.0001], [0.005, 0.001])
    assert seesaw([0.02, -0.01], [0.005, 0.001])
    assert seesaw([0.02, -0.0001])  # without standard errors the signs decide


def test_gain_standard_error_is_welch_and_drives_the_flag() -> None:
    res = CompareResult(tasks=("x", "y"), primary={"x": "auc", "y": "auc"})
    res.seeds = [0, 1, 2, 3]
    res.metrics = {
        "single_task": {"x": {"auc": [0.70, 0.71, 0.70, 0.71]}, "y": {"auc": [0.9, 0.9, 0.9, 0.9]}},
        # clearly better on x; on y lower by a hair inside the seed noise
        "m": {"x": {"auc": [0.75, 0.76, 0.75, 0.76]}, "y": {"auc": [0.91, 0.89, 0.90, 0.8999]}},
    }
    se_y = math.sqrt(np.var([0.91, 0.89, 0.90, 0.8999], ddof=1) / 4)
    assert res.gain_se("m", "y") == pytest.approx(se_y)
    assert res.gain("m", "y") < 0 and not res.seesaw("m")
    _, rows = res.table_rows()
    assert rows[1][3].endswith("*") and not rows[1][4].endswith("*")
    res.metrics["m"]["y"]["auc"] = [0.80, 0.81, 0.80, 0.81]  # now a clear loss
    assert res.seesaw("m")


def _constructed() -> CompareResult:
    res = CompareResult(tasks=("ctr", "watch"), primary={"ctr": "auc", "watch": "mse"})
    res.seeds = [0, 1, 2]
    res.metrics = {
        "single_task": {"ctr": {"auc": [0.70, 0.72, 0.71]}, "watch": {"mse": [1.0, 1.2, 1.1]}},
        # better AUC, worse MSE: seesaw
        "a": {"ctr": {"auc": [0.73, 0.74, 0.72]}, "watch": {"mse": [1.3, 1.2, 1.4]}},
        # better on both
        "b": {"ctr": {"auc": [0.72, 0.72, 0.72]}, "watch": {"mse": [0.9, 1.0, 0.8]}},
    }
    return res


def test_compare_result_gains_and_seesaw_on_constructed_numbers() -> None:
    res = _constructed()
    assert res.gain("a", "ctr") == pytest.approx(0.73 - 0.71)
    assert res.gain("a", "watch") == pytest.approx(1.1 - 1.3)
    assert res.gain("b", "watch") == pytest.approx(1.1 - 0.9)
    assert res.seesaw("a") and not res.seesaw("b") and not res.seesaw("single_task")
    mu, sd = mean_sd([0.73, 0.74, 0.72])
    assert mu == pytest.approx(np.mean([0.73, 0.74, 0.72]))
    assert sd == pytest.approx(np.std([0.73, 0.74, 0.72], ddof=1))
    header, rows = res.table_rows()
    assert header[-1] == "seesaw"
    assert rows[1][-1] == "yes" and rows[2][-1] == "no"
    d = res.to_dict()
    assert d["summary"]["a"]["seesaw"] is True
    assert d["summary"]["a"]["watch"]["gain"] == pytest.approx(-0.2)
    back = CompareResult.from_dict(json.loads(json.dumps(d)))
    assert back.gain("a", "ctr") == pytest.approx(res.gain("a", "ctr"))


def test_unknown_model_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="no_such_model is not a registered model"):
        check_models(["mmoe", "no_such_model"])


# -- gates --------------------------------------------------------------------------------------


def test_gate_entropy_limits() -> None:
    g = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert gate_entropy(g).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])


def test_expert_utilisation_rows_sum_to_one_and_match_a_forward_pass() -> None:
    pre, ds = tiny_dataset(n=120)
    torch.manual_seed(0)
    model = build_model(
        "mmoe", ds.schema, pre.table_sizes(), {"num_experts": 3, "expert_hidden": [8]}
    )
    stats = expert_utilisation(model, ds, batch_size=50)  # several batches
    assert set(stats) == set(ds.schema.task_names)
    model.eval()
    with torch.no_grad():
        gates = model(ds.take(slice(0, len(ds))).features).gates
    for name, s in stats.items():
        assert sum(s["utilisation"]) == pytest.approx(1.0)
        assert s["utilisation"] == pytest.approx(gates[name].double().mean(0).tolist(), abs=1e-6)
        assert s["entropy"] == pytest.approx(float(gate_entropy(gates[name]).mean()), abs=1e-6)
        assert 0 <= s["entropy"] <= math.log(3) + 1e-9


def test_dead_and_collapsed_experts_flagged() -> None:
    # threshold 0.1 / 4 = 0.025
    f = flag_experts([0.5, 0.47, 0.02, 0.01])
    assert f["dead"] == [2, 3] and not f["collapsed"]
    f = flag_experts([0.95, 0.03, 0.01, 0.01])
    assert f["collapsed"] and f["top"] == 0 and f["dead"] == [2, 3]
    f = flag_experts([0.25, 0.25, 0.25, 0.25])
    assert f["dead"] == [] and not f["collapsed"]
    assert flag_experts([1.0])["collapsed"] is False  # one expert is no collapse


def test_gate_entropy_logger_writes_every_epoch() -> None:
    pre, ds = tiny_dataset(n=96)
    torch.manual_seed(0)
    model = build_model(
        "mmoe", ds.schema, pre.table_sizes(), {"num_experts": 4, "expert_hidden": [8]}
    )
    cfg = TrainingConfig(epochs=2, batch_size=32, progress=False)
    trainer = Trainer(model, ds.schema, config=cfg, callbacks=[GateEntropyLogger()])
    fit = trainer.fit(ds, ds)
    assert len(fit.history) == 2
    for rec in fit.history:
        assert set(rec["gate_entropy"]) == set(ds.schema.task_names)
        for g, h in rec["gate_entropy"].items():
            assert 0 <= h <= math.log(4) + 1e-9
            assert sum(rec["gate_utilisation"][g]) == pytest.approx(1.0)
    # the hook is removed at the end: evaluation afterwards records nothing
    assert not model._forward_hooks


# -- label correlation --------------------------------------------------------------------------


def test_label_correlation_matches_numpy_on_joint_rows() -> None:
    rng = np.random.default_rng(0)
    n = 400
    a = (rng.random(n) < 0.4).astype(np.float32)
    b = (0.6 * a + rng.normal(0, 0.5, n)).astype(np.float32)
    c = ((a + rng.random(n)) > 1.0).astype(np.float32)
    m = np.ones((n, 3), dtype=bool)
    m[:, 2] = rng.random(n) < 0.5  # task c lives on half the rows
    labels = np.stack([a, b, c], axis=1)
    labels[~m] = np.nan
    schema = Schema(
        features=(DenseFeature(name="x"),),
        tasks=(
            TaskSpec(name="a", kind="binary"),
            TaskSpec(name="b", kind="regression"),
            TaskSpec(name="c", kind="binary"),
        ),
    )
    ds = ColumnarDataset(
        schema,
        torch.zeros(n, 0, dtype=torch.int32),
        torch.zeros(n, 1),
        {},
        labels=torch.from_numpy(np.nan_to_num(labels)),
        masks=torch.from_numpy(m),
    )
    out = label_correlation(ds)
    corr = np.array(out["correlation"], dtype=float)
    assert corr[0, 1] == pytest.approx(np.corrcoef(a, b)[0, 1])
    j = m[:, 2]
    assert corr[0, 2] == pytest.approx(np.corrcoef(a[j], c[j])[0, 1])
    assert corr[1, 2] == pytest.approx(np.corrcoef(b[j], c[j])[0, 1])
    assert corr[2, 0] == pytest.approx(corr[0, 2])
    assert out["rows"][0][2] == int(j.sum()) and out["rows"][0][1] == n
    assert np.diag(corr) == pytest.approx([1.0, 1.0, 1.0])


def test_label_correlation_constant_on_joint_rows_is_nan() -> None:
    # tiny data: watch lives on clicked rows, where click is constant 1
    _, ds = tiny_dataset(n=100)
    out = label_correlation(ds)
    assert out["correlation"][0][1] is None


# -- vectorised runs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("shared_bottom", {"bottom_hidden": [8, 6], "tower_hidden": [4]}),
        ("mmoe", {"num_experts": 3, "expert_hidden": [8, 6], "tower_hidden": [4]}),
    ],
)
def test_vectorised_runs_equal_separate_runs(name: str, params: dict) -> None:
    d, runs, steps, bsz = 6, 3, 4, 16
    schema = mmoe_synthetic_schema(d)
    models = []
    for r in range(runs):
        torch.manual_seed(r)
        models.append(build_model(name, schema, {}, params))
    init = [copy.deepcopy(m.state_dict()) for m in models]
    vr = VectorizedRuns([copy.deepcopy(m) for m in models], lr=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(runs, steps, bsz, d, generator=g)
    y = torch.randn(runs, steps, bsz, 2, generator=g)
    vec_losses = [vr.step(x[:, s], y[:, s]) for s in range(steps)]
    names = tuple(f"x{i}" for i in range(d))
    for r, m in enumerate(models):
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for s in range(steps):
            feats = Features(torch.zeros(bsz, 0, dtype=torch.int32), x[r, s], dense_names=names)
            out = m(feats)
            per = [
                ((out.logits[t] - y[r, s][:, j]) ** 2).mean() for j, t in enumerate(("y1", "y2"))
            ]
            assert torch.stack(per).detach() == pytest.approx(vec_losses[s][r], abs=1e-5)
            opt.zero_grad()
            sum(per).backward()
            opt.step()
        state = vr.run_state(r)
        moved = False
        for k, v in m.named_parameters():
            torch.testing.assert_close(state[k], v.detach(), atol=1e-5, rtol=1e-4)
            moved |= not torch.equal(v.detach(), init[r][k])
        assert moved
    # evaluation agrees with the separate models too
    xt, yt = torch.randn(runs, 40, d, generator=g), torch.randn(runs, 40, 2, generator=g)
    ev = vr.evaluate(xt, yt, block=16)
    for r, m in enumerate(models):
        m.eval()
        with torch.no_grad():
            out = m(Features(torch.zeros(40, 0, dtype=torch.int32), xt[r], dense_names=names))
        want = [
            float(((out.logits[t] - yt[r][:, j]) ** 2).mean()) for j, t in enumerate(("y1", "y2"))
        ]
        assert ev[r].tolist() == pytest.approx(want, abs=1e-5)


def test_synthetic_study_records_generator_constants(tmp_path: Path) -> None:
    from mtlrec.analysis.study import run_synthetic_study

    res = run_synthetic_study(
        correlations=(0.5, 1.0),
        models=["shared_bottom", "mmoe"],
        runs=2,
        steps=3,
        batch_size=16,
        n_train=64,
        n_test=32,
        eval_every=2,
        output=tmp_path,
    )
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["generator"]["preset"] == "mmoe-fig2" and len(saved["generator"]["alphas"]) == 10
    assert set(saved["results"]) == {"0.5", "1.0"}
    for p in saved["results"].values():
        for m in ("shared_bottom", "mmoe"):
            assert len(p["models"][m]["final_test_loss"]) == 2
            assert [c["step"] for c in p["models"][m]["curve"]] == [2, 3]
    assert "mmoe-fig2" in (tmp_path / "study.md").read_text()
    assert res["settings"]["runs"] == 2


# -- report -------------------------------------------------------------------------------------


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag in ("h1", "h2", "h3"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.headings.append(data)


def _check_pngs(srcs: list[str]) -> None:
    from PIL import Image

    assert srcs
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        raw = base64.b64decode(s.split(",", 1)[1], validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
        assert img.format == "PNG" and img.size[0] > 50 and img.size[1] > 50


@pytest.mark.slow
def test_report_has_sections_and_valid_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from mtlrec.analysis.report import write_report
    from mtlrec.analysis.study import run_synthetic_study

    res = _constructed()
    res.gates = {"a": {"ctr": {"utilisation": [0.6, 0.4], **flag_experts([0.6, 0.4])}}}
    res.label_correlation = {
        "tasks": ["ctr", "watch"],
        "correlation": [[1.0, 0.2], [0.2, 1.0]],
        "rows": [[10, 5], [5, 5]],
    }
    write_compare(res, tmp_path)
    run = tmp_path / "runs" / "a-s0"
    run.mkdir(parents=True)
    recs = [
        {
            "epoch": e,
            "train_loss": {"ctr": 0.7 - 0.1 * e, "watch": 1.0 / e},
            "valid": {"ctr": {"auc": 0.6 + 0.05 * e}, "watch": {"mse": 1.0 / e}},
            "gate_entropy": {"ctr": 0.6, "watch": 0.5},
            "gate_utilisation": {"ctr": [0.6, 0.4], "watch": [0.3, 0.7]},
        }
        for e in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "fusion_search.json").write_text(json.dumps({"weights": {"ctr": 1.5}}))
    run_synthetic_study(
        correlations=(0.5,),
        models=["shared_bottom"],
        runs=2,
        steps=2,
        batch_size=8,
        n_train=16,
        n_test=8,
        eval_every=1,
        output=tmp_path,
    )
    out = write_report(tmp_path, tmp_path / "r.html")
    text = out.read_text()
    parser = _Collect()
    parser.feed(text)
    heads = " ".join(parser.headings)
    for section in (
        "Comparison",
        "Expert utilisation",
        "Label correlation",
        "Training curves",
        "Synthetic study",
        "Fusion",
        "fusion_search.json",
    ):
        assert section in heads, section
    assert "&quot;ctr&quot;: 1.5" in text  # fusion JSON shown, escaped
    assert re.search(r"<td>a</td>.*?<td>yes</td>", text)  # the seesaw column
    # seesaw bars, heatmap, curves, gate entropy, 3 study plots
    assert len(parser.imgs) == 7
    _check_pngs(parser.imgs)


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    from mtlrec.analysis.report import build_report

    with pytest.raises(ConfigError, match="nothing to report"):
        build_report(tmp_path)


def test_single_task_baseline_of_a_task_monitored_config_selects_on_its_own_task(
    tmp_path: Path,
) -> None:
    from mtlrec.analysis.compare import run_config
    from mtlrec.config import ExperimentConfig

    base = ExperimentConfig.from_dict(
        {
            "data": {"dataset": "census-income", "options": {"task_group": 1}},
            "model": {"name": "mmoe"},
            "training": {"monitor": "never_married/auc"},
        }
    )
    own = run_config(base, "single_task", 0, tmp_path / "a", tasks=["never_married"])
    assert own.training.monitor == "never_married/auc"
    other = run_config(base, "single_task", 0, tmp_path / "b", tasks=["income"])
    assert other.training.monitor is None  # the default rule, on income
    joint = run_config(base, "mmoe", 0, tmp_path / "c")
    assert joint.training.monitor == "never_married/auc"
