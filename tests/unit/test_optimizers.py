"""Our optimisers follow torch.optim's update rules step for step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from mtlrec.train.optimizers import SGD, Adagrad, Adam


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    b = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    b.load_state_dict(a.state_dict())
    return a, b


CASES = [
    (
        "adam",
        lambda p: Adam(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    ),
    (
        "adamw",
        lambda p: Adam(p, lr=0.01, weight_decay=0.1, decoupled=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
    (
        "adagrad",
        lambda p: Adagrad(p, lr=0.05, weight_decay=0.01),
        lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=0.01),
    ),
    (
        "sgd",
        lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    ),
]


@pytest.mark.parametrize(("name", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
def test_matches_torch_optim(name, ours, theirs) -> None:
    a, b = _pair()
    oa, ob = ours(a.parameters()), theirs(b.parameters())
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for _ in range(25):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad"])
def test_fallback_formula_matches_fused_kernel(name, monkeypatch) -> None:
    make = dict((c[0], c[1]) for c in CASES)[name]
    a, b = _pair(1)
    oa, ob = make(a.parameters()), make(b.parameters())
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for _ in range(10):
        oa.zero_grad()
        ((a(x) - y) ** 2).mean().backward()
        oa.step()
    for attr in ("_fused_adam_", "_fused_adamw_", "_fused_adagrad_"):
        monkeypatch.setattr(torch, attr, None)
    for _ in range(10):
        ob.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_continues_identically() -> None:
    a, b = _pair(2)
    oa = Adam(a.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randn(16, 2)

    def run(m, o, n):
        for _ in range(n):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()

    run(a, oa, 5)
    b.load_state_dict(a.state_dict())
    ob = Adam(b.parameters(), lr=0.01)
    ob.load_state_dict(oa.state_dict())
    run(a, oa, 5)
    run(b, ob, 5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_sparse_adam_is_lazy_and_matches_dense_on_touched_rows() -> None:
    torch.manual_seed(3)
    e_sparse = nn.Embedding(10, 4, sparse=True)
    e_dense = nn.Embedding(10, 4)
    e_dense.load_state_dict(e_sparse.state_dict())
    before = e_sparse.weight.detach().clone()
    os_, od = Adam(e_sparse.parameters(), lr=0.1), Adam(e_dense.parameters(), lr=0.1)
    ids = torch.tensor([1, 3, 3, 7])
    for m, o in ((e_sparse, os_), (e_dense, od)):
        o.zero_grad()
        m(ids).sum().backward()
        o.step()
    touched = torch.tensor([1, 3, 7])
    untouched = torch.tensor([0, 2, 4, 5, 6, 8, 9])
    torch.testing.assert_close(e_sparse.weight[touched], e_dense.weight[touched])
    assert torch.equal(e_sparse.weight[untouched], before[untouched])


def test_no_dynamo_import() -> None:
    """Building and stepping our optimisers does not import torch._dynamo (~70 MB)."""
    code = (
        "import sys, torch\n"
        "from mtlrec.train.optimizers import Adam\n"
        "m = torch.nn.Linear(3, 1); o = Adam(m.parameters())\n"
        "m(torch.randn(4, 3)).sum().backward(); o.step(); o.zero_grad()\n"
        "assert 'torch._dynamo' not in sys.modules, 'dynamo imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
