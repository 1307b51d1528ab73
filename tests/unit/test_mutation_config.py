"""The mutation-testing set-up (issue 17) stays consistent: the module map of
``benchmarks/mutation.py`` names files that exist, ``[tool.mutmut]`` in pyproject.toml covers
the same core, and every listed equivalent mutant has its file, lines and reason."""

from __future__ import annotations

import fnmatch
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mutation() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mutation_script", ROOT / "benchmarks" / "mutation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_module_has_files_and_existing_tests(mutation: ModuleType) -> None:
    assert set(mutation.MODULES) == {
        *("losses", "metrics", "nn", "models", "weighting", "autograd"),
        *("data/split", "data/encoders", "fusion"),
    }
    for name, module in mutation.MODULES.items():
        assert mutation.module_files(module), name
        existing = [t for t in module.tests if (ROOT / t).is_file()]
        assert existing, f"{name}: none of its test files exists"


def test_pyproject_mutates_the_same_core(mutation: ModuleType) -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert cfg["process_isolation"] == "forkserver"
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("mutmut") for d in dev["optional-dependencies"]["dev"])
    for name, module in mutation.MODULES.items():
        for f in mutation.module_files(module):
            assert any(fnmatch.fnmatch(f, p) for p in cfg["only_mutate"]), (name, f)
            assert not any(fnmatch.fnmatch(f, p) for p in cfg.get("do_not_mutate", [])), f


def test_equivalent_mutants_name_their_file_lines_and_reason(mutation: ModuleType) -> None:
    entries = mutation.load_equivalents(mutation.EQUIVALENTS)
    assert entries
    keys = set()
    for e in entries:
        path = ROOT / e["file"]
        assert path.is_file(), e["file"]
        assert len(e["reason"].split()) >= 5, e
        assert e["before"].strip() != e["after"].strip(), e
        key = (e["file"], e.get("function"), e["before"].strip(), e["after"].strip())
        assert key not in keys, f"listed twice: {key}"
        keys.add(key)


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("mtlrec.losses.x_log1mexp__mutmut_2", "log1mexp"),
        ("mtlrec.losses.xǁMultiTaskLossǁforward__mutmut_11", "MultiTaskLoss.forward"),
        ("mtlrec.data.split.x_split_keys__mutmut_10", "split_keys"),
        ("mtlrec.losses.xǁTaskLossesǁ__init____mutmut_2", "TaskLosses.__init__"),
    ],
)
def test_function_of_a_mutant_name(mutation: ModuleType, name: str, function: str) -> None:
    assert mutation._function_of(name) == function


def test_a_mutant_is_located_at_its_file_line(mutation: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "mod.py").write_text(
        "def other(x):\n    return x > 0\n\n\nclass C:\n    def f(self, x):\n"
        "        y = x + 1\n        return x > 0\n"
    )
    diff = [
        "--- src/pkg/mod.py",
        "+++ src/pkg/mod.py",
        "@@ -1,3 +1,3 @@",
        " def f(self, x):",
        "     y = x + 1",
        "-    return x > 0",
        "+    return x >= 0",
    ]
    path, line = mutation._locate(tmp_path, "pkg.mod.xǁCǁf__mutmut_1", diff)
    assert (path, line) == ("src/pkg/mod.py", 8)  # not line 2, where the same text also is
    assert mutation._changed_lines(diff) == ("return x > 0", "return x >= 0")
