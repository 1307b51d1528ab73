"""Tests that kill the mutants of ``mtlrec.autograd`` the rest of the suite let live
(``python benchmarks/mutation.py autograd``): every parameter's ``.grad`` after
:func:`multitask_backward` against an independent computation written here (one
``torch.autograd.grad`` per task, then the strategy's combination by its formula), for the
parameter path (accumulation into an existing ``.grad``, a shared parameter on no task's path,
absent tasks, auxiliary losses, ``jacobian_sync``), the representation path (several distinct
tower inputs, MGDA-UB's two-task closed form), loss-based strategies (``grad_scale``), the step
where no task is present, the fields of :class:`BackwardResult`, the configuration errors,
:func:`present_mask` and :func:`task_jacobian` (device and dtype of their results)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from mtlrec.autograd import BackwardResult, multitask_backward, present_mask, task_jacobian
from mtlrec.errors import ConfigError
from mtlrec.weighting import build_weighting
from mtlrec.weighting.base import Weighting

F64 = torch.float64


def names(t: int) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(t))


class Probe(Weighting):
    """A gradient strategy written for these tests: weights that need the Jacobian,
    ``w_t = 1 / (1 + ||J_t||)``, and a combination that is not ``w @ J``,
    ``g = sum_t w_t^2 J_t`` (so the correction ``g - w @ J`` is never 0)."""

    needs_grads = True

    def __init__(self, task_names: Sequence[str], target: str = "parameters") -> None:
        super().__init__(task_names)
        self.grad_target = target  # type: ignore[assignment]
        self.seen_present: Tensor | None = None

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        assert jacobian is not None, "a gradient strategy is given the Jacobian"
        self.seen_present = self.present.clone()
        return 1.0 / (1.0 + jacobian.norm(dim=1))

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        return weights.square() @ jacobian


def probe_weights(rows: list[Tensor], present: list[bool]) -> list[float]:
    """The Probe's weights from per-task gradients, 0 for an absent task (a plain loop)."""
    return [1.0 / (1.0 + float(r.norm())) if p else 0.0 for r, p in zip(rows, present, strict=True)]


def grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``d loss / d p`` for every p (zeros where the loss does not reach p), graph kept."""
    return list(torch.autograd.grad(loss, list(params), retain_graph=True, materialize_grads=True))


def flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1) for x in ts])


class Toy(nn.Module):
    """Shared bottom with 4 parameter tensors (so that a slicing offset is tested past the
    second one) and one linear head per task; float64."""

    def __init__(self, t: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bottom = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(t))
        self.double()
        self.x = torch.randn(8, 4, dtype=F64)
        self.y = torch.randn(t, 8, dtype=F64) * torch.arange(1, t + 1, dtype=F64)[:, None]
        self.t = t

    def shared(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())

    def losses(self) -> dict[str, Tensor]:
        h = self.bottom(self.x)
        return {
            n: (self.heads[i](h).squeeze(-1) - self.y[i]).square().mean()
            for i, n in enumerate(names(self.t))
        }

    def aux(self) -> Tensor:
        """A regulariser on a shared and a task parameter: ``0.3 ||W1||^2 + 0.2 ||b_head0||^2``."""
        return 0.3 * self.bottom[0].weight.square().sum() + 0.2 * self.heads[0].bias.square().sum()


def check_result(
    res: BackwardResult, objective: float, losses: Tensor, weights: list[float], present: list[bool]
) -> None:
    assert isinstance(res, BackwardResult)
    assert float(res.objective) == pytest.approx(objective, rel=1e-12, abs=1e-12)
    assert not res.objective.requires_grad
    torch.testing.assert_close(res.losses, losses.detach(), rtol=0, atol=0)
    assert res.weights.shape == (len(weights),) and not res.weights.requires_grad
    torch.testing.assert_close(res.weights, torch.tensor(weights, dtype=F64), rtol=1e-12, atol=0)
    assert res.present is not None and res.present.dtype == torch.bool
    assert res.present.tolist() == present


# -- gradient strategies on the shared parameters ----------------------------------------------
@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("prior_grad", [False, True])
@pytest.mark.parametrize("counts", [None, {"t0": 4, "t1": 0, "t2": 3}])
def test_parameter_backward_matches_per_task_reference(
    with_aux: bool, prior_grad: bool, counts: dict[str, int] | None
) -> None:
    """Shared parameters get ``g = sum_t w_t^2 J_t`` (+ the auxiliary loss's gradient), each
    head ``w_t`` times its task's gradient, and everything adds to an existing ``.grad``. A task
    counted 0 has weight 0 even though its loss here is not 0, and the strategy is told it is
    absent."""
    model = Toy(3, seed=1)
    present = [True, True, True] if counts is None else [counts[n] > 0 for n in names(3)]
    shared = model.shared()
    losses = model.losses()
    aux = model.aux() if with_aux else None
    # reference: one backward per task
    rows = [flat(grads(losses[n], shared)) for n in names(3)]
    heads = [grads(losses[n], list(model.heads[i].parameters())) for i, n in enumerate(names(3))]
    w = probe_weights(rows, present)
    g = sum(wt**2 * r for wt, r in zip(w, rows, strict=True))
    aux_g = flat(grads(aux, shared)) if aux is not None else torch.zeros_like(g)
    aux_h = grads(aux, list(model.heads[0].parameters())) if aux is not None else None
    prior = {id(p): torch.full_like(p, 0.25) for p in model.parameters()}
    if prior_grad:
        for p in model.parameters():
            p.grad = prior[id(p)].clone()
    vec = torch.stack([losses[n] for n in names(3)])
    objective = sum(wt * float(v.detach()) for wt, v in zip(w, vec, strict=True)) + (
        float(aux.detach()) if aux is not None else 0
    )

    s = Probe(names(3))
    res = multitask_backward(losses, s, shared_parameters=shared, aux_loss=aux, counts=counts)

    assert s.seen_present is not None and s.seen_present.tolist() == present
    base = (lambda p: prior[id(p)]) if prior_grad else (lambda p: torch.zeros_like(p))
    assert all(p.grad is not None for p in shared)
    got = flat([p.grad - base(p) for p in shared])
    torch.testing.assert_close(got, g + aux_g, rtol=1e-10, atol=1e-12)
    for i in range(3):
        for k, p in enumerate(model.heads[i].parameters()):
            ref = w[i] * heads[i][k]
            if aux_h is not None and i == 0:
                ref = ref + aux_h[k]
            torch.testing.assert_close(p.grad - base(p), ref, rtol=1e-10, atol=1e-12)
    check_result(res, objective, vec, w, present)


def test_jacobian_sync_gives_the_synced_combination_plus_the_local_part() -> None:
    """With ``jacobian_sync`` the strategy sees ``S = sync(J)`` and the shared gradient is
    ``g(S) - w @ S + w @ J_local`` (the docstring's contract: the all-reduce of that is g)."""
    model = Toy(3, seed=2)
    shared = model.shared()
    losses = model.losses()
    rows = [flat(grads(losses[n], shared)) for n in names(3)]
    other = torch.randn(3, rows[0].numel(), dtype=F64)  # another process's per-task gradients
    synced = [(r + o) / 2 for r, o in zip(rows, other, strict=True)]
    w = probe_weights(synced, [True] * 3)
    ref = sum(wt**2 * s - wt * s + wt * r for wt, s, r in zip(w, synced, rows, strict=True))

    res = multitask_backward(
        losses, Probe(names(3)), shared_parameters=shared, jacobian_sync=lambda j: (j + other) / 2
    )

    torch.testing.assert_close(flat([p.grad for p in shared]), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.weights, torch.tensor(w, dtype=F64), rtol=1e-12, atol=0)


# -- gradient strategies on the shared representation -------------------------------------------
class RepToy(nn.Module):
    """Three shared tower inputs of different widths, each a function of x alone (tasks t0 and
    t1 read the first, t2 the second, t3 the third); float64."""

    widths = (4, 3, 2)
    reads = (0, 0, 1, 2)

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bottoms = nn.ModuleList(nn.Linear(5, k) for k in self.widths)
        self.heads = nn.ModuleList(nn.Linear(self.widths[r], 1) for r in self.reads)
        self.double()
        self.x = torch.randn(6, 5, dtype=F64)
        self.y = torch.randn(4, 6, dtype=F64) * torch.arange(1, 5, dtype=F64)[:, None]

    def forward(self) -> tuple[dict[str, Tensor], list[Tensor]]:
        reps = [torch.tanh(b(self.x)) for b in self.bottoms]
        losses = {
            n: (self.heads[i](reps[r]).squeeze(-1) - self.y[i]).square().mean()
            for i, (n, r) in enumerate(zip(names(4), self.reads, strict=True))
        }
        return losses, reps


@pytest.mark.parametrize("with_aux", [False, True])
def test_representation_backward_matches_per_task_reference(with_aux: bool) -> None:
    """The correction replaces ``w @ J`` by ``g`` on every distinct tower input, so the shared
    parameters get ``sum_r (d rep_r / d theta)^T g_r`` with ``g = sum_t w_t^2 dL_t/d rep``
    (+ the auxiliary loss's gradient), and each head ``w_t`` times its task's gradient."""
    model = RepToy(seed=3)
    losses, reps = model()
    representation = {n: reps[r] for n, r in zip(names(4), model.reads, strict=True)}
    shared = list(model.bottoms.parameters())
    aux = 0.3 * model.bottoms[1].weight.square().sum() if with_aux else None
    # reference: per task, the gradient of every tower input (zero for those it does not read)
    per_rep = [grads(losses[n], reps) for n in names(4)]
    w = probe_weights([flat(pr) for pr in per_rep], [True] * 4)
    g_rep = [sum(w[t] ** 2 * per_rep[t][r] for t in range(4)) for r in range(3)]
    ref = flat(torch.autograd.grad(reps, shared, grad_outputs=g_rep, retain_graph=True))
    if aux is not None:
        ref = ref + flat(grads(aux, shared))
    heads = [grads(losses[n], list(model.heads[i].parameters())) for i, n in enumerate(names(4))]
    vec = torch.stack([losses[n] for n in names(4)])
    objective = sum(wt * float(v.detach()) for wt, v in zip(w, vec, strict=True)) + (
        float(aux.detach()) if aux is not None else 0
    )

    res = multitask_backward(
        losses, Probe(names(4), "representation"), representation=representation, aux_loss=aux
    )

    torch.testing.assert_close(flat([p.grad for p in shared]), ref, rtol=1e-10, atol=1e-12)
    for i in range(4):
        for k, p in enumerate(model.heads[i].parameters()):
            torch.testing.assert_close(p.grad, w[i] * heads[i][k], rtol=1e-10, atol=1e-12)
    check_result(res, objective, vec, w, [True] * 4)


def test_representation_backward_with_a_single_task() -> None:
    """One task reading one tensor is a shared representation (the "every task reads its own
    input" error needs more than one task): its gradient there is ``w^2 J``."""
    model = RepToy(seed=4)
    losses, reps = model()
    one = {"t0": losses["t0"]}
    j = grads(one["t0"], [reps[0]])[0]
    w = 1.0 / (1.0 + float(j.norm()))
    ref = flat(
        torch.autograd.grad(
            reps[0], list(model.bottoms[0].parameters()), w**2 * j, retain_graph=True
        )
    )

    res = multitask_backward(one, Probe(["t0"], "representation"), representation={"t0": reps[0]})

    got = flat([p.grad for p in model.bottoms[0].parameters()])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert res.weights.tolist() == pytest.approx([w], rel=1e-12)


def test_mgda_ub_uses_the_two_task_closed_form_over_the_present_tasks() -> None:
    """MGDA-UB (Sener & Koltun 2018) with t2 absent: the min-norm weights of the two present
    tasks' representation gradients, ``a_0 = clip((u1 - u0).u1 / ||u0 - u1||^2, 0, 1)``,
    ``a_1 = 1 - a_0``, on the representation; heads get their own gradient (weight 1, 0 for
    the absent task)."""
    torch.manual_seed(5)
    bottom = nn.Linear(4, 3).double()
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(3)).double()
    x = torch.randn(7, 4, dtype=F64)
    y = torch.randn(3, 7, dtype=F64) * torch.tensor([[1.0], [-3.0], [2.0]], dtype=F64)
    h = torch.tanh(bottom(x))
    losses = {n: (heads[i](h).squeeze(-1) - y[i]).square().mean() for i, n in enumerate(names(3))}
    u0, u1 = (grads(losses[n], [h])[0] for n in ("t0", "t1"))
    a0 = float(((u1 - u0) * u1).sum() / (u0 - u1).square().sum())
    a0 = min(max(a0, 0.0), 1.0)
    assert 0.0 < a0 < 1.0  # an interior point: both tasks count
    ref = flat(
        torch.autograd.grad(
            h, list(bottom.parameters()), a0 * u0 + (1 - a0) * u1, retain_graph=True
        )
    )
    head_ref = [grads(losses[n], list(heads[i].parameters())) for i, n in enumerate(names(2))]
    s = build_weighting("mgda", names(3), {"grad_target": "representation"})

    res = multitask_backward(
        losses,
        s,
        representation=dict.fromkeys(names(3), h),
        counts={"t0": 7, "t1": 7, "t2": 0},
    )

    torch.testing.assert_close(flat([p.grad for p in bottom.parameters()]), ref)
    for i in range(2):
        for k, p in enumerate(heads[i].parameters()):
            torch.testing.assert_close(p.grad, head_ref[i][k])
    assert all(float(p.grad.abs().max()) == 0.0 for p in heads[2].parameters())
    assert res.weights.tolist() == [1.0, 1.0, 0.0]
    assert res.present is not None and res.present.tolist() == [True, True, False]


# -- loss-based strategies and the step without any present task --------------------------------
@pytest.mark.parametrize("scale", [None, 4.0])
@pytest.mark.parametrize("with_aux", [False, True])
def test_loss_based_backward(scale: float | None, with_aux: bool) -> None:
    """Static weights (2, 0.5, 3) with t2 counted 0: every parameter gets
    ``scale * (sum_t w_t dL_t + d aux)`` with ``w_2 = 0``; the objective is reported unscaled."""
    model = Toy(3, seed=6)
    losses = model.losses()
    aux = model.aux() if with_aux else None
    w = [2.0, 0.5, 0.0]
    total = sum(wt * losses[n] for wt, n in zip(w, names(3), strict=True)) + (
        aux if aux is not None else 0
    )
    params = list(model.parameters())
    ref = [(scale or 1.0) * g for g in grads(total, params)]
    vec = torch.stack([losses[n] for n in names(3)])
    s = build_weighting("static", names(3), {"weights": {"t0": 2.0, "t1": 0.5, "t2": 3.0}})

    res = multitask_backward(
        losses,
        s,
        aux_loss=aux,
        counts={"t0": 1, "t1": 2, "t2": 0},
        grad_scale=None if scale is None else torch.tensor(scale, dtype=F64),
    )

    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)
    check_result(res, float(total.detach()), vec, w, [True, True, False])


