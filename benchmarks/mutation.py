"""Mutation testing of the numerical core (issue 17), scoped to fit a 2-core machine.

A mutant is a copy of the code with one small change (``>`` for ``>=``, ``0.0`` for ``1.0``, an
argument dropped...); a test suite that catches bugs makes some test fail on it ("killed"). The
score of a module is the share of its mutants killed, after the mutants listed as equivalent
(no test could tell them apart from the original: see ``benchmarks/mutation_equivalent.toml``,
each with its reason) are left out.

The tool is mutmut 3 (``pip install -e '.[dev]'``), configured under ``[tool.mutmut]`` in
pyproject.toml. This script runs it on one module at a time, in a scratch copy of the repository
(the checkout is never touched and no ``mutants/`` folder appears in it):

* only the module's files are mutated (``only_mutate``);
* only the test files that cover the module run (the map ``MODULES`` below, plus
  ``tests/unit/test_mutation_<module>*.py``, written to kill survivors), and of those, for
  each mutant, only the tests that call the mutated function (mutmut's own coverage-based
  selection, recorded in one traced run of those tests);
* ``--max-children`` workers (default 2) under ``nice``.

Usage::

    python benchmarks/mutation.py losses data/split        # modules by name
    python benchmarks/mutation.py --changed origin/main     # the modules a diff touched
    python benchmarks/mutation.py --list                    # the modules and their tests
    python benchmarks/mutation.py metrics --json out.json --fail-under 90
    python benchmarks/mutation.py nn --workdir W --keep    # keep the run's workspace, then
    python benchmarks/mutation.py nn --workdir W --recheck # survivors vs the tests written since
    python benchmarks/mutation.py nn --workdir W --report  # the kept run's results again

It prints, per module, the counts, the score and the time, then every surviving mutant with its
file, line and diff. Exit status 1 if a module scores below ``--fail-under``, 2 if a run fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalent.toml"
# copied into the scratch workspace (tests read examples/ and docs/ by relative paths)
COPIED = ("src", "tests", "pyproject.toml", "README.md", "examples", "docs")


@dataclass(frozen=True)
class Module:
    """What to mutate and which test files cover it (paths relative to the repository)."""

    files: tuple[str, ...]
    tests: tuple[str, ...]
    exclude: tuple[str, ...] = ()


U = "tests/unit/"
P = "tests/properties/"
MODULES: dict[str, Module] = {
    "losses": Module(
        ("src/mtlrec/losses.py",),
        (
            U + "test_losses.py",
            U + "test_numerics_losses.py",
            U + "test_numerics_esmm.py",
            U + "test_weighting_absent.py",
        ),
    ),
    "metrics": Module(
        ("src/mtlrec/metrics/*.py",),
        (U + "test_metrics.py", U + "test_numerics_metrics.py"),
    ),
    "nn": Module(
        ("src/mtlrec/nn/*.py",),
        (
            U + "test_nn.py",
            U + "test_gate_wiring.py",
            U + "test_models_arch.py",
            U + "test_models_gated.py",
            U + "test_wide.py",
            U + "test_models_snr.py",
            U + "test_vocab_growth.py",
            U + "test_auxiliary.py",
            U + "test_bias_tower.py",
            U + "test_models_funnel.py",
            P + "test_models.py",
        ),
        # the TorchRec backend: its tests are multi-process runs (minutes per mutant)
        exclude=("src/mtlrec/nn/torchrec_embedding.py",),
    ),
    "models": Module(
        ("src/mtlrec/models/*.py",),
        (
            U + "test_models_arch.py",
            U + "test_models_gated.py",
            U + "test_gate_wiring.py",
            U + "test_numerics_esmm.py",
            U + "test_models_funnel.py",
            U + "test_models_snr.py",
            U + "test_losses.py",
            U + "test_auxiliary.py",
            U + "test_bias_tower.py",
            U + "test_wide.py",
            P + "test_models.py",
            P + "test_weighting_layers.py",
        ),
    ),
    "weighting": Module(
        ("src/mtlrec/weighting/*.py",),
        (
            U + "test_weighting.py",
            U + "test_weighting_absent.py",
            U + "test_weighting_famo.py",
            U + "test_weighting_gradients.py",
            U + "test_weighting_solvers.py",
            U + "test_weighting_gram.py",
            P + "test_weightings.py",
            P + "test_weighting_layers.py",
        ),
    ),
    "autograd": Module(
        ("src/mtlrec/autograd.py",),
        (U + "test_weighting.py", U + "test_weighting_gradients.py", P + "test_weightings.py"),
    ),
    "data/split": Module(
        ("src/mtlrec/data/split.py",),
        (U + "test_split.py", U + "test_group_split.py"),
    ),
    "data/encoders": Module(
        ("src/mtlrec/data/encoders.py",),
        (
            U + "test_encoders.py",
            U + "test_preprocess.py",
            U + "test_data_api.py",
            P + "test_lookup.py",
        ),
    ),
    "fusion": Module(
        (
            "src/mtlrec/fusion/formulas.py",
            "src/mtlrec/fusion/rank.py",
            "src/mtlrec/fusion/calibration.py",
        ),
        (U + "test_fusion.py", U + "test_numerics_fusion.py"),
    ),
}
KILLED = {"killed", "timeout", "caught by type check"}


@dataclass
class Survivor:
    name: str
    status: str
    file: str
    function: str
    line: int | None
    diff: list[str]
    equivalent: str | None = None  # the reason, when listed as equivalent
    entry: int | None = None  # its index in the equivalents file


@dataclass
class ModuleResult:
    module: str
    files: list[str]
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[Survivor] = field(default_factory=list)
    error: str | None = None
    statuses: dict[str, str] = field(default_factory=dict)  # by mutant name
    notes: list[str] = field(default_factory=list)

    @property
    def equivalent(self) -> int:
        return sum(s.equivalent is not None for s in self.survivors)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def killed(self) -> int:
        return sum(n for status, n in self.counts.items() if status in KILLED)

    @property
    def score(self) -> float | None:
        """Killed / (all - equivalent), in percent; mutants no test reaches count as alive."""
        scored = self.total - self.equivalent - self.counts.get("not checked", 0)
        return 100.0 * self.killed / scored if scored > 0 else None


def module_files(module: Module, only: set[str] | None = None) -> list[str]:
    """The module's Python files that exist (restricted to ``only`` when given)."""
    out = []
    for pattern in module.files:
        for p in sorted(ROOT.glob(pattern)):
            rel = p.relative_to(ROOT).as_posix()
            if rel in module.exclude:
                continue
            if only is None or rel in only:
                out.append(rel)
    return out


