"""Non-gated architectures and their blocks: soft / asymmetric / customized sharing,
cross-stitch and sluice networks, ESMM, MoSE, the FM term and task chaining."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mtlrec.batch import PAD_ID, Features
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.nn.fm import FactorizationMachine, pairwise_interactions
from mtlrec.nn.sequence import SequenceExpertBank
from mtlrec.nn.stitch import CrossStitch, subspace_orthogonality
from mtlrec.testing import tiny_dataset, tiny_funnel_dataset

MINE = {
    "soft_sharing": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "asymmetric_sharing": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "customized_sharing": {"shared_hidden": (8,), "specific_hidden": (6,), "tower_hidden": (4,)},
    "cross_stitch": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "sluice": {"bottom_hidden": (8, 8), "tower_hidden": (4,)},
    "mose": {"bottom_hidden": 6, "num_experts": 3, "expert_hidden": 5, "tower_hidden": (4,)},
    "esmm": {"tower_hidden": (6,)},
}


def data(name: str = ""):
    return tiny_funnel_dataset(n=64) if name == "esmm" else tiny_dataset(n=64)


def build(name: str, seed: int = 0, **extra):
    pre, _ = data(name)
    torch.manual_seed(seed)
    return build_model(name, pre.schema, pre.table_sizes(), {**MINE.get(name, {}), **extra})


@pytest.mark.parametrize("name", sorted(MINE))
def test_towers_end_in_width_one_and_logits_are_per_row(name: str) -> None:
    _, ds = data(name)
    model = build(name).eval()
    out = model(ds.features_at(slice(0, 5)))
    for t, tower in model.heads.towers.items():
        assert tower.layers[-1].out_features == 1
        assert out.logits[t].shape == (5,)


# -- ESMM --------------------------------------------------------------------------------------
def test_esmm_ctcvr_is_the_product_and_cvr_has_no_loss() -> None:
    pre, ds = data("esmm")
    model = build("esmm").eval()
    assert model.loss_task_names == ("ctr", "ctcvr")
    out = model(ds.features_at(slice(0, 16)))
    p = out.predictions(pre.schema.tasks)
    assert set(p) == {"ctr", "cvr", "ctcvr"}
    torch.testing.assert_close(p["ctcvr"], p["ctr"] * p["cvr"], rtol=1e-6, atol=1e-7)
    assert "ctcvr" not in out.logits  # a probability, never a product of logits


def test_esmm_cvr_tower_learns_from_unclicked_rows() -> None:
    pre, ds = data("esmm")
    model = build("esmm")
    batch = ds.take(slice(0, len(ds)))
    unclicked = (batch.labels["ctr"] == 0).nonzero().squeeze(1)
    assert len(unclicked) > 0
    b = ds.take(unclicked)
    loss_tasks = [t for t in pre.schema.tasks if t.name in model.loss_task_names]
    losses = MultiTaskLoss(loss_tasks)(model(b.features), b)
    (losses["ctr"] + losses["ctcvr"]).backward()
    g = model.heads.towers["cvr"].layers[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_esmm_names_a_missing_task() -> None:
    pre, _ = tiny_dataset(n=20)
    with pytest.raises(ConfigError, match=r"model\.params\.cvr_task is .cvr."):
        build_model("esmm", pre.schema, pre.table_sizes(), {"ctr_task": "click"})


# -- cross-stitch and sluice ----------------------------------------------------------------------
def _copy_into_single_task(cs: nn.Module, st: nn.Module) -> None:
    with torch.no_grad():
        for k, t in enumerate(cs.task_names):
            st.embeddings[t].load_state_dict(cs.embedding.state_dict())
            for i, layer in enumerate(cs.layers):
                lin = st.bottoms[t].layers[i]
                lin.weight.copy_(layer.member_weight(0, k).T)
                b = layer.biases[0]
                lin.bias.copy_(b.view(layer.num, -1)[k] if b.dim() == 1 else b[k, 0])
            st.heads.towers[t].load_state_dict(cs.heads.towers[t].state_dict())


@pytest.mark.parametrize("self_weight", [1.0, 0.9])
def test_cross_stitch_with_identity_units_equals_independent_networks(self_weight: float) -> None:
    _, ds = data()
    cs = build("cross_stitch", self_weight=self_weight).eval()
    st = build("single_task", bottom_hidden=(8, 6), tower_hidden=(4,)).eval()
    _copy_into_single_task(cs, st)
    feats = ds.features_at(slice(0, 32))
    a, b = cs(feats).logits, st(feats).logits
    same = all(torch.allclose(a[t], b[t], atol=1e-6) for t in a)
    assert same == (self_weight == 1.0)  # and mixing (0.9) does make them differ


def test_stitch_unit_mixes_subspaces_and_split_merge_invert() -> None:
    unit = CrossStitch(2, subspaces=2, self_weight=0.7)
    x = torch.randn(2, 3, 4)
    assert torch.equal(unit.merge(unit.split(x)), x)
    ref = torch.stack(
        [sum(unit.alpha[u, v] * unit.split(x)[v] for v in range(4)) for u in range(4)]
    )
    torch.testing.assert_close(unit(x), unit.merge(ref))
    torch.testing.assert_close(unit.alpha.sum(1), torch.ones(4))


def test_subspace_orthogonality_matches_its_definition() -> None:
    x = torch.randn(2, 5, 6)
    g = x.view(2, 5, 3, 2)
    ref = sum(
        (g[t, :, i].T @ g[t, :, j]).square().sum()
        for t in range(2)
        for i in range(3)
        for j in range(i + 1, 3)
    )
    torch.testing.assert_close(subspace_orthogonality(x, 3), ref / 5)


def test_sluice_reports_its_penalty_in_training_only() -> None:
    _, ds = data()
    model = build("sluice", orthogonality_weight=0.5)
    feats = ds.features_at(slice(0, 8))
    assert "orthogonality" in model(feats).aux_losses
    assert not model.eval()(feats).aux_losses


# -- soft sharing --------------------------------------------------------------------------------
def test_soft_sharing_penalty_is_the_pairwise_l2_tie() -> None:
    _, ds = data()
    model = build("soft_sharing", l2_weight=0.1, trace_norm_weight=0.2)
    aux = model(ds.features_at(slice(0, 4))).aux_losses
    ref_l2 = ref_tr = 0.0
    for i in range(len(model.bottoms.weights)):
        w = model.bottoms.member_weights(i)
        ref_l2 += sum((w[s] - w[t]).square().sum() for s, t in itertools.combinations(range(2), 2))
        ref_tr += torch.linalg.svdvals(w.flatten(1)).sum()
    torch.testing.assert_close(aux["l2_tie"], 0.1 * ref_l2)
    torch.testing.assert_close(aux["trace_norm"], 0.2 * ref_tr)
    with torch.no_grad():  # equal members: no L2 penalty
        for i in range(len(model.bottoms.weights)):
            w = model.bottoms.member_weights(i)
            w[1].copy_(w[0])
    assert model(ds.features_at(slice(0, 4))).aux_losses["l2_tie"].item() == 0.0


# -- asymmetric / customized sharing -----------------------------------------------------------
def test_asymmetric_sharing_feeds_only_forward() -> None:
    pre, ds = data()
    model = build("asymmetric_sharing")  # default: watch reads click's bottom, not the reverse
    b = ds.take(slice(0, 64))
    out = model(b.features)
    click = MultiTaskLoss([pre.schema.task("click")])(out, b)["click"]
    watch = MultiTaskLoss([pre.schema.task("watch")])(out, b)["watch"]
    w0 = model.bottoms.weights[-1]  # [T, in, out]
    (g_click,) = torch.autograd.grad(click, w0, retain_graph=True)
    (g_watch,) = torch.autograd.grad(watch, w0)
    assert not g_click[1].any() and g_click[0].any()  # click never reads watch's bottom
    assert g_watch[0].any() and g_watch[1].any()  # watch reads both


def test_customized_sharing_tower_reads_shared_and_own() -> None:
    _, ds = data()
    for extra in ({}, {"shared_hidden": (6,), "specific_hidden": (6,)}):
        model = build("customized_sharing", **extra).eval()
        out = model(ds.features_at(slice(0, 3)))
        assert all(v.shape == (3, 12 if extra else 14) for v in out.tower_inputs.values())


def test_sharing_rejects_a_self_feed() -> None:
    with pytest.raises(ConfigError, match="feed itself"):
        build("asymmetric_sharing", feeds={"click": ["click"]})


# -- MoSE and the recurrent bank -----------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_bank_equals_torch_rnn(cell: str) -> None:
    torch.manual_seed(0)
    bank = SequenceExpertBank(2, 3, 4, cell=cell)
    x = torch.randn(5, 6, 3)
    states, final = bank(x, torch.ones(5, 6, dtype=torch.bool))
    for k in range(2):
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(3, 4, batch_first=True)
        with torch.no_grad():
            ref.weight_ih_l0.copy_(bank.w_ih[k].T)
            ref.weight_hh_l0.copy_(bank.w_hh[k].T)
            ref.bias_ih_l0.copy_(bank.b_ih[k, 0])
            ref.bias_hh_l0.copy_(bank.b_hh[k, 0])
        y, _ = ref(x)
        torch.testing.assert_close(states[k], y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[k], y[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shared_input", [True, False])
def test_fused_recurrence_equals_the_stepwise_one(cell: str, shared_input: bool) -> None:
    """Prefix masks take the fused ATen path; it must give the step-wise recurrence's states
    (padding repeats the last state, empty rows stay zero) and its gradients."""
    torch.manual_seed(1)
    bank = SequenceExpertBank(3, 4, 5, cell=cell, shared_input=shared_input)
    lengths = torch.tensor([7, 0, 3, 1, 7, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # [6, 7], a prefix per row
    shape = (6, 7, 4) if shared_input else (3, 6, 7, 4)
    x = torch.randn(*shape, requires_grad=True)
    fused = bank(x, mask)
    stepwise = bank._stepwise(x, mask)
    for a, b in zip(fused, stepwise, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(fused[0])
    params = [x, *bank.parameters()]
    ga = torch.autograd.grad((fused[0] * w).sum() + fused[1].sum(), params)
    gb = torch.autograd.grad((stepwise[0] * w).sum() + stepwise[1].sum(), params)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _repad(feats: Features, left: bool, extra: int) -> Features:
    """Same real ids, padding moved to the left (or kept right) and ``extra`` more columns."""
    ids = feats.sequences["hist"]
    rows = []
    width = ids.shape[1] + extra
    for r in ids:
        real = r[r != PAD_ID]
        pad = torch.full((width - len(real),), PAD_ID, dtype=ids.dtype)
        rows.append(torch.cat([pad, real] if left else [real, pad]))
    return Features(feats.sparse, feats.dense, {"hist": torch.stack(rows)})


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_mose_output_does_not_change_with_padding(cell: str) -> None:
    _, ds = data()
    model = build("mose", cell=cell).eval()
    feats = ds.features_at(slice(0, 32))
    assert (feats.sequences["hist"] == PAD_ID).any()
    ref = model(feats)
    for left, extra in [(True, 0), (False, 3), (True, 2)]:
        out = model(_repad(feats, left, extra))
        for t in ref.logits:
            torch.testing.assert_close(out.logits[t], ref.logits[t], atol=1e-6, rtol=1e-5)
    # the test has teeth: an unmasked recurrence would see the padding
    seq, mask = model.embedding.embed_sequence(feats, "hist")
    _, masked = model.bottom(seq, mask)
    _, unmasked = model.bottom(seq, torch.ones_like(mask))
    assert not torch.allclose(masked, unmasked)


def test_mose_needs_a_sequence_feature() -> None:
    pre, _ = tiny_dataset(n=20, sequences=False)
    with pytest.raises(ConfigError, match="sequence feature"):
        build_model("mose", pre.schema, pre.table_sizes())


# -- FM term -------------------------------------------------------------------------------------
def test_pairwise_identity_equals_the_quadratic_sum() -> None:
    v = torch.randn(4, 5, 3, dtype=torch.float64)
    ref = sum((v[:, i] * v[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(pairwise_interactions(v), ref)


def test_fm_term_equals_the_reference_and_is_added_to_chosen_tasks() -> None:
    _, ds = data()
    model = build("shared_bottom", bottom_hidden=(8,), fm_tasks=("click",), fm_dim=3).eval()
    fm: FactorizationMachine = model.fm
    feats = ds.features_at(slice(0, 10))
    v = fm.field_vectors(feats)  # [B, F, 3]
    pair = sum((v[:, i] * v[:, j]).sum(-1) for i in range(v.shape[1]) for j in range(i))
    first = fm.first(feats).flat[:, : fm.n_cat].sum(1) + fm.dense(feats.dense).squeeze(-1)
    torch.testing.assert_close(fm(feats), fm.bias + first + pair)
    out = model(feats)
    deep = {t: model.heads.towers[t](x).squeeze(-1) for t, x in out.tower_inputs.items()}
    torch.testing.assert_close(out.logits["click"], deep["click"] + fm(feats))
    torch.testing.assert_close(out.logits["watch"], deep["watch"])


def test_fm_rejects_an_unknown_task() -> None:
    with pytest.raises(ConfigError, match="fm_tasks"):
        build("cross_stitch", fm_tasks=("nope",))


# -- task chaining -------------------------------------------------------------------------------
CHAINABLE = ["cross_stitch", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "ml_mmoe", "stem"]


@pytest.mark.parametrize("name", CHAINABLE)
@pytest.mark.parametrize("detach", [True, False])
def test_chained_task_reads_the_source_prediction(name: str, detach: bool) -> None:
    pre, ds = data()
    model = build(name, chain={"watch": "click"}, chain_detach=detach)
    b = ds.take(slice(0, 64))
    out = model(b.features)
    x = out.tower_inputs["watch"]
    torch.testing.assert_close(x[:, -1], torch.sigmoid(out.logits["click"]).detach())
    loss = MultiTaskLoss([pre.schema.task("watch")])(out, b)["watch"]
    w = model.heads.towers["click"].layers[0].weight
    (g,) = torch.autograd.grad(loss, w, allow_unused=True)
    assert (g is not None and bool(g.any())) != detach


def test_chain_cycle_is_rejected() -> None:
    with pytest.raises(ValueError, match="cycle"):
        build("soft_sharing", chain={"watch": "click", "click": "watch"})


# -- AITM ----------------------------------------------------------------------------------------
def test_aitm_calibration_and_transfer_direction() -> None:
    pre, ds = data()
    model = build("aitm", tower_hidden=(8, 6), calibration_weight=0.5)
    b = ds.take(slice(0, 64))
    out = model(b.features)
    assert "calibration" not in out.aux_losses  # watch is a regression step: no constraint
    assert set(out.gates) == {"ait_watch"}
    click = MultiTaskLoss([pre.schema.task("click")])(out, b)["click"]
    g = torch.autograd.grad(click, model.towers.weights[-1])[0]  # [T, in, out]
    assert g[0].any() and not g[1].any()  # the first step never reads the later one
    funnel_pre, funnel = tiny_funnel_dataset(n=64)
    torch.manual_seed(0)
    m2 = build_model("aitm", funnel_pre.schema.select_tasks(["ctr", "ctcvr"]),
                     funnel_pre.table_sizes(), {"calibration_weight": 0.5})  # fmt: skip
    o2 = m2(funnel.features_at(slice(0, 32)))
    gap = torch.sigmoid(o2.logits["ctcvr"]) - torch.sigmoid(o2.logits["ctr"])
    torch.testing.assert_close(o2.aux_losses["calibration"], 0.5 * gap.clamp_min(0).mean())


# -- STEM ----------------------------------------------------------------------------------------
def test_stem_task_loss_reaches_only_its_own_and_the_shared_embedding() -> None:
    pre, ds = data()
    model = build("stem", expert_hidden=(8,), tower_hidden=(4,))
    b = ds.take(slice(0, 64))
    out = model(b.features)
    loss = MultiTaskLoss([pre.schema.task("click")])(out, b)["click"]
    tables = {n: list(model.embeddings[n].parameters()) for n in model.embeddings}
    grads = {n: torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
             for n, ps in tables.items()}  # fmt: skip
    assert all(g is not None and g.any() for g in grads["click"] + grads["__shared__"])
    assert all(g is None or not g.any() for g in grads["watch"])
    assert all(v.shape == (64, 3) for v in out.gates.values())  # T + 1 experts