@pytest.mark.parametrize("scale", [None, 4.0])
def test_no_present_task_backpropagates_only_the_auxiliary_loss(scale: float | None) -> None:
    """Every task counted 0 (their losses are exactly 0 by design): the objective is the
    auxiliary loss, its gradient times ``grad_scale`` reaches the parameters, the heads get 0,
    every weight is 0 and no task is present."""
    model = Toy(2, seed=7)
    losses = {n: 0.0 * v for n, v in model.losses().items()}  # a loss over no row
    aux = model.aux()
    params = list(model.parameters())
    ref = [(scale or 1.0) * g for g in grads(aux, params)]
    vec = torch.stack([losses[n] for n in names(2)])

    res = multitask_backward(
        losses,
        build_weighting("equal", names(2)),
        aux_loss=aux,
        counts={"t0": 0, "t1": torch.tensor(0)},
        grad_scale=None if scale is None else torch.tensor(scale, dtype=F64),
    )

    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)
    assert float(model.heads[1].weight.grad.abs().max()) == 0.0
    check_result(res, float(aux.detach()), vec, [0.0, 0.0], [False, False])


def test_no_present_task_and_nothing_to_differentiate() -> None:
    """No present task and no auxiliary loss, losses without a graph: nothing to backward, an
    objective of 0."""
    vec = {"a": torch.tensor(0.0, dtype=F64), "b": torch.tensor(0.0, dtype=F64)}
    res = multitask_backward(vec, build_weighting("equal", ["a", "b"]), counts={"a": 0, "b": 0})
    check_result(res, 0.0, torch.zeros(2, dtype=F64), [0.0, 0.0], [False, False])


