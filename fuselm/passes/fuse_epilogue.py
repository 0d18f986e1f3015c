"""Fuse what follows a gemm into its epilogue: bias, activation, gated SiLU, residual.

Each rule matches a gemm whose only user is the op after it and appends one step to
the gemm's `epilogue` (see `gemm` in ir/core_ops.py), so a chain like
gemm -> add bias -> gelu -> add residual becomes one gemm in a few sweeps. The gated
form silu(x·Wg) * (x·Wu) of two gemms over one input becomes one gemm over the
concatenated weight [Wg; Wu] with the `gated_silu` step, which halves the columns.
An activation of a reshaped gemm (GPT-2's Conv1D views its [B*S, N] rows as [B, S, N]
before the GELU) is the reshape of the gemm with the activation: a pointwise op
commutes with any reshape.
"""
from __future__ import annotations

from ..ir.types import dims_equal
from .patterns import Any, Op, Rule, rewrite
from .weights import concatenated_weight, is_gemm_weight

def _no_epilogue(epilogue) -> bool:
    return not epilogue


def extend_epilogue(builder, gemm, step: str, extra=None):
    """A copy of (new-graph) `gemm` with one more epilogue step (and its extra input)."""
    inputs = tuple(gemm.inputs) + ((extra,) if extra is not None else ())
    epilogue = tuple(gemm.attrs.get("epilogue", ())) + (step,)
    return builder.op("gemm", *inputs, epilogue=epilogue, source=gemm.source)


def _bias(builder, m):
    gemm, bias = m.g, m.b
    if bias.type.rank != 1 or not dims_equal(bias.type.shape[0], gemm.type.shape[-1]) or bias.type.dtype != gemm.type.dtype:
        return None
    return extend_epilogue(builder, gemm, "bias", bias)


def _residual(builder, m):
    if not m.r.type.same_as(m.g.type):  # a broadcasting add is not a residual
        return None
    return extend_epilogue(builder, m.g, "residual", m.r)


def _activation(step):
    return lambda builder, m: extend_epilogue(builder, m.g, step)


def _through_view(rule):
    """The rule's fused gemm, reshaped as the view between the gemm and the op was."""
    def build(builder, m):
        fused = rule(builder, m)
        view = m.old("view")
        return None if fused is None else builder.op("reshape", fused, shape=view.attrs["shape"], source=view.source)

    return build


def _silu(builder, m):
    """silu(gemm), unless it is the gate of a gated pair (that rule fuses both gemms)."""
    users = m.users.get(m.old("act"), [])
    gate_of_pair = len(users) == 1 and users[0].op == "mul" and any(getattr(v, "op", None) == "gemm" for v in users[0].inputs)
    return None if gate_of_pair else extend_epilogue(builder, m.g, "silu")


def _gated_silu(builder, m):
    gate, up = m.old("wg"), m.old("wu")
    if not gate.type.same_as(up.type):
        return None
    fused = concatenated_weight(builder, [gate, up])
    if fused is None:  # dequantized weights of different formats
        return None
    return builder.op("gemm", m.x, fused, epilogue=("gated_silu",), source=m.old("up").source)


def _gemm(bind: str, **attrs):
    return Op("gemm", Any(), Any(), bind=bind, exact_arity=False, **attrs)


RULES = [
    # gemm + bias vector (first step only: a bias after an activation is not linear's)
    Rule("bias", Op("add", _gemm("g", epilogue=_no_epilogue), Any("b"), commutative=True), _bias),
    # gemm -> activation
    Rule("relu", Op("relu", _gemm("g")), _activation("relu")),
    Rule("silu", Op("silu", _gemm("g"), bind="act"), _silu),
    Rule("gelu", Op("gelu", _gemm("g"), approximate="none"), _activation("gelu")),
    Rule("gelu_tanh", Op("gelu", _gemm("g"), approximate="tanh"), _activation("gelu_tanh")),
    # activation(reshape(gemm)) -> reshape(gemm + activation)
    Rule("relu_of_view", Op("relu", Op("reshape", _gemm("g"), bind="view")), _through_view(_activation("relu"))),
    Rule("silu_of_view", Op("silu", Op("reshape", _gemm("g"), bind="view"), bind="act"), _through_view(_silu)),
    Rule("gelu_of_view", Op("gelu", Op("reshape", _gemm("g"), bind="view"), approximate="none"),
         _through_view(_activation("gelu"))),
    Rule("gelu_tanh_of_view", Op("gelu", Op("reshape", _gemm("g"), bind="view"), approximate="tanh"),
         _through_view(_activation("gelu_tanh"))),
    # silu(x·Wg) * (x·Wu) -> one gemm over [Wg; Wu] with the gated epilogue
    Rule(
        "gated_silu",
        Op(
            "mul",
            Op("silu", Op("gemm", Any("x"), Any("wg", where=is_gemm_weight), epilogue=_no_epilogue)),
            Op("gemm", Any("x"), Any("wu", where=is_gemm_weight), epilogue=_no_epilogue, bind="up"),
            commutative=True,
        ),
        _gated_silu,
    ),
    # gemm + a residual of the same shape
    Rule("residual", Op("add", _gemm("g"), Any("r"), commutative=True), _residual),
]


def fuse_epilogue(graph):
    return rewrite(graph, RULES, "fuse_epilogue")
