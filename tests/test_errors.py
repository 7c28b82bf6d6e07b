"""Every error a user can cause is a ``UserError`` (bsdgraph/errors.py), and the command line reports them all in
one place: their own lines, their own exit code, never a traceback."""

import importlib
import inspect
import pkgutil

import pytest

import bsdgraph
from bsdgraph.cli.main import main
from bsdgraph.errors import UsageError, UserError

# Exceptions that never reach the user as such: each is caught inside bsdgraph and turned into something that does
# (a Diagnostic of a GraphError), or it marks a defect of bsdgraph, which must stay a traceback.
INTERNAL = {
    "bsdgraph.ir.infer.ShapeError",        # a shape rule's refusal: infer and validate turn it into a Diagnostic
    "bsdgraph.interop.nir.MappingError",   # a NIR node with no exact bsdgraph form: a Diagnostic naming that node
    "bsdgraph.interop.pysource.SourceError",  # generated source failed its own check: a bsdgraph defect
}


def package_exceptions() -> dict[str, type]:
    """Every exception class defined in bsdgraph, by qualified name (``bsdgraph.__main__`` runs the CLI: skipped)."""
    found = {}
    for info in pkgutil.walk_packages(bsdgraph.__path__, "bsdgraph."):
        if info.name == "bsdgraph.__main__":
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_the_walk_finds_the_package_exceptions():
    found = package_exceptions()
    assert {"bsdgraph.errors.UserError", "bsdgraph.train.data.DataError", "bsdgraph.ir.infer.ShapeError",
            "bsdgraph.runtime.common.ExecutionError"} <= set(found)


def test_every_exception_is_a_user_error_or_declared_internal():
    found = package_exceptions()
    stray = sorted(name for name, cls in found.items() if not issubclass(cls, UserError) and name not in INTERNAL)
    assert not stray, (f"{stray}: derive each from bsdgraph.errors.UserError (the CLI reports it as one line), or "
                       "add it to INTERNAL with the reason it never reaches the user")
    assert not sorted(INTERNAL - set(found)), "INTERNAL names a class that no longer exists"
    assert not [name for name in INTERNAL if issubclass(found[name], UserError)], "INTERNAL names a UserError"


def test_exit_codes_are_1_for_bad_input_and_2_for_usage():
    codes = {name: cls.exit_code for name, cls in package_exceptions().items() if issubclass(cls, UserError)}
    assert {name: code for name, code in codes.items() if code != 1} == {"bsdgraph.errors.UsageError": 2}


def test_execution_error_is_still_a_runtime_error():
    """The communicator guards collectives with ``except RuntimeError``; a node's failure must stay one."""
    from bsdgraph.ir.graph import Op
    from bsdgraph.runtime.common import ExecutionError

    err = ExecutionError("fc1", Op.LINEAR, ValueError("boom\nsecond line"))
    assert isinstance(err, RuntimeError) and isinstance(err, UserError)
    assert err.lines() == ["error: while executing node 'fc1' (linear): ValueError: boom"]


class _Odd(UserError):
    exit_code = 7

    def lines(self, source=None):
        return [f"first about {source}", "second\twith a tab"]


@pytest.mark.parametrize("raised, code, shown", [
    (_Odd(), 7, "first about M.py\nsecond\\twith a tab\n"),
    (UserError("bad\ninput"), 1, "error: bad\\ninput\n"),
    (UsageError("--a: no", "--b: no"), 2, "bsdgraph: error: --a: no\nbsdgraph: error: --b: no\n"),
])
def test_the_cli_reports_any_user_error_by_its_own_lines_and_exit_code(capsys, monkeypatch, raised, code, shown):
    """One ``except UserError`` in ``main``: a subclass it has never heard of is reported as the class says."""
    def fail(args):
        raise raised

    monkeypatch.setattr("bsdgraph.cli.main.cmd_compile", fail)
    assert main(["compile", "M.py"]) == code
    out, err = capsys.readouterr()
    assert out == "" and err == shown
