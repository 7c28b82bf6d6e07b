"""docs/api.md is generated from the code: it must say what the code says now."""

import argparse
from pathlib import Path

from bsdgraph.cli.main import build_parser
from bsdgraph.cli.apidoc import render_python

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"


def test_the_python_reference_is_current():
    assert API.read_text().startswith(render_python()), "docs/api.md is stale: run `make api-doc`"


def test_the_command_reference_names_every_command_and_option():
    """argparse lays help out a little differently per Python version, so the CLI half is checked by content:
    every command and every option string of it is in its section."""
    text = API.read_text()
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        head = f"### `bsdgraph {name}`"
        assert head in text, head
        section = text.split(head, 1)[1].split("\n### ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in section, f"bsdgraph {name} {flag} is missing from docs/api.md: run `make api-doc`"


def test_every_public_builder_method_is_documented():
    from bsdgraph import GraphBuilder

    text = render_python()
    methods = [k for k, v in vars(GraphBuilder).items() if callable(v) and not k.startswith("_")]
    assert all(f"GraphBuilder.{m}(" in text for m in methods)
    assert "(no docstring)" not in text  # every documented object says what it does
    assert "### `fit(" in text and "### `net(" in text and "### `load(" in text