# -- configuration errors ------------------------------------------------------------------------
def test_configuration_errors_name_the_problem() -> None:
    model = Toy(2, seed=8)
    shared = model.shared()
    with pytest.raises(
        ValueError, match=r"^grad_scale \(fp16\) is for loss-based strategies only$"
    ):
        multitask_backward(
            model.losses(), Probe(names(2)), shared_parameters=shared, grad_scale=torch.tensor(2.0)
        )
    with pytest.raises(
        ValueError,
        match=r"^jacobian_sync: per-task gradients of a representation cannot be combined "
        r"across processes \(each process has its own rows\)$",
    ):
        multitask_backward(
            model.losses(), Probe(names(2), "representation"), jacobian_sync=lambda j: j
        )
    with pytest.raises(
        ConfigError,
        match=r"^balancing strategy Probe works on the gradients of parameters shared by the "
        r"tasks, and this model shares none; use a loss-based strategy$",
    ):
        multitask_backward(model.losses(), Probe(names(2)))
    h = torch.tanh(model.bottom(model.x))
    with pytest.raises(
        ConfigError,
        match=r"^grad_target 'representation': the model gives no tower input for \['t1'\]$",
    ):
        multitask_backward(
            model.losses(), Probe(names(2), "representation"), representation={"t0": h}
        )
    with pytest.raises(
        ConfigError,
        match=r"^grad_target 'representation': every task's tower reads its own input, so the "
        r"tasks share no representation; use grad_target: parameters with this model$",
    ):
        multitask_backward(
            model.losses(),
            Probe(names(2), "representation"),
            representation={"t0": h, "t1": h * 1.0},  # equal values, two distinct tensors
        )


