"""Safe, vectorised arithmetic over table columns (sample-weight expressions).

An expression is parsed with :mod:`ast` and only numbers, column names, ``+ - * / **``,
comparisons (``< <= > >= == !=``, giving 0/1), and the functions ``log, log1p, exp, sqrt, abs,
minimum, maximum, clip, where`` are accepted: nothing is ``eval``-ed. It is computed on whole
columns at once (numpy), never row by row.

Example:
    >>> import pyarrow as pa
    >>> t = pa.table({"click": [1, 0, 1], "watch": [0.0, 0.0, 3.0]})
    >>> evaluate_expression("where(click == 1, 1 + log1p(watch), 1)", t, file="f").round(3)
    array([1.   , 1.   , 2.386])
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from mtlrec.data.columns import to_float
from mtlrec.errors import DataError

_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "log": np.log,
    "log1p": np.log1p,
    "exp": np.exp,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "minimum": np.minimum,
    "maximum": np.maximum,
    "clip": np.clip,
    "where": lambda c, a, b: np.where(np.asarray(c) != 0, a, b),
}
_BIN = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_CMP = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def parse_expression(expr: str) -> tuple[ast.Expression, list[str]]:
    """Parse and check an expression; returns the tree and the column names it reads.

    Raises:
        ValueError: syntax error or a construct outside the allowed set (named).
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"expression {expr!r} is not valid: {e.msg}") from None
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS:
                raise ValueError(
                    f"expression {expr!r}: only the functions {sorted(_FUNCS)} may be called"
                )
            if node.keywords:
                raise ValueError(f"expression {expr!r}: keyword arguments are not allowed")
        elif isinstance(node, ast.Name):
            if node.id not in _FUNCS:
                names.append(node.id)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BIN:
                raise ValueError(f"expression {expr!r}: operator not allowed")
        elif isinstance(node, ast.Compare):
            if len(node.ops) != 1 or type(node.ops[0]) not in _CMP:
                raise ValueError(f"expression {expr!r}: use one comparison at a time")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, ast.USub | ast.UAdd):
                raise ValueError(f"expression {expr!r}: operator not allowed")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, int | float) or isinstance(node.value, bool):
                raise ValueError(f"expression {expr!r}: only numeric constants are allowed")
        elif not isinstance(node, ast.Expression | ast.Load | ast.operator | ast.cmpop):
            raise ValueError(f"expression {expr!r}: {type(node).__name__} is not allowed")
    return tree, list(dict.fromkeys(names))


def evaluate_expression(expr: str, table: pa.Table, *, file: str) -> np.ndarray:
    """The expression's value for every row, float64 ``[N]``.

    Raises:
        DataError: a column it reads is missing or not numeric.
    """
    tree, names = parse_expression(expr)
    cols: dict[str, np.ndarray] = {}
    for n in names:
        if n not in table.column_names:
            raise DataError(
                f"weight expression {expr!r} reads a missing column", file=file, column=n
            )
        cols[n] = to_float(table.column(n), file=file, column=n)

    def ev(node: ast.AST) -> np.ndarray | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return cols[node.id]
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            return _BIN[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare):
            out = _CMP[type(node.ops[0])](ev(node.left), ev(node.comparators[0]))
            return np.asarray(out, dtype=np.float64)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(f"unexpected node {type(node).__name__}")

    with np.errstate(all="ignore"):
        value = ev(tree)
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (table.num_rows,)).copy()
