"""rms_norm and layer_norm over the last dimension, one program per row.

The kernel follows Triton tutorial 05: a row is one BLOCK_N tile, statistics in fp32.
Generated parts: the statistics (mean and variance, or mean square), the weight and
bias loads, and the residual form (`residual=true`), where the row x + residual is
rounded to the output dtype, stored as the second output (the new residual stream) and
normalized, as the reference does. The output of the residual form is [2, ..., N]:
out[0] the normalized rows, out[1] the sums.
"""
from __future__ import annotations

import torch

from ...ir.graph import Node
from .module import OMIT, GeneratedKernel, drop_omitted, number_token, optional, torch_dtype_name

OPS = ("layer_norm", "rms_norm")
MAX_BLOCK_N = 65536  # one row is one tile; wider rows would need a loop over tiles


def generate(node: Node) -> GeneratedKernel:
    x = node.inputs[0].type
    residual = bool(node.attrs.get("residual", False))
    n_params = len(node.inputs) - 1 - residual
    has_weight, has_bias = n_params >= 1, n_params >= 2
    eps = node.attrs.get("eps")
    if eps is None:  # the references' defaults
        eps = torch.finfo(x.torch_dtype).eps if node.op == "rms_norm" else 1e-5
    parts = [node.op, f"n{x.shape[-1]}", optional(residual, "residual"), optional(not has_weight, "noweight"),
             optional(node.op == "layer_norm" and has_weight and not has_bias, "nobias"), f"eps{number_token(eps)}", x.dtype]
    name = "_".join(p for p in parts if p != OMIT)
    params = ("x", *(("weight",) if has_weight else ()), *(("bias",) if has_bias else ()), *(("residual",) if residual else ()))
    body = drop_omitted(_kernel(name, node.op, has_weight, has_bias, residual) + "\n\n"
                        + _launch(name, params, residual, float(eps), torch_dtype_name(node.type.dtype)))
    summary = f"{node.op} of rows of {x.shape[-1]}{' after the residual add' if residual else ''}, eps={eps}, {x.dtype}"
    return GeneratedKernel(name, summary, body, params)


def _statistics(op: str) -> list[str]:
    if op == "rms_norm":
        return ["y = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)"]
    return [
        "mean = tl.sum(x, axis=0) / N",
        "centered = tl.where(mask, x - mean, 0.0)",
        "y = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / N + eps)",
    ]


def _kernel(name: str, op: str, has_weight: bool, has_bias: bool, residual: bool) -> str:
    stats = "\n".join("    " + line for line in _statistics(op))
    return f'''@triton.jit
def {name}_kernel(
    # pointers
    x_ptr, out_ptr, weight_ptr, bias_ptr, residual_ptr, sum_ptr,
    # sizes: rows of N
    N,
    # strides
    stride_xm, stride_xn, stride_om, stride_rm, stride_rn, stride_sm,
    eps,
    BLOCK_N: tl.constexpr,
):
    """Normalizes one row of x{" + residual (and stores that sum)" if residual else ""}."""
    row = tl.program_id(axis=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    {optional(residual, "x += tl.load(residual_ptr + row * stride_rm + cols * stride_rn, mask=mask, other=0.0).to(tl.float32)")}
    {optional(residual, "total = x.to(sum_ptr.dtype.element_ty)  # the reference rounds the sum before normalizing")}
    {optional(residual, "tl.store(sum_ptr + row * stride_sm + cols, total, mask=mask)")}
    {optional(residual, "x = total.to(tl.float32)")}
{stats}
    {optional(has_weight, "y *= tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)")}
    {optional(has_bias, "y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)")}
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
'''


def _launch(name: str, params: tuple, residual: bool, eps: float, out_dtype: str) -> str:
    return f'''EPS = {eps!r}


def launch({", ".join(params)}):
    """Checks, allocates {"out[2, ..., N] (normed, sum)" if residual else "out[..., N]"}, launches one program per row."""
    N = x.shape[-1]
    BLOCK_N = triton.next_power_of_2(N)
    assert BLOCK_N <= {MAX_BLOCK_N}, f"rows of {{N}} are too wide for one tile"
    {optional("weight" in params, "assert weight.is_contiguous() and weight.shape == (N,)")}
    {optional("bias" in params, "assert bias.is_contiguous() and bias.shape == (N,)")}
    out = torch.empty({"(2, *x.shape)" if residual else "x.shape"}, device=x.device, dtype={out_dtype})
    x = x.reshape(-1, N)
    M = x.shape[0]
    if M == 0:
        return out
    {optional(residual, "residual = residual.reshape(-1, N)")}
    {optional(residual, "normed, total = out[0].view(-1, N), out[1].view(-1, N)")}
    {optional(not residual, "normed = total = out.view(-1, N)")}
    {optional(not residual, "residual = x  # unused")}
    {name}_kernel[(M,)](
        x, normed, {"weight" if "weight" in params else "x"}, {"bias" if "bias" in params else "x"}, residual, total,
        N,
        x.stride(0), x.stride(1), normed.stride(0), residual.stride(0), residual.stride(1), total.stride(0),
        EPS,
        BLOCK_N=BLOCK_N, num_warps=min(max(BLOCK_N // 256, 1), 8),
    )
    return out
'''