# -- present_mask and task_jacobian ------------------------------------------------------------
@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (None, [True, True, True]),
        ({"a": 0, "b": 1, "c": 5}, [False, True, True]),
        ({"a": torch.tensor(0.5), "c": torch.tensor(0)}, [True, True, False]),  # b not named
        ({}, [True, True, True]),
        ({"a": 1.0, "b": 0.0}, [True, False, True]),
    ],
)
def test_present_mask_marks_the_tasks_with_a_positive_count(
    counts: dict[str, Tensor | float] | None, expected: list[bool]
) -> None:
    got = present_mask(["a", "b", "c"], counts, torch.device("cpu"))
    assert got.dtype == torch.bool and got.tolist() == expected


@pytest.mark.parametrize("counts", [None, {"a": 1}])
def test_present_mask_is_a_bool_tensor_on_the_given_device(counts: dict | None) -> None:
    """The meta device shows where the mask is built without needing an accelerator; no task
    still gives a bool (not float) tensor."""
    meta = present_mask(["a", "b"], counts, torch.device("meta"))
    assert meta.device.type == "meta" and meta.dtype == torch.bool and meta.shape == (2,)
    empty = present_mask([], counts, torch.device("cpu"))
    assert empty.dtype == torch.bool and empty.shape == (0,)


def test_task_jacobian_rows_are_the_tasks_gradients_on_the_losses_device() -> None:
    """``[T, P]`` with one row per task, zero where a task does not reach a parameter; the
    one-hot cotangents live on the losses' device (meta: shapes only, no accelerator)."""
    a = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([3.0], dtype=F64, requires_grad=True)
    losses = torch.stack([(a * a).sum(), a[0] * b[0]])
    j = task_jacobian(losses, [a, b])
    # d(a.a)/da = 2a, d(a0 b0)/da = (b0, 0); d(a.a)/db = 0, d(a0 b0)/db = a0
    want = [[2.0, 4.0, 0.0], [3.0, 0.0, 1.0]]
    torch.testing.assert_close(j, torch.tensor(want, dtype=F64), rtol=0, atol=0)
    m = torch.ones(3, device="meta", requires_grad=True)
    jm = task_jacobian(torch.stack([m.sum(), (m * m).sum()]), [m])
    assert jm.device.type == "meta" and jm.shape == (2, 3)


