"""bsdgraph: a compiler-style graph engine for spiking networks trained with Bidirectional Spike-based Distillation.

Notebook API (bsdgraph/api.py): ``net`` (a network from a builder, a graph or a model file), ``fit``, ``load``;
``Net.predict`` and ``Net.evaluate``.

Pipeline (``compile_model``): ``models/*.py build()`` -> ``Graph`` (F) -> ``validate`` -> ``derive_feedback``
(F + B + local losses) -> ``lower`` (a typed Plan) -> generated step code -> a runtime (reference | cpu | triton).
"""

from bsdgraph.compiler.feedback import BSDConfig, derive_feedback, pairing, segment
from bsdgraph.compiler.program import Program, compile_model
from bsdgraph.ir.graph import Edge, Graph, GroupOp, Node, Op, Stream
from bsdgraph.ir.builder import GraphBuilder
from bsdgraph.ir.printer import format_graph, from_json, to_json
from bsdgraph.ir.diagnostics import Diagnostic, GraphError
from bsdgraph.ir.neurons import NEURONS, Neuron, NeuronError, declare_neuron
from bsdgraph.ir.validate import validate

from bsdgraph.version import __version__
from bsdgraph.api import Net, fit, load, net

__all__ = [
    "__version__", "BSDConfig", "Diagnostic", "Edge", "Graph", "GraphBuilder", "GraphError", "GroupOp", "NEURONS",
    "Net", "Neuron", "NeuronError", "Node", "Op", "declare_neuron", "fit", "load", "net",
    "Program", "Stream", "compile_model", "derive_feedback", "format_graph", "from_json", "pairing", "segment",
    "to_json", "validate",
]
