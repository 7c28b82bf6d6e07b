"""Every op has an entry in every per-op table (the 'how to add an op' checklist in CONTRIBUTING.md), and the
tables are filled the one way: ``registrar``, which refuses a key registered twice."""

import pytest

from bsdgraph.compiler.feedback import MIRROR_RULES
from bsdgraph.interop.nir_export import EXPORT_RULES
from bsdgraph.ir.infer import ARITY, SHAPE_RULES
from bsdgraph.ir.graph import ATTRS, GroupOp, Op
from bsdgraph.compiler.lower import LOWERING
from bsdgraph.ir.params import PARAM_SHAPES
from bsdgraph.registry import registrar
from bsdgraph.runtime.reference import IMPLS
from bsdgraph.ir.validate import CHECKS
from bsdgraph.tools.draw import STYLE

TABLES = {
    "ir.ATTRS": ATTRS, "infer.SHAPE_RULES": SHAPE_RULES, "infer.ARITY": ARITY, "validate.CHECKS": CHECKS,
    "feedback.MIRROR_RULES": MIRROR_RULES, "runtime.reference.IMPLS": IMPLS, "lower.LOWERING": LOWERING,
    # an op NIR cannot express still has a rule: it raises MappingError, which export reports as a diagnostic
    "nir_export.EXPORT_RULES": EXPORT_RULES, "draw.STYLE": STYLE,
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_op_has_an_entry(table):
    missing = [op.value for op in Op if op not in TABLES[table]]
    assert not missing, f"{table} lacks an entry for {missing}: see CONTRIBUTING.md, 'How to add an op'"


def test_parametric_ops_are_exactly_those_with_parameters():
    assert set(PARAM_SHAPES) == set(GroupOp.PARAMETRIC)


def test_parametric_ops_lower_to_an_update_kernel():
    assert all(LOWERING[op].update for op in GroupOp.PARAMETRIC)


def lowered_kernels() -> set[str]:
    """Every kernel name the lowering can put in a plan, and what the plan transforms rename them to."""
    from bsdgraph.compiler import lower

    names = {k for row in LOWERING.values() for k in (row.forward, row.grad, row.update) if k not in (None, "view")}
    names |= set(lower.FUSIONS.values()) | {lower.RECURRENT_FUSION, lower.OPTIMIZER_KERNEL, lower.GROUP_KERNEL,
                                             "poisson_encode"}
    return names


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_backend_implements_every_kernel_a_plan_can_launch(backend):
    from bsdgraph.runtime.cpu import cpu_backend
    from bsdgraph.runtime.triton import triton_backend

    table = {"cpu": cpu_backend, "triton": triton_backend}[backend]().kernels
    missing = sorted(lowered_kernels() - set(table))
    assert not missing, f"the {backend} backend has no kernel {missing}"


def test_every_data_parallel_kernel_wraps_a_kernel_the_plan_launches():
    from bsdgraph.parallel.distributed import DP_KERNELS

    assert set(DP_KERNELS) <= lowered_kernels(), sorted(set(DP_KERNELS) - lowered_kernels())


# ---------------------------------------------------------------------------------------------------- registrar


def test_registrar_enters_one_function_under_every_key_it_is_given():
    table = {}
    register = registrar(table)

    @register(Op.AVGPOOL2D, Op.MAXPOOL2D)
    def pool(): ...

    @register(Op.LIF)
    def lif(): ...

    assert table == {Op.AVGPOOL2D: pool, Op.MAXPOOL2D: pool, Op.LIF: lif}
    assert pool.__name__ == "pool" and callable(pool)  # the decorator hands the function back unchanged


def test_registrar_refuses_a_key_registered_twice_naming_it():
    table = {}
    register = registrar(table)

    @register("weights", "bias")
    def first(): ...

    with pytest.raises(ValueError, match="'bias' is registered twice"):
        @register("other", "bias")
        def second(): ...

    assert table["bias"] is first and table["weights"] is first


def test_registrar_refuses_a_key_the_table_already_holds():
    table = {"lif": print}
    with pytest.raises(ValueError, match="'lif' is registered twice"):
        registrar(table)("lif")(len)
    assert table == {"lif": print}


def test_the_per_op_decorators_refuse_a_second_rule_for_an_op():
    """Each module's decorator is a registrar over its table: a second rule for an op is an error, not a silent
    override (which rule won used to depend on the order of definitions)."""
    from bsdgraph.compiler.feedback import mirror
    from bsdgraph.interop.nir_export import export_rule
    from bsdgraph.ir.infer import rule
    from bsdgraph.ir.validate import check

    for decorator, table in ((rule, SHAPE_RULES), (check, CHECKS), (mirror, MIRROR_RULES),
                             (export_rule, EXPORT_RULES)):
        before = dict(table)
        with pytest.raises(ValueError, match="Op.LIF.* is registered twice"):
            decorator(Op.LIF)(lambda *args: None)
        assert table == before
