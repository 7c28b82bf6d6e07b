"""What runs a compiled program: the ``Executor`` with a ``Backend`` (``cpu``, ``triton``: kernel tables and
primitives, as data) and the ``reference`` interpreter, the executable specification. Every runtime exposes
``step(x, y) -> StepResult``, ``predict(x)``, ``params`` and ``state``."""

from bsdgraph.runtime.common import ExecutionError, OptimConfig, StepResult

__all__ = ["ExecutionError", "OptimConfig", "StepResult"]
