"""The Target object every layer asks, the op flags partition and the backends read, and
the pass infrastructure's contract (rewrite reports a change, sweeps are bounded,
target passes can be disabled by name)."""
import pytest
import torch

from fuselm import ir
from fuselm.ir.graph import GraphBuilder
from fuselm.ir.registry import all_ops, is_heavy, is_view
from fuselm.ir.types import TensorType
from fuselm.passes import counters, pipeline, run_passes
from fuselm.passes.patterns import MAX_SWEEPS, Any, Op, Rule, rewrite
from fuselm.target import CPU, CUDA, get_target


def test_targets_by_name_and_auto():
    assert get_target("cpu") is CPU and get_target("cuda") is CUDA and get_target(CPU) is CPU
    assert get_target("auto") is (CUDA if torch.cuda.is_available() else CPU)
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        get_target("tpu")
    assert str(CPU) == "cpu" and CPU.device == torch.device("cpu")
    assert CPU.default_dtype == torch.float32 and CUDA.default_dtype == torch.bfloat16
    assert [name for name, _ in CPU.passes()][-1] == "layout"
    assert "layout" not in [name for name, _ in CUDA.passes()]


def test_cpu_target_keeps_torch_on_one_thread_while_kernels_run():
    before = torch.get_num_threads()
    with CPU.running():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with CUDA.running():
        assert torch.get_num_threads() == before


def test_op_flags_say_which_ops_are_views_and_which_stand_alone():
    views = {name for name, op in all_ops().items() if op.view}
    assert views == {"reshape", "permute", "slice", "select", "expand"}
    assert is_heavy("gemm") and is_heavy("matmul") and is_heavy("paged_attention")
    assert not is_heavy("add") and not is_view("add") and is_view("permute")


def _neg_graph():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "f32"))
    return b.build([b.op("neg", b.op("exp", x))])


def test_rewrite_returns_the_same_graph_when_nothing_fires():
    graph = _neg_graph()
    never = Rule("never", Op("neg", Any("x"), where_never=lambda v: False), lambda b, m: None)
    assert rewrite(graph, [never], "test_rewrite") is graph
    double = Rule("neg_to_mul", Op("neg", Any("x")), lambda b, m: b.op("mul", m.x, scalar=-1.0))
    changed = rewrite(graph, [double], "test_rewrite")
    assert changed is not graph and [n.op for n in changed.nodes] == ["exp", "mul"]
    torch.testing.assert_close(ir.interpret(changed, torch.ones(4)), ir.interpret(graph, torch.ones(4)))


def test_rules_that_keep_firing_stop_after_a_bounded_number_of_sweeps():
    counters.clear()
    forever = Rule("renew", Op("neg", Any("x")), lambda b, m: b.op("neg", m.x))  # always a new node
    rewrite(_neg_graph(), [forever], "test_forever")
    assert counters["test_forever.renew"] == MAX_SWEEPS


def test_target_passes_can_be_disabled_by_name():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    w = b.constant("w", torch.randn(16, 8))
    graph = b.build([b.op("gemm", x, w)])
    packed = run_passes(graph, pipeline("cpu"))
    assert packed.nodes[0].attrs.get("weight_layout") == "k16"
    plain = run_passes(graph, pipeline("cpu"), disable=["layout"])
    assert "weight_layout" not in plain.nodes[0].attrs
    with pytest.raises(ValueError, match="cannot disable unknown passes \\['nope'\\]"):
        run_passes(graph, pipeline("cpu"), disable=["nope"])
