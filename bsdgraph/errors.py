"""The one base class of every error a user can cause, and the exit code each kind ends the command line with.

A ``UserError`` is bad input (a model file, data, a checkpoint, a flag's value, a run directory, a peer that went
away): the command line prints its ``lines`` and exits with ``exit_code``, never with a traceback
(``bsdgraph/cli/main.py``, the one place that catches them). Anything else that escapes is a bug in bsdgraph.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: reported as one line; ``exit_code`` 1 (bad input) unless a subclass says otherwise."""

    exit_code = 1

    def lines(self, source: str | None = None) -> list[str]:
        """What the command line prints, one entry per line (control characters are escaped where it prints
        them); ``source`` is the file the command was given (a model), for errors that are reported against it."""
        return [f"error: {self}"]


class UsageError(UserError):
    """A command line that does not make sense (unknown flag, bad value, flags that exclude each other): exit 2."""

    exit_code = 2

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = problems

    def lines(self, source: str | None = None) -> list[str]:
        return [f"bsdgraph: error: {problem}" for problem in self.problems]
