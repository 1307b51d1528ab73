"""The mutation-testing set-up (issue 17) stays consistent: the module map of
``benchmarks/mutation.py`` names files that exist, ``[tool.mutmut]`` in pyproject.toml covers
the same core, and every listed equivalent mutant has its file, lines and reason."""

from __future__ import annotations

import fnmatch
import importlib.util
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

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


def test_own_tests_are_the_module_s_mutation_files(mutation: ModuleType) -> None:
    own = mutation.own_tests("weighting")
    assert "tests/unit/test_mutation_weighting.py" in own
    assert all(p.startswith("tests/unit/test_mutation_weighting") for p in own)
    assert mutation.own_tests("data/split") == ["tests/unit/test_mutation_data_split.py"]


NEW_TEST = "from pkg.m import f\n\n\ndef test_f():\n    assert f(1) == 2\n"


def _fake_run(root: Path, ws: Path) -> None:
    """A checkout ``root`` and a kept workspace ``ws`` of module ``mod`` (``src/pkg/m.py``):
    the workspace's mutated tree switches mutant ``f`` or ``g`` on by MUTANT_UNDER_TEST, as
    mutmut's trampolines do. The run's selection was ``test_old.py``; the checkout has since
    gained ``test_mutation_mod.py``, which catches mutant ``f`` and not ``g``."""
    source = "def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x * 2\n"
    mutated = (  # the active mutant is read at call time, as the trampolines do
        "import os\n\n\ndef on():\n    return os.environ.get('MUTANT_UNDER_TEST', '')\n\n\n"
        "def f(x):\n    return x + (2 if on() == 'pkg.m.x_f__mutmut_1' else 1)\n\n\n"
        "def g(x):\n    return x * (2 if on() != 'pkg.m.x_g__mutmut_1' else 2.0)\n"
    )
    old_test = "from pkg.m import g\n\n\ndef test_g():\n    assert g(0) == 0\n"
    files = {
        root / "src/pkg/m.py": source,
        root / "tests/unit/test_old.py": old_test,
        root / "tests/unit/test_mutation_mod.py": NEW_TEST,
        ws / "src/pkg/m.py": source,
        ws / "tests/unit/test_old.py": old_test,
        ws / "mutants/src/pkg/m.py": mutated,
        ws / "pyproject.toml": "[tool.mutmut]\npytest_add_cli_args_test_selection = "
        '["tests/unit/test_old.py"]\n',
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name in ("examples", "docs"):
        (root / name).mkdir()


def _register_fake_module(
    mutation: ModuleType, monkeypatch: pytest.MonkeyPatch, root: Path
) -> None:
    """Point the script at the fake checkout ``root`` and register its module ``mod``
    (src/pkg/m.py, selection tests/unit/test_old.py)."""
    monkeypatch.setattr(mutation, "ROOT", root)
    module = mutation.Module(("src/pkg/m.py",), ("tests/unit/test_old.py",))
    monkeypatch.setitem(mutation.MODULES, "mod", module)


def _two_survivors(mutation: ModuleType) -> Any:
    """The fake run's result: mutants ``f`` and ``g`` of ``src/pkg/m.py`` both survived."""
    res = mutation.ModuleResult("mod", ["src/pkg/m.py"], 0.0, counts={"survived": 2})
    res.survivors = [
        mutation.Survivor(f"pkg.m.x_{fn}__mutmut_1", "survived", "src/pkg/m.py", fn, 2, [])
        for fn in ("f", "g")
    ]
    res.statuses = {s.name: "survived" for s in res.survivors}
    return res


def test_recheck_kills_survivors_with_the_tests_written_since_the_run(
    mutation: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ws = tmp_path / "root", tmp_path / "ws"
    _fake_run(root, ws)
    _register_fake_module(mutation, monkeypatch, root)

    def result():
        return _two_survivors(mutation)

    res = result()
    used = mutation.recheck(ws, "mod", res)
    assert used == ["tests/unit/test_mutation_mod.py"]  # test_old.py ran in the run already
    assert res.error is None
    assert res.counts == {"survived": 1, "killed": 1}
    assert [s.name for s in res.survivors] == ["pkg.m.x_g__mutmut_1"]
    assert res.score == 50.0
    assert mutation.by_file(res) == {
        "src/pkg/m.py": {"mutants": 2, "killed": 1, "equivalent": 0, "not checked": 0, "alive": 1}
    }

    # a changed test file of the run's selection is run again too
    (root / "tests/unit/test_old.py").write_text(
        "from pkg.m import g\n\n\ndef test_g():\n    assert isinstance(g(1), int)\n"
    )
    res = result()
    assert mutation.recheck(ws, "mod", res) == [
        "tests/unit/test_old.py",
        "tests/unit/test_mutation_mod.py",
    ]
    assert res.counts == {"survived": 0, "killed": 2}

    # a failing recheck file fails the recheck instead of killing everything
    (root / "tests/unit/test_mutation_mod.py").write_text("def test_no():\n    assert False\n")
    res = result()
    mutation.recheck(ws, "mod", res)
    assert res.error is not None and "fail without a mutant" in res.error
    assert res.counts == {"survived": 2}

    # and the survivors of a source file changed since the run are not rechecked
    (root / "tests/unit/test_mutation_mod.py").write_text(NEW_TEST)
    (root / "src/pkg/m.py").write_text("def f(x):\n    return x + 3\n")
    res = result()
    mutation.recheck(ws, "mod", res)
    assert res.error is None
    assert res.notes == ["not rechecked, changed since the run (run again): src/pkg/m.py"]
    assert res.counts == {"survived": 2}


def test_recheck_runs_an_own_file_only_for_the_modules_it_names(
    mutation: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ws = tmp_path / "root", tmp_path / "ws"
    _fake_run(root, ws)
    # a second own file would kill g too, but reaches pkg.m only through `from pkg import m`:
    # it is not run for pkg.m's mutants, so g stays alive (the score errs low, never high)
    (root / "tests/unit/test_mutation_mod_indirect.py").write_text(
        "from pkg import m\n\n\ndef test_g():\n    assert isinstance(m.g(1), int)\n"
    )
    _register_fake_module(mutation, monkeypatch, root)
    res = _two_survivors(mutation)
    used = mutation.recheck(ws, "mod", res)
    assert used == ["tests/unit/test_mutation_mod.py", "tests/unit/test_mutation_mod_indirect.py"]
    assert res.error is None
    assert [s.name for s in res.survivors] == ["pkg.m.x_g__mutmut_1"]
    # the same file naming the module kills it
    (root / "tests/unit/test_mutation_mod_indirect.py").write_text(
        "import pkg.m as m\n\n\ndef test_g():\n    assert isinstance(m.g(1), int)\n"
    )
    res = _two_survivors(mutation)
    mutation.recheck(ws, "mod", res)
    assert res.survivors == []
    assert res.counts == {"survived": 0, "killed": 2}


def test_a_file_names_a_module_only_as_a_whole_dotted_name(mutation: ModuleType) -> None:
    text = "from mtlrec.models.esm2 import ESM2\nimport mtlrec.nn.mlp as m\n"
    assert mutation._names(text, "mtlrec.models.esm2")
    assert not mutation._names(text, "mtlrec.models.esm")
    assert mutation._names(text, "mtlrec.nn.mlp")
    assert not mutation._names(text, "mtlrec.nn.ml")


def test_recheck_stops_a_mutant_that_makes_a_loop_endless(
    mutation: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mutant f loops forever: the recheck must stop it and count it as a timeout (killed, as
    # mutmut counts its own timeouts), not wait for it
    root, ws = tmp_path / "root", tmp_path / "ws"
    _fake_run(root, ws)
    (ws / "mutants/src/pkg/m.py").write_text(
        "import os\n\n\ndef f(x):\n"
        "    while os.environ.get('MUTANT_UNDER_TEST') == 'pkg.m.x_f__mutmut_1':\n"
        "        pass\n    return x + 1\n\n\ndef g(x):\n    return x * 2\n"
    )
    _register_fake_module(mutation, monkeypatch, root)
    res = _two_survivors(mutation)
    t0 = time.monotonic()
    mutation.recheck(ws, "mod", res, timeout=2)
    assert time.monotonic() - t0 < 60
    assert res.counts == {"survived": 1, "timeout": 1}
    assert res.statuses["pkg.m.x_f__mutmut_1"] == "timeout"
    assert [s.name for s in res.survivors] == ["pkg.m.x_g__mutmut_1"]
    assert res.score == 50.0
