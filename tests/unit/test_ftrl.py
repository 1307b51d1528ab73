"""FTRL-Proximal (McMahan et al., KDD 2013, Algorithm 1): the paper's per-coordinate update on a
hand-worked case, exact zeros under L1, sparse rows, schedules and the state round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtlrec.train.ftrl import FTRL, ftrl_update

# alpha = 1, beta = 1, lambda1 = 0.5, lambda2 = 1; both coordinates start at w = 0, z = n = 0.
# Coordinate a gets gradients 3, 4, -12 (n = 9, 25, 169: square roots 3, 5, 13); coordinate b
# gets 0.4, 0.3, -1.2 (n = 0.16, 0.25, 1.69: square roots 0.4, 0.5, 1.3). Worked by hand:
#
#   a, step 1: sigma = 3;  z = 3;                        w = -(3 - 0.5) / (4 + 1) = -1/2
#   a, step 2: sigma = 2;  z = 3 + 4 + 2 * 1/2 = 8;      w = -(8 - 0.5) / (6 + 1) = -15/14
#   a, step 3: sigma = 8;  z = 8 - 12 + 8 * 15/14 = 32/7; w = -(32/7 - 1/2) / (14 + 1) = -19/70
#   b, step 1: sigma = 0.4; z = 0.4 (|z| <= 0.5)         w = 0
#   b, step 2: sigma = 0.1; z = 0.7;                     w = -(0.7 - 0.5) / (1.5 + 1) = -0.08
#   b, step 3: sigma = 0.8; z = 0.7 - 1.2 + 0.8 * 0.08 = -0.436 (|z| <= 0.5): w = 0
GRADS = [(3.0, 0.4), (4.0, 0.3), (-12.0, -1.2)]
HAND = [  # (z_a, n_a, w_a), (z_b, n_b, w_b) after each step
    ((3.0, 9.0, -0.5), (0.4, 0.16, 0.0)),
    ((8.0, 25.0, -15 / 14), (0.7, 0.25, -0.08)),
    ((32 / 7, 169.0, -19 / 70), (-0.436, 1.69, 0.0)),
]
SETTINGS = {"lr": 1.0, "beta": 1.0, "l1": 0.5, "l2": 1.0}


def test_equals_the_papers_update_on_a_hand_worked_case() -> None:
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = FTRL([w], **SETTINGS)
    for g, want in zip(GRADS, HAND, strict=True):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        st = opt.state[w]
        for k, (z, n, wv) in enumerate(want):
            assert st["z"][k].item() == pytest.approx(z, abs=1e-12)
            assert st["n"][k].item() == pytest.approx(n, abs=1e-12)
            assert w[k].item() == pytest.approx(wv, abs=1e-12)
    assert w[1].item() == 0.0  # exactly, not nearly


def test_the_function_and_the_optimizer_agree_and_start_from_the_current_weight() -> None:
    """The z update uses the parameter's current value (here not 0) as w_t."""
    w0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    g = torch.tensor([0.5, 0.1], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    z, _, w = ftrl_update(w0, g, zero, zero, alpha=0.5, beta=1.0, l1=0.0, l2=0.0)
    # sigma = |g| / alpha; z = g - sigma * w0
    torch.testing.assert_close(z, g - g.abs() / 0.5 * w0)
    torch.testing.assert_close(w, -z / ((1.0 + g.abs()) / 0.5))
    p = torch.nn.Parameter(w0.clone())
    opt = FTRL([p], lr=0.5, beta=1.0)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), w)


def test_l1_gives_exact_zeros_where_z_is_within_lambda1() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = FTRL([p], lr=0.1, l1=1.0)
    for _ in range(5):
        p.grad = torch.randn(1000) * torch.linspace(0.0, 1.0, 1000)  # small to large
        opt.step()
    z = opt.state[p]["z"]
    inside = z.abs() <= 1.0
    assert inside.any() and (~inside).any()
    assert torch.all(p[inside] == 0.0)  # exact zeros
    assert torch.all(p[~inside] != 0.0)
    # without L1 the same gradients leave (almost) nothing at exactly zero
    q = torch.nn.Parameter(torch.zeros(1000))
    opt2 = FTRL([q], lr=0.1)
    torch.manual_seed(0)
    for _ in range(5):
        q.grad = torch.randn(1000) * torch.linspace(0.0, 1.0, 1000)
        opt2.step()
    assert int((q == 0).sum()) <= 1


def test_sparse_gradients_update_only_the_touched_rows_as_the_dense_update() -> None:
    torch.manual_seed(1)
    sparse = torch.nn.Embedding(6, 3, sparse=True)
    dense = torch.nn.Embedding(6, 3)
    dense.weight.data.copy_(sparse.weight.data)
    before = sparse.weight.detach().clone()
    o1 = FTRL(sparse.parameters(), lr=0.2, l1=0.01, l2=0.1)
    o2 = FTRL(dense.parameters(), lr=0.2, l1=0.01, l2=0.1)
    ids = torch.tensor([1, 4, 1])  # row 1 twice: its gradients add up
    target = torch.randn(3, 3)
    for m, o in ((sparse, o1), (dense, o2)):
        ((m(ids) - target) ** 2).sum().backward()
        o.step()
    assert sparse.weight.grad is not None and sparse.weight.grad.is_sparse
    touched = torch.tensor([1, 4])
    torch.testing.assert_close(sparse.weight[touched], dense.weight[touched])
    untouched = torch.tensor([0, 2, 3, 5])
    # dense FTRL sets an untouched row to the closed form of z = n = 0 (zero); the sparse
    # update leaves it alone
    assert torch.equal(sparse.weight[untouched], before[untouched])
    assert torch.all(dense.weight[untouched] == 0)
    assert torch.all(o1.state[sparse.weight]["n"][untouched] == 0)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(2)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    oa = FTRL([a], lr=0.3, beta=0.5, l1=0.05, l2=0.2)
    grads = [torch.randn(4, 3) for _ in range(4)]
    for g in grads[:2]:
        a.grad = g.clone()
        oa.step()
    b.data.copy_(a.data)
    ob = FTRL([b], lr=1.0)  # settings come back from the state dict
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from a file: no shared tensors
    assert ob.param_groups[0]["l1"] == 0.05 and ob.param_groups[0]["lr"] == 0.3
    for g in grads[2:]:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    assert torch.equal(oa.state[a]["z"], ob.state[b]["z"])


def test_lr_is_alpha_and_schedulers_scale_it() -> None:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = FTRL([p], lr=1.0, beta=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    p.grad = torch.tensor([3.0], dtype=torch.float64)
    opt.step()
    sched.step()
    # alpha = 0.5: z = 3, n = 9, w = -3 / ((1 + 3) / 0.5) = -3/8
    assert p.item() == pytest.approx(-3 / 8)
    assert math.isclose(opt.state[p]["z"].item(), 3.0)


def test_invalid_settings_are_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="alpha"):
        FTRL([p], lr=0.0)
    with pytest.raises(ValueError, match="l1"):
        FTRL([p], l1=-1.0)