def changed_modules(base: str) -> dict[str, list[str]]:
    """Modules with files changed between ``base`` and the working tree (new files included),
    with those files."""
    changed: set[str] = set()
    untracked = ["ls-files", "--others", "--exclude-standard"]
    for cmd in (["diff", "--name-only", base, "--"], untracked):
        res = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
        changed |= set(res.stdout.split())
    out = {}
    for name, module in MODULES.items():
        files = module_files(module, changed)
        if files:
            out[name] = files
    return out


def own_tests(module: str) -> list[str]:
    """The test files written to kill the module's survivors: ``test_mutation_<module>.py`` and
    ``test_mutation_<module>_<part>.py`` (``data/split`` -> ``data_split``)."""
    stem = "test_mutation_" + module.replace("/", "_")
    found = sorted(ROOT.glob(U + stem + ".py")) + sorted(ROOT.glob(U + stem + "_*.py"))
    return [p.relative_to(ROOT).as_posix() for p in found]


def load_equivalents(path: Path) -> list[dict[str, str]]:
    """The equivalent mutants: each a file, the original and mutated line (stripped), why, and
    optionally the function (where the same change is equivalent in one function only)."""
    if not path.is_file():
        return []
    entries = tomllib.loads(path.read_text()).get("equivalent", [])
    for e in entries:
        missing = {"file", "before", "after", "reason"} - set(e)
        if missing:
            raise SystemExit(f"{path}: an [[equivalent]] entry lacks {sorted(missing)}: {e}")
    return entries


