"""Tests that kill the mutants of ``mtlrec.weighting`` that ``test_mutation_weighting.py`` and the
rest of the weighting suite left alive (``python benchmarks/mutation.py weighting``), each
against an analytic value or an independent computation: the seeded schedules of alternating
training and PCGrad (the project's ``seed * 1_000_003 + counter`` convention), the class
threshold of DTP's batch AUC, the error message and the dtype of GradNorm's ``L_grad``, the
float64 normalisers of MGDA and the rounding tolerance of PE-LTR's bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlrec.errors import ConfigError
from mtlrec.weighting import build_weighting
from mtlrec.weighting.alternating import Alternating
from mtlrec.weighting.dtp import batch_auc
from mtlrec.weighting.gradnorm import GradNorm
from mtlrec.weighting.mgda import MGDA
from mtlrec.weighting.pcgrad import PCGrad
from mtlrec.weighting.pe_ltr import PELTR

F64 = torch.float64
# The seeding convention of every seeded draw of the project (data/dataset.py, analysis/study.py,
# alternating, PCGrad): a generator seeded with ``seed * 1_000_003 + counter``. Pinned so that a
# checkpoint resumed by a later version draws the same tasks and orders as the run that wrote it.
SEED_STRIDE = 1_000_003


# -- seeded schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "every"), [(0, 1), (3, 2)])
def test_alternating_random_order_draws_from_the_seeded_generator_of_each_block(
    seed: int, every: int
) -> None:
    """Random order: block ``b = step // every`` trains task ``randint(T)`` drawn from a
    generator seeded with ``seed * 1_000_003 + b`` (reference: a plain loop)."""
    t, steps = 4, 24
    params = {"order": "random", "seed": seed, "every": every}
    s = build_weighting("alternating", tuple("abcd"), params)
    assert isinstance(s, Alternating)
    want = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * SEED_STRIDE + step // every)
        want.append(int(torch.randint(t, (1,), generator=gen)))
    got = []
    for _ in range(steps):
        got.append(s.active())
        s.on_step_end(torch.zeros(t))
    assert got == want
    assert len(set(want)) > 1  # a schedule that can tell seedings apart


@pytest.mark.parametrize("seed", [0, 2])
def test_pcgrad_orders_draw_one_permutation_per_task_from_the_seeded_step(seed: int) -> None:
    """Each step's orders: for task i in turn, ``randperm(T)`` without i, from one generator
    seeded with ``seed * 1_000_003 + step`` (reference: a plain loop)."""
    t = 4
    s = build_weighting("pcgrad", tuple("abcd"), {"seed": seed})
    assert isinstance(s, PCGrad)
    for step in range(5):
        gen = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
        want = []
        for i in range(t):
            want.append([k for k in torch.randperm(t, generator=gen).tolist() if k != i])
        got = s.orders()
        assert got == want
        assert all(sorted(o) == [k for k in range(t) if k != i] for i, o in enumerate(got))
        s.on_step_end(torch.zeros(t))


# -- DTP's batch AUC ------------------------------------------------------------------------------
def _mann_whitney_auc(score: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie), over all pairs."""
    pos = [s for s, p in zip(score, positive, strict=True) if p]
    neg = [s for s, p in zip(score, positive, strict=True) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_batch_auc_counts_a_label_of_one_half_as_negative() -> None:
    """The positive class is ``y > 0.5``, the threshold DTP's accuracy KPI uses for the same
    labels (``y > 0.5``), so a soft label of exactly 0.5 (a task configured ``binary``) is a
    negative for both KPIs."""
    score = [0.1, 0.9, 0.8, 0.3, 0.8]
    y = [0.0, 0.5, 1.0, 0.5, 1.0]
    got = batch_auc(torch.tensor(score, dtype=F64), torch.tensor(y))
    assert got is not None
    want = _mann_whitney_auc(score, [v > 0.5 for v in y])
    assert want == pytest.approx(4 / 6)  # 2 positives x 3 negatives: 4 wins
    assert float(got) == pytest.approx(want, abs=1e-15)
    # only labels of 0.5 and below: no positive, no AUC
    assert batch_auc(torch.tensor([0.2, 0.7], dtype=F64), torch.tensor([0.5, 0.0])) is None


# -- GradNorm -------------------------------------------------------------------------------------
class _ManyShared(nn.Module):
    """A model with 25 shared parameters (p.0 .. p.24) and no embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(25)])

    def embedding_parameters(self) -> list[nn.Parameter]:
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


def test_gradnorm_unknown_layer_lists_the_first_20_shared_parameters() -> None:
    s = build_weighting("gradnorm", ("a", "b"), {"layer": "tower."})
    assert isinstance(s, GradNorm)
    with pytest.raises(ConfigError) as err:
        s.grad_parameters(_ManyShared())  # type: ignore[arg-type]
    first20 = [f"p.{i}" for i in range(20)]
    assert str(err.value) == (
        f"gradnorm layer 'tower.' matches no shared parameter; shared parameters are {first20}"
    )


def test_gradnorm_loss_of_a_float64_model_is_taken_in_the_logits_dtype() -> None:
    """``L_grad = sum_t |w_t ||g_t|| - mean(G) r_t^alpha|`` is a function of the strategy's own
    float32 logits: the gradient norms and the loss ratios are cast to the weights' dtype, so
    a float64 model (float64 losses and gradients) leaves it float32. Its gradient, by hand at
    logits 0 (w = (1, 1)), ratios 1, norms (1, 3): G = (1, 3), target 2, dL/dw = (-1, 3), and
    through ``w = 2 softmax(l)`` (dw_i/dl_j = delta_ij - 1/2): dL/dl = (-2, 2)."""
    s = build_weighting("gradnorm", ("a", "b"))
    assert isinstance(s, GradNorm)
    losses = torch.tensor([0.7, 0.4], dtype=F64)
    j = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=F64)
    w = s.weights(losses, j)
    assert w.dtype == F64
    assert w.tolist() == [1.0, 1.0]  # 2 softmax(0)
    reg = s.regularizer(losses)
    assert reg is not None
    assert reg.dtype == s.logits.dtype == torch.float32
    assert float(reg.detach()) == 0.0  # no value in the objective, only a gradient
    reg.backward()
    assert s.logits.grad is not None
    assert s.logits.grad.tolist() == pytest.approx([-2.0, 2.0], abs=1e-6)


# -- MGDA's normalisers ---------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_mgda_loss_normalisers_are_float64_with_the_loss_clamped_at_1e_12(
    normalization: str,
) -> None:
    """Sener & Koltun's 'loss' normaliser is ``L_t`` ('loss+': ``L_t ||g_t||``), in float64
    whatever the losses' dtype, a loss of 0 clamped to 1e-12 (the float64 value)."""
    s = build_weighting("mgda", ("a", "b"), {"normalization": normalization})
    assert isinstance(s, MGDA)
    losses = torch.tensor([0.0, 2.5])  # float32, as a float32 model gives them
    gram = torch.tensor([[4.0, 1.0], [1.0, 9.0]], dtype=F64)  # norms 2 and 3
    got = s.normalizers(losses, gram)
    want = torch.tensor([1e-12, 2.5], dtype=F64)
    if normalization == "loss+":
        want = want * torch.tensor([2.0, 3.0], dtype=F64)
    assert got.dtype == F64
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-15, abs=0.0)


# -- PE-LTR's bounds ------------------------------------------------------------------------------
def test_pe_ltr_bounds_may_exceed_one_by_the_1e_9_rounding_tolerance() -> None:
    """The bounds check allows sums up to ``1 + 1e-9`` (rounding of the configured values):
    exactly that sum is accepted (the weights are then the bounds, no free mass is left),
    anything beyond it rejected."""
    edge = 1 + 1e-9
    s = build_weighting("pe_ltr", ("a", "b"), {"bounds": {"a": edge}})
    assert isinstance(s, PELTR)
    assert sum(s.bounds.tolist()) == edge
    w = s.shared_weights(torch.ones(2, dtype=F64), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert w.dtype == F64
    assert w.tolist() == [edge, 0.0]
    with pytest.raises(ConfigError, match="pe_ltr bounds must be >= 0 and sum to at most 1"):
        build_weighting("pe_ltr", ("a", "b"), {"bounds": {"a": 1 + 3e-9}})
