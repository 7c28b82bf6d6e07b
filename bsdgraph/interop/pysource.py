"""Python source that bsdgraph writes (``import-nir -o``) is built as an AST, never by pasting text.

Every value that came from an input file (a NIR graph's name, its notes, node names, attributes) enters the tree
as a literal node (``ast.Constant`` and containers of them), and ``ast.unparse`` writes it with whatever quoting
and escaping it needs. Before anything is written, ``checked_source`` re-parses the text and requires (1) the
same tree back, so no byte of an input string turned into code, and (2) a tree of only the statement shapes the
generator may emit (``Shape``): a docstring, imports from bsdgraph, names bound to literals and one ``build()``
calling the builder with literal arguments. A defect in a generator then fails here, loudly, instead of writing
a file that runs something else.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any


class SourceError(Exception):
    """Generated source failed its check (a bsdgraph defect, never the user's input): nothing was written."""


def literal(value: Any) -> ast.expr:
    """``value`` (None, bool, int, float, str, tuples/lists/dicts of them) as an AST literal."""
    if isinstance(value, float) and math.isnan(value):
        raise SourceError("cannot write NaN as a Python literal")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.copysign(1, value) < 0:
        return ast.UnaryOp(ast.USub(), ast.Constant(-value))  # how the parser reads "-1.5" back
    if value is None or isinstance(value, (bool, int, float, str)):
        return ast.Constant(value)
    if isinstance(value, tuple):
        return ast.Tuple([literal(v) for v in value], ast.Load())
    if isinstance(value, list):
        return ast.List([literal(v) for v in value], ast.Load())
    if isinstance(value, dict):
        return ast.Dict([literal(k) for k in value], [literal(v) for v in value.values()])
    raise SourceError(f"cannot write a {type(value).__name__} as a Python literal: {value!r}")


def name(identifier: str) -> ast.Name:
    return ast.Name(identifier, ast.Load())


def call(func: ast.expr, args: list[ast.expr], **kwargs: ast.expr) -> ast.Call:
    return ast.Call(func, args, [ast.keyword(k, v) for k, v in kwargs.items()])


def attr(obj: str, field: str) -> ast.Attribute:
    return ast.Attribute(name(obj), field, ast.Load())


def function(fname: str, body: list[ast.stmt]) -> ast.FunctionDef:
    """``def fname(): body``, from a parsed template: the fields of FunctionDef differ between Python versions."""
    fn = ast.parse(f"def {fname}():\n    pass").body[0]
    fn.body = body
    return fn


@dataclass(frozen=True)
class Shape:
    """What a generated module may contain: imports from these modules, calls of these functions (a name, or
    ``obj.method``), and attribute reads ``obj.field`` of these objects (e.g. ``Op.LINEAR``)."""

    modules: frozenset[str]
    calls: frozenset[str]
    attribute_objects: frozenset[str]


def checked_source(tree: ast.Module, shape: Shape) -> str:
    """The source text of ``tree``, after checking that it parses back to ``tree`` and stays within ``shape``."""
    ast.fix_missing_locations(tree)
    _check_shape(tree, shape)
    source = ast.unparse(tree) + "\n"
    try:
        back = ast.parse(source)
    except SyntaxError as err:
        raise SourceError(f"generated source does not parse: {err}") from None
    if ast.dump(back) != ast.dump(tree):
        raise SourceError("generated source does not parse back to the tree it was written from")
    return source


# Expression nodes a literal is made of (Load contexts and negative numbers included).
_LITERAL = (ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Load, ast.UnaryOp, ast.USub)


def _check_shape(tree: ast.Module, shape: Shape) -> None:
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            if stmt.module not in shape.modules or stmt.level:
                raise SourceError(f"generated source imports from {stmt.module!r}")
        elif isinstance(stmt, ast.FunctionDef):
            if stmt.args.args or stmt.decorator_list or stmt.args.vararg or stmt.args.kwarg:
                raise SourceError(f"generated function {stmt.name} takes arguments or decorators")
            for inner in stmt.body:
                _check_statement(inner, shape)
        else:
            _check_statement(stmt, shape)


def _check_statement(stmt: ast.stmt, shape: Shape) -> None:
    if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
        _check_expr(stmt.value, shape)
    elif isinstance(stmt, (ast.Expr, ast.Return)) and stmt.value is not None:
        _check_expr(stmt.value, shape)
    else:
        raise SourceError(f"generated source holds a {type(stmt).__name__} statement")


def _check_expr(expr: ast.expr, shape: Shape) -> None:
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            func = node.func
            target = (func.id if isinstance(func, ast.Name) else
                      f"{func.value.id}.{func.attr}" if isinstance(func, ast.Attribute)
                      and isinstance(func.value, ast.Name) else None)
            if target not in shape.calls:
                raise SourceError(f"generated source calls {ast.unparse(func)}")
        elif isinstance(node, ast.Attribute):
            if not isinstance(node.value, ast.Name) or node.value.id not in shape.attribute_objects | {
                    c.split(".")[0] for c in shape.calls if "." in c}:
                raise SourceError(f"generated source reads {ast.unparse(node)}")
        elif not isinstance(node, (*_LITERAL, ast.Name, ast.keyword)):
            raise SourceError(f"generated source holds a {type(node).__name__} expression")
