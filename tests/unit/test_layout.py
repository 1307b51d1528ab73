"""The package's layout: no two modules import each other, and the public API stays put."""

from __future__ import annotations

import ast
from pathlib import Path

import mtlrec

SRC = Path(mtlrec.__file__).parent


def _module_names() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the mtlrec modules it imports anywhere (top level, functions, TYPE_CHECKING)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                if n.startswith("mtlrec"):
                    target = resolve(n)
                    if target and target != m:
                        edges[m].add(target)
    return edges


def test_no_two_modules_import_each_other() -> None:
    edges = _imports(_module_names())
    pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges[b]})
    assert pairs == [], f"modules importing each other: {pairs}"


def test_the_checker_sees_a_cycle() -> None:
    """The check above would catch a pair (guards against a resolver that sees nothing)."""
    edges = _imports(_module_names())
    assert "mtlrec.train.state" in edges["mtlrec.train.callbacks"]
    assert "mtlrec.train.callbacks" in edges["mtlrec.train.trainer"]


def test_public_api_is_stable() -> None:
    for name in (
        "ColumnarDataset",
        "DenseFeature",
        "ExperimentConfig",
        "ModelOutput",
        "MultiTaskModel",
        "Preprocessor",
        "Schema",
        "SequenceFeature",
        "SparseFeature",
        "TaskSpec",
        "Trainer",
        "TrainingConfig",
        "build_model",
        "build_weighting",
        "load_run",
        "train_run",
    ):
        assert hasattr(mtlrec, name), name
    from mtlrec.export import ExportedModel, export_run  # noqa: F401
    from mtlrec.metrics import MetricSet, auc, gauc, is_better, logloss  # noqa: F401
