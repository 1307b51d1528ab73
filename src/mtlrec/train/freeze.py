"""Freezing parameters by name (``training.freeze``) and listing the names to choose from.

A pattern is an ``fnmatch`` pattern (``*``, ``?``, ``[...]``) over a parameter's dotted name
(``model.named_parameters()``: ``embedding.tables.d16.weight``, ``experts.weights.0``,
``heads.towers.click.layers.0.weight``...). It matches a name when it matches the whole name or
the part after any dot, so ``towers.click.*`` matches ``heads.towers.click.layers.0.weight``
and ``experts.*`` matches the experts of every level of PLE. Matching is case-sensitive.

Frozen parameters get ``requires_grad = False`` before the optimiser is built: they get no
gradient, no update and no optimiser state (:func:`mtlrec.train.optimizers.param_groups` leaves
them out). A pattern that matches nothing is an error (a typo would otherwise freeze nothing
silently). Embedding tables of equal width are one fused parameter
(:mod:`mtlrec.nn.embedding`): freezing works on that parameter, all of its tables at once.

Example:
    >>> from mtlrec.testing import tiny_dataset
    >>> from mtlrec.models import build_model
    >>> pre, ds = tiny_dataset(20)
    >>> model = build_model("mmoe", ds.schema, pre.table_sizes(), {"expert_hidden": [8]})
    >>> rep = freeze_parameters(model, ["embedding.*", "towers.click.*"])
    >>> rep.frozen_names[:2]
    ['embedding.tables.d4.weight', 'heads.towers.click.layers.0.weight']
    >>> model.embedding.tables["d4"].weight.requires_grad
    False
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from mtlrec.errors import ConfigError


def name_matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` matches the dotted ``name`` whole or the part after one of its dots.

    Example:
        >>> name_matches("heads.towers.click.layers.0.weight", "towers.click.*")
        True
        >>> name_matches("heads.towers.click.layers.0.weight", "click")
        False
    """
    if fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(1, len(parts)))


def match_parameters(names: Iterable[str], pattern: str) -> list[str]:
    """The names ``pattern`` matches (:func:`name_matches`), in order."""
    return [n for n in names if name_matches(n, pattern)]


@dataclass
class FreezeReport:
    """What ``training.freeze`` froze.

    Attributes:
        by_pattern: pattern -> the parameter names it matched.
        frozen_names: every frozen parameter, in the model's order.
        frozen_values, total_values: numbers of scalar values frozen / in the model.
        total_parameters: parameter tensors in the model.
    """

    by_pattern: dict[str, list[str]] = field(default_factory=dict)
    frozen_names: list[str] = field(default_factory=list)
    frozen_values: int = 0
    total_values: int = 0
    total_parameters: int = 0

    def line(self) -> str:
        """One log line with the counts."""
        share = self.frozen_values / self.total_values if self.total_values else 0.0
        pats = ", ".join(f"{p} ({len(n)})" for p, n in self.by_pattern.items())
        return (
            f"frozen: {len(self.frozen_names)} of {self.total_parameters} parameters, "
            f"{self.frozen_values:,} of {self.total_values:,} values ({share:.1%}), by {pats}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "patterns": {p: len(n) for p, n in self.by_pattern.items()},
            "parameters": self.frozen_names,
            "values": self.frozen_values,
            "total_values": self.total_values,
        }


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> FreezeReport:
    """Set ``requires_grad = False`` on the parameters the patterns match (call before the
    optimiser is built).

    Args:
        model: the model.
        patterns: ``fnmatch`` patterns (:func:`name_matches`).

    Returns:
        The :class:`FreezeReport` (empty without patterns).

    Raises:
        ConfigError: a pattern matches no parameter (the message lists a few names).
    """
    named = dict(model.named_parameters())
    report = FreezeReport(
        total_values=sum(p.numel() for p in named.values()), total_parameters=len(named)
    )
    if not patterns:
        return report
    chosen: set[str] = set()
    for pat in patterns:
        hits = match_parameters(named, pat)
        if not hits:
            shown = ", ".join(list(named)[:6])
            raise ConfigError(
                f"training.freeze: pattern {pat!r} matches no parameter (names look like "
                f"{shown}, ...; mtlrec list-params RUN lists them all)"
            )
        report.by_pattern[pat] = hits
        chosen.update(hits)
    for name, p in named.items():
        if name in chosen:
            p.requires_grad_(False)
            report.frozen_names.append(name)
            report.frozen_values += p.numel()
    return report


def announce(report: FreezeReport) -> None:
    """Write the report's line on stderr (once per group of processes: rank 0 only)."""
    if not report.frozen_names:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    print(report.line(), file=sys.stderr, flush=True)