def _workspace(base: Path, module: str, files: list[str], tests: list[str]) -> Path:
    """A scratch copy of the repository with ``[tool.mutmut]`` scoped to the module."""
    ws = base / re.sub(r"[^A-Za-z0-9]+", "-", module)
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, ws / name)
    text = (ROOT / "pyproject.toml").read_text()
    cfg = tomllib.loads(text).get("tool", {}).get("mutmut", {})
    cfg["only_mutate"] = files
    cfg["pytest_add_cli_args_test_selection"] = tests
    start = text.find("[tool.mutmut]")
    if start >= 0:  # drop the repository's section, write the scoped one
        nxt = re.search(r"^\[(?!tool\.mutmut\])", text[start + 1 :], flags=re.M)
        end = start + 1 + nxt.start() if nxt else len(text)
        text = text[:start] + text[end:]
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
    (ws / "pyproject.toml").write_text(text.rstrip() + "\n" + "\n".join(lines) + "\n")
    return ws


def _mutmut(ws: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "mutmut"
    cmd = [str(exe) if exe.is_file() else "mutmut", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    if log is None:
        return subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ws, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")


def _function_span(source: list[str], func: str) -> tuple[int, int]:
    """1-based first and last line of function ``func`` (``name`` or ``Class.name``)."""
    import ast

    tree = ast.parse("\n".join(source))
    parts = func.split(".")
    nodes: list[Any] = [tree]
    for part in parts:
        found = None
        for node in nodes[-1].body:
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and node.name == part
            ):
                found = node
        if found is None:
            return 1, len(source)
        nodes.append(found)
    node = nodes[-1]
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return first, node.end_lineno or len(source)


def _function_of(name: str) -> str:
    """``name`` or ``Class.name`` of a mutmut mutant name (``pkg.mod.x_f__mutmut_3``,
    ``pkg.mod.xǁClassǁmethod__mutmut_3``)."""
    mangled = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    if mangled.startswith("x_"):
        return mangled[2:]
    return mangled.removeprefix("x").replace("ǁ", ".").strip(".")


def _locate(ws: Path, name: str, diff: list[str]) -> tuple[str, int | None]:
    """File and 1-based line of a mutant from its name and diff (mutmut's diffs count lines
    from the function's start)."""
    path = next((ln[4:].strip() for ln in diff if ln.startswith("--- ")), "")
    func = _function_of(name)
    removed = next(
        (ln[1:].strip() for ln in diff if ln.startswith("-") and not ln.startswith("---")), None
    )
    src_path = ws / path
    if not path or not src_path.is_file() or removed is None:
        return path, None
    source = src_path.read_text().splitlines()
    first, last = _function_span(source, func)
    hunk = next((ln for ln in diff if ln.startswith("@@")), "")
    m = re.match(r"@@ -(\d+)", hunk)
    rel = 0
    if m:  # the hunk starts at function line m; the change is after its context lines
        body = [ln for ln in diff[diff.index(hunk) + 1 :]]
        ctx = next((i for i, ln in enumerate(body) if ln.startswith("-")), 0)
        rel = int(m.group(1)) - 1 + ctx
    guess = first + rel
    matches = [i + 1 for i in range(first - 1, last) if source[i].strip() == removed]
    if not matches:
        return path, guess
    return path, min(matches, key=lambda i: abs(i - guess))


def _changed_lines(diff: list[str]) -> tuple[str, str]:
    before = [ln[1:].strip() for ln in diff if ln.startswith("-") and not ln.startswith("---")]
    after = [ln[1:].strip() for ln in diff if ln.startswith("+") and not ln.startswith("+++")]
    return "\n".join(before), "\n".join(after)


def _equivalent(s: Survivor, equivalents: list[dict[str, str]]) -> int | None:
    """Index of the equivalents entry that lists the mutant, if any."""
    before, after = _changed_lines(s.diff)
    for i, e in enumerate(equivalents):
        if e.get("function", s.function) != s.function:
            continue
        if e["file"] == s.file and e["before"].strip() == before and e["after"].strip() == after:
            return i
    return None


def run_module(
    module: str,
    files: list[str],
    *,
    base: Path,
    max_children: int,
    equivalents: list[dict[str, str]],
) -> ModuleResult:
    tests = [t for t in MODULES[module].tests if (ROOT / t).is_file()] + own_tests(module)
    ws = _workspace(base, module, files, tests)
    t0 = time.monotonic()
    run = _mutmut(ws, "run", "--max-children", str(max_children), log=ws / "mutmut-run.log")
    seconds = time.monotonic() - t0
    if run.returncode != 0:
        result = ModuleResult(module, files, seconds)
        tail = "\n".join(run.stdout.replace("\r", "\n").splitlines()[-15:])
        result.error = f"mutmut run exited {run.returncode} (log: {ws / 'mutmut-run.log'}):\n{tail}"
        return result
    return collect(ws, module, files, seconds, equivalents)


# mutmut's own functions behind `mutmut show`, called once for many mutants (a `mutmut show`
# process per mutant costs ~0.5-3 s each); any failure falls back to `mutmut show`
_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in sys.argv[1:]}))
"""


def _diffs(ws: Path, names: list[str]) -> dict[str, str]:
    """The diffs of mutants ``names`` by name ({} if mutmut's functions cannot be called)."""
    if not names:
        return {}
    run = subprocess.run(
        [sys.executable, "-c", _DIFFS, *names], cwd=ws, capture_output=True, text=True
    )
    try:
        return dict(json.loads(run.stdout)) if run.returncode == 0 else {}
    except json.JSONDecodeError:
        return {}


def collect(
    ws: Path, module: str, files: list[str], seconds: float, equivalents: list[dict[str, str]]
) -> ModuleResult:
    """The results of a finished ``mutmut run`` in workspace ``ws``."""
    result = ModuleResult(module, files, seconds)
    listing = _mutmut(ws, "results", "--all", "true")
    statuses: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    for status in statuses.values():
        result.counts[status] = result.counts.get(status, 0) + 1
    result.statuses = statuses
    shown = [n for n, st in statuses.items() if st not in KILLED and st != "not checked"]
    diffs = _diffs(ws, shown)
    for name, status in sorted(statuses.items()):
        if status in KILLED or status == "not checked":  # (a stopped run's rest: no diff)
            continue
        if name in diffs:
            diff = diffs[name].splitlines()
        else:
            shown = _mutmut(ws, "show", name).stdout.splitlines()
            diff = [ln for ln in shown if not ln.startswith("# ")]
        path, line = _locate(ws, name, diff)
        s = Survivor(name, status, path, _function_of(name), line, diff)
        s.entry = _equivalent(s, equivalents)
        s.equivalent = None if s.entry is None else equivalents[s.entry]["reason"]
        result.survivors.append(s)
    return result


def _selection(ws: Path) -> list[str]:
    """The test files of the run kept in workspace ``ws`` (its ``[tool.mutmut]`` section)."""
    cfg = tomllib.loads((ws / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(cfg.get("pytest_add_cli_args_test_selection", []))


def _source_module(name: str) -> str:
    """The dotted module of a mutant (``pkg.mod.x_f__mutmut_3`` -> ``pkg.mod``)."""
    return name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[0]


def _names(text: str, module: str) -> bool:
    """Whether a test file's text names the dotted ``module`` (``mtlrec.models.esm2`` is not
    ``mtlrec.models.esm``)."""
    return re.search(re.escape(module) + r"(?![\w])", text) is not None


def _file_of(name: str) -> str:
    """The source file of a mutant (``pkg.mod.x_f__mutmut_3`` -> ``src/pkg/mod.py``, or
    ``src/pkg/mod/__init__.py`` for a package)."""
    path = "src/" + _source_module(name).replace(".", "/")
    return path + "/__init__.py" if (ROOT / path).is_dir() else path + ".py"


def by_file(res: ModuleResult) -> dict[str, dict[str, int]]:
    """Per source file: mutants, killed, equivalent, not checked (a stopped run), alive."""
    equivalent = {s.name for s in res.survivors if s.equivalent is not None}
    out: dict[str, dict[str, int]] = {}
    for name, status in res.statuses.items():
        row = out.setdefault(
            _file_of(name),
            {"mutants": 0, "killed": 0, "equivalent": 0, "not checked": 0, "alive": 0},
        )
        row["mutants"] += 1
        if status in KILLED:
            row["killed"] += 1
        elif name in equivalent:
            row["equivalent"] += 1
        elif status == "not checked":
            row["not checked"] += 1
        else:
            row["alive"] += 1
    return dict(sorted(out.items()))


def _differs(a: Path, b: Path) -> bool:
    return not b.is_file() or a.read_bytes() != b.read_bytes()


# Run by each recheck worker in the mutated tree: import the heavy modules once, then fork a
# child per mutant (as mutmut's fork server does: no test has run in the parent) that switches
# the mutant on (mutmut's trampolines read MUTANT_UNDER_TEST at call time) and runs the files.
_RECHECK_DRIVER = """
import importlib, json, os, signal, sys
import pytest
for m in sys.argv[1].split(","):
    importlib.import_module(m)
with open(sys.argv[2], encoding="utf-8") as fh:
    plan = json.load(fh)  # mutant -> the test files to run
timeout = int(sys.argv[3])  # seconds: a mutant that makes a loop endless is stopped (SIGALRM)
for name in sys.argv[4:]:
    files = plan[name]
    if not files:
        print("RESULT", name, 0, flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.environ["MUTANT_UNDER_TEST"] = name
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        signal.alarm(timeout)
        code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *files]))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("RESULT", name, os.waitstatus_to_exitcode(status), flush=True)
"""


def recheck(
    ws: Path,
    module: str,
    result: ModuleResult,
    max_children: int = 2,
    timeout: int | None = None,
) -> list[str]:
    """Run the survivors of a kept workspace against the test files written or changed since
    its run.

    mutmut resets every result when its test selection changes, so new tests (a
    ``test_mutation_<module>*.py`` file, a file added to ``MODULES``) would otherwise cost a
    full run. A survivor passed every test of the run's selection; here each one runs only
    the test files that were not in it or changed since (copied from the checkout into the
    workspace's mutated tree, ``-x``), and a failure kills it. The module's own
    ``test_mutation_*`` files run only for the mutants of the source modules they name (e.g.
    ``mtlrec.nn.gates``): a file that reaches a module only indirectly may kill some of its
    mutants, which the score then leaves alive (it errs low, never high), and the recheck stays
    within minutes instead of running every file for every survivor. The module's source must
    be the one that was mutated. The same files must pass with no mutant first, or nothing is
    rechecked. A mutant whose run outlasts ``timeout`` seconds (default: 10 times that run
    without a mutant, at least 60 s; an endless loop) is stopped and counted as a timeout, as
    mutmut counts them. Returns the files used; the survivors' statuses are updated.
    """
    changed = {f for f in result.files if _differs(ROOT / f, ws / f)}
    if changed:  # its mutants were made from another source: their verdicts stand as they are
        result.notes.append(
            "not rechecked, changed since the run (run again): " + ", ".join(sorted(changed))
        )
    old = set(_selection(ws))
    module_tests = [*MODULES[module].tests, *own_tests(module)]
    new = [
        t
        for t in module_tests
        if (ROOT / t).is_file() and (t not in old or _differs(ROOT / t, ws / t))
    ]
    if not new:
        return []
    tree = ws / "mutants"
    for name in ("tests", "examples", "docs"):  # the checkout's tests and what they read
        shutil.copytree(ROOT / name, tree / name, dirs_exist_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        PYTHONPATH=str(tree / "src"),
    )
    env.pop("MUTANT_UNDER_TEST", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    t0 = time.monotonic()
    base = subprocess.run([*cmd, *new], cwd=tree, env=env, capture_output=True, text=True)
    if timeout is None:  # every mutant runs a subset of these files
        timeout = max(60, math.ceil(10 * (time.monotonic() - t0)))
    if base.returncode != 0:
        tail = "\n".join(base.stdout.splitlines()[-15:])
        result.error = f"the recheck's tests fail without a mutant ({' '.join(new)}):\n{tail}"
        return new
    todo = [
        s
        for s in result.survivors
        if s.equivalent is None
        # a crash (segfault) or a slow run (suspicious) in the run was no verdict either way
        and s.status in ("survived", "no tests", "segfault", "suspicious")
        and _file_of(s.name) not in changed
    ]
    imports = [
        f[len("src/") : -len(".py")].replace("/", ".").removesuffix(".__init__")
        for f in result.files
    ]
    own = set(own_tests(module))
    texts = {t: (ROOT / t).read_text(encoding="utf-8") for t in new if t in own}
    plan = {
        s.name: [t for t in new if t not in own or _names(texts[t], _source_module(s.name))]
        for s in todo
    }
    plan_file = tree / "recheck-plan.json"  # a file: one argument is limited to 128 KiB
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _RECHECK_DRIVER, ",".join(imports), str(plan_file)]
            + [str(timeout)]
            + [s.name for s in todo[i::max_children]],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(max(1, min(max_children, len(todo))))
    ]
    exit_codes: dict[str, int] = {}
    for w in workers:
        out, _ = w.communicate()
        for line in out.splitlines():
            if line.startswith("RESULT "):
                _, name, code = line.split()
                exit_codes[name] = int(code)
    for s in todo:
        if s.name not in exit_codes:  # a worker failed before its tests (its stderr is shown)
            raise RuntimeError(f"the recheck did not report mutant {s.name}")
        if exit_codes[s.name] != 0:
            verdict = "timeout" if exit_codes[s.name] == -signal.SIGALRM else "killed"
            result.counts[s.status] -= 1
            result.counts[verdict] = result.counts.get(verdict, 0) + 1
            s.status = result.statuses[s.name] = verdict
    result.survivors = [s for s in result.survivors if s.status not in KILLED]
    return new


def stale_equivalents(res: ModuleResult, equivalents: list[dict[str, str]]) -> list[str]:
    """Entries for the module's files that matched no surviving mutant of this run (the line
    changed, or a test now kills the mutant): to update or remove."""
    used = {s.entry for s in res.survivors}
    return [
        f"{e['file']}: {e['before'].strip()!r} -> {e['after'].strip()!r}"
        for i, e in enumerate(equivalents)
        if e["file"] in res.files and i not in used
    ]


def report(res: ModuleResult) -> str:
    out = [f"== {res.module} ({', '.join(res.files)}): {res.seconds:.0f} s"]
    if res.error:
        return "\n".join([*out, res.error])
    counts = ", ".join(f"{n} {status}" for status, n in sorted(res.counts.items()))
    score = "n/a" if res.score is None else f"{res.score:.1f}%"
    out.append(
        f"   {res.total} mutants: {counts}; {res.equivalent} listed as equivalent; "
        f"score {score} (killed {res.killed} of {res.total - res.equivalent})"
    )
    out.extend("   " + note for note in res.notes)
    files = by_file(res)
    if len(files) > 1:
        out.append("   per file: mutants, killed, equivalent, not checked, alive, score")
        for f, row in files.items():
            scored = row["mutants"] - row["equivalent"] - row["not checked"]
            score = f"{100.0 * row['killed'] / scored:.1f}%" if scored else "n/a"
            out.append(
                f"     {f:<44} {row['mutants']:>5} {row['killed']:>6} {row['equivalent']:>5} "
                f"{row['not checked']:>5} {row['alive']:>5}  {score}"
            )
    alive = [s for s in res.survivors if s.equivalent is None]
    if alive:
        out.append(f"   surviving mutants ({len(alive)}):")
    for s in alive:
        out.append(f"   {s.file}:{s.line}  {s.status}  {s.name}")
        out.extend(
            "       " + ln
            for ln in s.diff
            if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"modules: {', '.join(MODULES)}")
    ap.add_argument("--changed", metavar="BASE", help="the modules `git diff BASE` touched")
    ap.add_argument("--list", action="store_true", help="print the modules and their tests")
    ap.add_argument("--max-children", type=int, default=2, help="parallel test workers")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the run (0: none)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument(
        "--report",
        action="store_true",
        help="no new run: print the results of the kept run in --workdir",
    )
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="no new run: read the kept run in --workdir and run its survivors against the "
        "test files written since (see recheck())",
    )
    ap.add_argument("--equivalents", type=Path, default=EQUIVALENTS)
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    ap.add_argument("--fail-under", type=float, help="exit 1 if a module scores below this")
    args = ap.parse_args(argv)

    if args.list:
        for name, m in MODULES.items():
            print(f"{name}: {', '.join(module_files(m))}\n    tests: {', '.join(m.tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown modules {unknown}; choose from {list(MODULES)}")
    todo = {m: module_files(MODULES[m]) for m in args.modules}
    if args.changed:
        for m, files in changed_modules(args.changed).items():
            todo.setdefault(m, files)
        if not todo:
            print(f"no file of the mutated modules changed since {args.changed}")
            return 0
    if not todo:
        ap.error("name modules, or pass --changed BASE or --list")
    if args.nice:
        os.nice(args.nice)
    equivalents = load_equivalents(args.equivalents)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="mtlrec-mutation-"))
    results = []
    if (args.recheck or args.report) and args.workdir is None:
        ap.error("--recheck and --report read a kept run: pass its --workdir")
    try:
        for module, files in todo.items():
            if args.recheck or args.report:
                ws = base / re.sub(r"[^A-Za-z0-9]+", "-", module)
                t0 = time.monotonic()
                res = collect(ws, module, files, 0.0, equivalents)
                if args.recheck:
                    used = recheck(ws, module, res, args.max_children)
                    print(f"   rechecked with {', '.join(used) or 'no new test file'}", flush=True)
                res.seconds = time.monotonic() - t0
            else:
                res = run_module(
                    module,
                    files,
                    base=base,
                    max_children=args.max_children,
                    equivalents=equivalents,
                )
            print(report(res), flush=True)
            if not res.error and (stale := stale_equivalents(res, equivalents)):
                print(f"   equivalent entries that matched nothing ({args.equivalents.name}):")
                print("\n".join("   " + line for line in stale), flush=True)
            results.append(res)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    print("\nmodule            mutants  equivalent  killed  score    seconds")
    for r in results:
        score = "error" if r.error else ("n/a" if r.score is None else f"{r.score:.1f}%")
        print(
            f"{r.module:<17} {r.total:>7}  {r.equivalent:>10}  {r.killed:>6}  {score:>6}  "
            f"{r.seconds:>8.0f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**asdict(r), "score": r.score, "equivalent": r.equivalent} for r in results],
                indent=2,
            )
        )
    if any(r.error for r in results):
        return 2
    if args.fail_under is not None and any(
        r.score is not None and r.score < args.fail_under for r in results
    ):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
