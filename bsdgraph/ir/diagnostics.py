"""What validation reports: one ``Diagnostic`` per problem, all of them raised together as a ``GraphError``."""

from __future__ import annotations

from dataclasses import dataclass

from bsdgraph.errors import UserError
from bsdgraph.ir.graph import Op


@dataclass(frozen=True)
class Diagnostic:
    node: str | None
    op: Op | None
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"node '{self.node}' ({self.op.value})" if self.node and self.op else (
            f"node '{self.node}'" if self.node else "graph")
        return f"{where}: {self.message}" + (f" -- fix: {self.hint}" if self.hint else "")


class GraphError(UserError):
    """An invalid graph; ``diagnostics`` lists every problem found."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        n = len(self.diagnostics)
        listing = "\n".join(f"  - {d}" for d in self.diagnostics)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in the graph:\n{listing}")

    def lines(self, source: str | None = None) -> list[str]:
        """One line per diagnostic and a count, each against the model file (``source``)."""
        return [f"{source}: {d}" for d in self.diagnostics] + [
            f"{source}: invalid model ({len(self.diagnostics)} problem(s))"]
