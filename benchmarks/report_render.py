"""Check that ``mtlrec report`` pages render: run a tiny comparison, write the report, decode
every inlined PNG, and take a screenshot with a headless Chromium when one is installed.

Usage::

    python benchmarks/report_render.py --output runs/report-check

Prints the report's size, the number of images, and where the screenshot went (or that no
Chromium was found: ``chromium``, ``chromium-browser``, ``google-chrome`` on PATH).
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pacsv
import yaml


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()

    from PIL import Image

    from mtlrec.analysis.compare import run_compare
    from mtlrec.analysis.report import write_report
    from mtlrec.config import ExperimentConfig
    from mtlrec.testing import tiny_table

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(tiny_table(600), out / "tiny.csv")
    cfg = {
        "data": {"train": "tiny.csv", "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
        "schema": {
            "features": [
                {"type": "sparse", "name": "user", "embedding_dim": 4},
                {"type": "sparse", "name": "item", "embedding_dim": 4},
                {"type": "dense", "name": "price", "transform": "log1p_standardize"},
            ],
            "tasks": [
                {"name": "click", "kind": "binary"},
                {"name": "watch", "kind": "regression", "mask": "click"},
            ],
            "group_column": "user",
        },
        "model": {"name": "mmoe", "params": {"num_experts": 3, "expert_hidden": [16]}},
        "training": {"epochs": 3, "batch_size": 64, "optimizer": {"lr": 0.01}},
        "output_dir": "runs/tiny",
    }
    (out / "exp.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    run_compare(
        ExperimentConfig.load(out / "exp.yaml"),
        ["single_task", "shared_bottom", "mmoe"],
        args.seeds,
        out / "cmp",
    )
    t1 = time.perf_counter()
    page = write_report(out / "cmp", out / "report.html")
    t2 = time.perf_counter()
    html = page.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    for b in imgs:
        Image.open(io.BytesIO(base64.b64decode(b))).load()
    print(
        f"compare {t1 - t0:.1f} s, report {t2 - t1:.1f} s: {page} ({len(html) // 1024} KiB), "
        f"{len(imgs)} PNG images decoded"
    )
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        print("no headless Chromium on PATH: screenshot skipped")
        return 0
    shot = out / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            page.resolve().as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    print(f"screenshot: {shot} ({shot.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
