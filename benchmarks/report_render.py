"""Check that ``mtlrec report`` pages render: run a tiny comparison, write the report, decode
every inlined PNG, and take a screenshot with a headless Chromium when one is installed.

Usage::

    python benchmarks/report_render.py --output runs/report-check

Prints the report's size, the number of images, and where the screenshot went (or that no
Chromium was found: ``--chromium PATH``, else ``chromium``, ``chromium-browser``,
``google-chrome``, ``chrome``, ``headless_shell`` on PATH). The browser is driven over the
DevTools protocol through ``--remote-debugging-pipe`` (no port): it loads the page, reports
how many images decoded and how many are broken, and takes a full-page PNG, which is checked
for content (colours, dark text pixels). Exit status 1 if the page did not render.

Where no browser can be installed from a CDN, the npm package ``@sparticuz/chromium`` carries
a headless Chromium (brotli-compressed, with its SwiftShader libraries, which must sit beside
the binary); see ``benchmarks/RESULTS.md`` for the steps used here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
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
    ap.add_argument("--chromium", type=Path, help="a Chromium / Chrome / headless_shell binary")
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
    browser = args.chromium or next(
        (
            shutil.which(b)
            for b in ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell")
            if shutil.which(b)
        ),
        None,
    )
    if browser is None:
        print("no headless Chromium (--chromium, or chromium / google-chrome on PATH): skipped")
        return 0
    shot = out / "report.png"
    t3 = time.perf_counter()
    png, info = screenshot(str(browser), page.resolve().as_uri(), width=1280)
    shot.write_bytes(png)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    import numpy as np

    small = np.asarray(img.resize((img.width // 4, img.height // 4)), dtype=np.int32)
    colours = len(np.unique(small.reshape(-1, 3), axis=0))
    dark = int((small.sum(-1) < 200).sum())
    print(
        f"screenshot by {info['product']} in {time.perf_counter() - t3:.1f} s: {shot} "
        f"({img.width}x{img.height} px, {len(png) // 1024} KiB); page: {info['images']} images "
        f"loaded of {info['image_tags']}, {info['broken']} broken, {info['tables']} tables; "
        f"{colours} colours, {dark} dark pixels at 1/4 scale"
    )
    if info["broken"] or info["images"] != len(imgs) or colours < 50 or not dark:
        print("the page did not render as expected")
        return 1
    return 0


class _Pipe:
    """The DevTools protocol over ``--remote-debugging-pipe``: JSON messages ended by NUL,
    written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.w, self.r, self.deadline = write_fd, read_fd, deadline
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _message(self) -> dict:
        import json
        import select

        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the pipe (it exited)")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        import json

        self.next_id += 1
        msg: dict = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._message()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message())


def screenshot(browser: str, url: str, *, width: int = 1280, timeout: float = 60.0):
    """A full-page PNG of ``url`` taken by a headless Chromium driven over the DevTools
    protocol (a pipe, no port), and what the page reports of itself: images loaded, broken
    images (``naturalWidth`` 0), tables."""
    import json
    import tempfile

    cmd_r, cmd_w = os.pipe()  # we write commands, the browser reads them on fd 3
    res_r, res_w = os.pipe()  # the browser writes answers on fd 4

    def child_fds() -> None:
        os.dup2(cmd_r, 3)
        os.dup2(res_w, 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [
                browser,
                "--headless=shell",
                "--no-sandbox",
                "--no-zygote",
                "--single-process",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--mute-audio",
                "--no-first-run",
                "--no-default-browser-check",
                "--font-render-hinting=none",
                f"--window-size={width},900",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=child_fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        pipe = _Pipe(cmd_w, res_r, time.monotonic() + timeout)
        try:
            product = pipe.call("Browser.getVersion")["product"]
            target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
            session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            pipe.call("Page.enable", session)
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            pipe.call("Page.navigate", session, url=url)
            pipe.wait_event("Page.loadEventFired")
            probe = (
                "JSON.stringify({image_tags: document.images.length, "
                "images: [...document.images].filter(i => i.complete && i.naturalWidth > 0)"
                ".length, broken: [...document.images].filter(i => i.naturalWidth === 0).length,"
                " tables: document.querySelectorAll('table').length, "
                "height: document.documentElement.scrollHeight})"
            )
            got = pipe.call("Runtime.evaluate", session, expression=probe, returnByValue=True)
            info = json.loads(got["result"]["value"])
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=min(int(info["height"]), 16000),
                deviceScaleFactor=1,
                mobile=False,
            )
            data = pipe.call("Page.captureScreenshot", session, format="png")["data"]
            with contextlib.suppress(RuntimeError, TimeoutError):  # it may exit first
                pipe.call("Browser.close")
        finally:
            os.close(cmd_w)
            os.close(res_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return base64.b64decode(data), {"product": product, **info}


if __name__ == "__main__":
    sys.exit(main())
