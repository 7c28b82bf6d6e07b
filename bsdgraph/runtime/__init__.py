"""Runtime backends that execute a BSD graph: ``reference`` (torch eager, the executable spec), later ``cpu`` and
``triton``. Every backend exposes ``step(x, y) -> StepResult``, ``predict(x)``, ``params`` and ``state``."""

from bsdgraph.runtime.common import ExecutionError, OptimConfig, StepResult

__all__ = ["ExecutionError", "OptimConfig", "StepResult"]
