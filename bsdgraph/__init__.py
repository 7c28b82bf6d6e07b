"""bsdgraph: a compiler-style graph engine for spiking networks trained with Bidirectional Spike-based Distillation.

Pipeline: ``models/*.py build()`` -> ``Graph`` (F) -> ``validate`` -> ``derive_feedback`` (F + B + local losses)
-> ``lower`` (Plan) -> a runtime backend (reference | cpu | triton).
"""

from bsdgraph.feedback import BSDConfig, derive_feedback, pairing, segment
from bsdgraph.ir import Edge, Graph, GraphBuilder, GroupOp, Node, Op, Stream
from bsdgraph.printer import format_graph, from_json, to_json
from bsdgraph.validate import Diagnostic, GraphError, validate

__version__ = "0.1.0"

__all__ = [
    "BSDConfig", "Diagnostic", "Edge", "Graph", "GraphBuilder", "GraphError", "GroupOp", "Node", "Op", "Stream",
    "derive_feedback", "format_graph", "from_json", "pairing", "segment", "to_json", "validate",
]
