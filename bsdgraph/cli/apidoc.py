"""docs/api.md, generated from the code: the builder's methods, the notebook API and every CLI command's help.

``python -m bsdgraph.cli.apidoc > docs/api.md`` (``make api-doc``) rewrites it; ``tests/test_docs.py`` fails when
the file and the code disagree, so the reference cannot go stale. Everything comes from ``inspect`` signatures,
docstrings and the argparse parser itself: nothing is written twice.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
from contextlib import redirect_stdout

HEADER = """# API reference

Generated from the code by `python -m bsdgraph.cli.apidoc > docs/api.md` (`make api-doc`); `tests/test_docs.py`
checks that it is current. Tutorials: [docs/tutorials/](tutorials/); the algorithm: [docs/bsd.md](bsd.md).
"""

# what each section documents: (title, intro, objects)
SECTIONS = (
    ("The builder: `bsdgraph.GraphBuilder`",
     "A model's `build()` makes a `GraphBuilder`, calls its methods in topological order (each returns the new "
     "node's name) and returns `g.build()`, which validates the graph.", ("GraphBuilder",)),
    ("The notebook API: `bsdgraph.net`, `fit`, `load`, `Net`",
     "Train and use a network from Python without a model file. `bsdgraph train` and `fit` both run "
     "`bsdgraph.api.train_run`.", ("net", "fit", "load", "Net")),
    ("The training run: `bsdgraph.api.train_run`", "What `fit` and `bsdgraph train` both call.", ("train_run",)),
    ("Declaring a neuron: `bsdgraph.declare_neuron`", "See docs/neurons.md for the declaration language.",
     ("declare_neuron",)),
    ("The learning rule's options: `bsdgraph.BSDConfig`", "A model file's `BSD` dict, or `--bsd KEY=VALUE`.",
     ("BSDConfig",)),
)


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "(no docstring)")


def _signature(name: str, obj, skip_self: bool = False) -> str:
    """``name(a: int, b: str = 'x', *, c=None) -> str``, annotations as written (not quoted strings)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    parts, star_done = [], False
    for i, p in enumerate(sig.parameters.values()):
        if skip_self and i == 0 and p.name == "self":
            continue
        if p.kind == p.KEYWORD_ONLY and not star_done:
            parts.append("*")
        star_done = star_done or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    ret = sig.return_annotation
    arrow = "" if ret is sig.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"{name}({', '.join(parts)}){arrow}"


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined on ``cls`` itself, in source order."""
    return [(k, v) for k, v in cls.__dict__.items()
            if not k.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))]


def _entry(name: str, obj, level: str = "###") -> list[str]:
    lines = [f"{level} `{_signature(name, obj)}`", "", _doc(obj), ""]
    if inspect.isclass(obj):
        for k, v in _members(obj):
            target = v.fget if isinstance(v, property) else v
            title = f"{name}.{k}" if isinstance(v, property) else _signature(f"{name}.{k}", target, skip_self=True)
            lines += [f"- **`{title}`**", "", "  " + _doc(target).replace("\n", "\n  ").replace("\n  \n", "\n\n"), ""]
    return lines


def _cli() -> list[str]:
    from bsdgraph.cli.main import build_parser

    parser = build_parser()
    lines = ["## The command line: `bsdgraph`", "", "Every command's `--help`, as the parser prints it.", ""]
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        # argparse wraps help to the terminal's width: the file must not depend on the terminal
        sub.formatter_class = functools.partial(sub.formatter_class, width=100)
        text = io.StringIO()
        with redirect_stdout(text):
            sub.print_help()
        lines += [f"### `bsdgraph {name}`", "", "```text", text.getvalue().rstrip(), "```", ""]
    return lines


def render_python() -> str:
    """The Python part of docs/api.md (from signatures and docstrings)."""
    import bsdgraph
    from bsdgraph import api

    lines = [HEADER]
    for title, intro, names in SECTIONS:
        lines += [f"## {title}", "", intro, ""]
        for n in names:
            lines += _entry(n, getattr(bsdgraph, n, None) or getattr(api, n))
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole of docs/api.md: the Python part, then every command's help (wrapped at 100 columns whatever the
    terminal; its layout is argparse's, which differs a little between Python versions)."""
    return render_python() + "\n".join(_cli()).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