def test_a_shared_parameter_no_task_reaches_gets_zero_rows_and_a_zero_gradient() -> None:
    """A shared parameter on no loss's path (e.g. used only by a regulariser added later) has
    a zero column block of its own size: torch's ``materialize_grads`` gives such a parameter
    one unbatched zero tensor, which made the Jacobian 4 columns wide instead of 6 below, and
    multitask_backward raised a reshape error. Its gradient after the backward is 0."""
    a = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    unused = torch.ones(2, 2, dtype=F64, requires_grad=True)
    j = task_jacobian(torch.stack([(a * a).sum(), a.sum()]), [a, unused])
    want = [[2.0, 4.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(j, torch.tensor(want, dtype=F64), rtol=0, atol=0)

    torch.manual_seed(0)
    shared = nn.Linear(3, 2).double()
    extra = nn.Parameter(torch.ones(3, dtype=F64))
    x = torch.randn(5, 3, dtype=F64)
    h = shared(x)
    losses = {"t0": h[:, 0].square().mean(), "t1": (h[:, 1] - 1.0).square().mean()}
    params = [*shared.parameters(), extra]
    rows = [flat(grads(losses[n], params)) for n in ("t0", "t1")]
    multitask_backward(losses, build_weighting("mgda", ["t0", "t1"]), shared_parameters=params)
    assert extra.grad is not None
    torch.testing.assert_close(extra.grad, torch.zeros(3, dtype=F64), rtol=0, atol=0)
    # the reachable parameters: MGDA's min-norm combination of the two rows (closed form for
    # two tasks, Sener & Koltun 2018, Algorithm 1)
    g1, g2 = rows
    gamma = float(((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0.0, 1.0))
    want_g = gamma * g1 + (1 - gamma) * g2
    got = flat([p.grad for p in shared.parameters()])
    torch.testing.assert_close(got, want_g[: got.numel()], rtol=1e-6, atol=1e-9)


def test_task_jacobian_of_complex_losses_follows_the_losses_dtype() -> None:
    """The one-hot cotangents take the losses' dtype: with complex values (which the engine
    does not cast from a real cotangent) the rows are PyTorch's gradient of a holomorphic
    function, ``conj(f'(z))`` (its "Autograd for Complex Numbers" convention)."""
    z = torch.tensor([1 + 2j, -0.5 + 1j], dtype=torch.complex128, requires_grad=True)
    j = task_jacobian(torch.stack([(z * z).sum(), (3j * z).sum()]), [z])
    zd = z.detach()
    want = torch.stack([(2 * zd).conj(), torch.full_like(zd, 3j).conj()])
    assert j.dtype == torch.complex128
    torch.testing.assert_close(j, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradient_backward_on_cuda_keeps_everything_on_the_device() -> None:
    """On a GPU the present mask, the one-hot cotangents and the weights stay on the losses'
    device (a CPU mask cannot select among CUDA weights)."""
    model = Toy(3, seed=9).cuda()
    model.x, model.y = model.x.cuda(), model.y.cuda()
    s = Probe(names(3)).cuda()
    res = multitask_backward(
        model.losses(), s, shared_parameters=model.shared(), counts={"t0": 1, "t1": 0, "t2": 2}
    )
    assert res.present is not None and res.present.device.type == "cuda"
    assert res.weights.device.type == "cuda" and res.weights[1] == 0
    assert model.bottom[0].weight.grad is not None and model.bottom[0].weight.grad.is_cuda


def test_gradient_backward_builds_its_tensors_on_the_losses_device() -> None:
    """The CPU stand-in for the CUDA test above: with another default device (meta) in force,
    the present mask, the cotangents and the weights must still be built on the losses' device
    (CPU here), passed explicitly. A mask left to the default device would be a meta tensor,
    whose truth value cannot be read."""
    model = Toy(3, seed=9)
    s = Probe(names(3))
    losses = model.losses()
    with torch.device("meta"):
        res = multitask_backward(
            losses, s, shared_parameters=model.shared(), counts={"t0": 1, "t1": 0, "t2": 2}
        )
    assert res.present is not None and res.present.device.type == "cpu"
    assert res.present.tolist() == [True, False, True]
    assert res.weights.device.type == "cpu" and res.weights[1] == 0
    assert model.bottom[0].weight.grad is not None
