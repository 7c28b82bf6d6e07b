"""Every op has an entry in every per-op table (the 'how to add an op' checklist in CONTRIBUTING.md)."""

import pytest

from bsdgraph.compiler.feedback import MIRROR_RULES
from bsdgraph.ir.infer import ARITY, SHAPE_RULES
from bsdgraph.ir.graph import ATTRS, GroupOp, Op
from bsdgraph.compiler.lower import LOWERING
from bsdgraph.ir.params import PARAM_SHAPES
from bsdgraph.runtime.reference import IMPLS
from bsdgraph.ir.validate import CHECKS

TABLES = {
    "ir.ATTRS": ATTRS, "infer.SHAPE_RULES": SHAPE_RULES, "infer.ARITY": ARITY, "validate.CHECKS": CHECKS,
    "feedback.MIRROR_RULES": MIRROR_RULES, "runtime.reference.IMPLS": IMPLS, "lower.LOWERING": LOWERING,
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_op_has_an_entry(table):
    missing = [op.value for op in Op if op not in TABLES[table]]
    assert not missing, f"{table} lacks an entry for {missing}: see CONTRIBUTING.md, 'How to add an op'"


def test_parametric_ops_are_exactly_those_with_parameters():
    assert set(PARAM_SHAPES) == set(GroupOp.PARAMETRIC)


def test_parametric_ops_lower_to_an_update_kernel():
    assert all(LOWERING[op].update for op in GroupOp.PARAMETRIC)
