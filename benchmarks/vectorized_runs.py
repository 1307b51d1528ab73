"""Time R runs of a model trained as one vectorised model versus one after another.

Usage::

    python benchmarks/vectorized_runs.py --model mmoe --runs 16 --steps 200 --threads 1

Both train the same R models (same initial weights, same batches, Adam) on MMoE-synthetic data
(preset mmoe-fig2, d = 100) with the sizes of ``mtlrec.analysis.study.STUDY_PARAMS``; prints
steps per second of all R runs together, and the largest parameter difference at the end.
"""

from __future__ import annotations

import argparse
import copy
import time

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import torch

from mtlrec.analysis.study import STUDY_PARAMS, _data
from mtlrec.analysis.vectorized import VectorizedRuns
from mtlrec.batch import Features
from mtlrec.data.synthetic import mmoe_synthetic_schema
from mtlrec.models.build import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r, steps, bsz = args.runs, args.steps, args.batch_size
    xtr, ytr, _, _, meta = _data(0.5, r, 4096, 1, "mmoe-fig2", 0)
    schema = mmoe_synthetic_schema(meta[0]["d"])
    models = []
    for k in range(r):
        torch.manual_seed(k)
        models.append(build_model(args.model, schema, {}, STUDY_PARAMS[args.model]))
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, 4096, (bsz,), generator=g) for _ in range(steps)]

    vr = VectorizedRuns([copy.deepcopy(m) for m in models], lr=1e-3)
    t0 = time.perf_counter()
    for i in idx:
        vr.step(xtr[:, i], ytr[:, i])
    vec = time.perf_counter() - t0

    names = tuple(f"x{i}" for i in range(meta[0]["d"]))
    t0 = time.perf_counter()
    for k, m in enumerate(models):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for i in idx:
            out = m(Features(torch.zeros(bsz, 0, dtype=torch.int32), xtr[k, i], dense_names=names))
            loss = sum(
                ((out.logits[t] - ytr[k, i][:, j]) ** 2).mean() for j, t in enumerate(m.task_names)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    seq = time.perf_counter() - t0
    diff = max(
        float((vr.run_state(k)[n] - p.detach()).abs().max())
        for k, m in enumerate(models)
        for n, p in m.named_parameters()
    )
    print(
        f"{args.model}, R={r}, {steps} steps, batch {bsz}, {args.threads} thread(s): "
        f"vectorised {steps / vec:.1f} steps/s ({vec:.1f} s), one after another "
        f"{steps / seq:.1f} steps/s ({seq:.1f} s), speed-up {seq / vec:.2f}x; "
        f"max |param difference| {diff:.2e}"
    )


if __name__ == "__main__":
    main()
