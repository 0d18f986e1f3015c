"""Batched matmul, as torch.matmul: out[*batch, M, N] = a[..., M, K] @ b[..., K, N].

The batch dims of a and b broadcast (a missing or size-1 dim is read with stride 0, as
`expand` makes it) and are flattened into the program id: each program decomposes its
batch index into coordinates and offsets a, b and out by their strides, so transposed
or broadcast operands are read where they lie, never copied. Within a batch entry the
kernel is a tiled matmul with an fp32 accumulator (tl.dot on f16 / bf16 / f32 tiles; a
multiply-and-sum in the accumulator's type for f64 and integers, which tl.dot does not
take). M, N, K and the batch sizes are launch arguments, so one kernel serves every
shape of its ranks; the host wrapper picks a tile by M.
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.graph import Node
from .device_functions import mma_source
from .module import GeneratedKernel, torch_dtype_name

OPS = ("matmul",)

DOT_DTYPES = ("f16", "bf16", "f32")
NUMERIC_DTYPES = DOT_DTYPES + ("f64", "i64", "i32", "i16", "i8", "u8")
# (largest M, tile): the first row whose limit admits M is used
_CONFIGS = {
    "half": [(16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
             (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
             (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))],
    "f32": [(16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)),
            (None, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2))],
    # multiply-and-sum tiles: a [BLOCK_M, BLOCK_K, BLOCK_N] product lives in registers
    "other": [(None, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=8, num_warps=4, num_stages=1))],
}


def generate(node: Node) -> GeneratedKernel:
    a, b = (v.type for v in node.inputs)
    dtype = node.type.dtype
    if dtype not in NUMERIC_DTYPES or a.dtype != b.dtype:
        raise UnsupportedKernelError(f"matmul kernels take two operands of one real numeric dtype, got {a} @ {b}")
    batch_rank = node.type.rank - 2
    dot = dtype in DOT_DTYPES
    accumulator = "tl.float64" if dtype == "f64" else ("tl.float32" if a.is_float else "tl.int64")
    name = f"matmul_batch{batch_rank}_{dtype}"
    configs = _CONFIGS["f32" if dtype == "f32" else "half" if dot else "other"]
    parts = [mma_source(dtype)] if dot else []
    parts += [_kernel(name, batch_rank, dot, accumulator), _launch(name, batch_rank, configs, torch_dtype_name(dtype))]
    summary = (f"batched matmul a[..., M, K] @ b[..., K, N] over {batch_rank} broadcast batch dims, {dtype}"
               f" ({'tl.dot' if dot else 'multiply-and-sum'} tiles)")
    return GeneratedKernel(name, summary, "\n\n".join(parts), ("a", "b"))


def _batch_offsets(batch_rank: int) -> list:
    """Kernel lines turning the batch index into element offsets of a, b and out."""
    lines = []
    for axis in reversed(range(1, batch_rank)):
        lines += [f"i{axis} = batch % B{axis}", f"batch = batch // B{axis}"]
    lines.append("i0 = batch")
    for operand in ("a", "b", "out"):
        terms = " + ".join(f"i{axis} * stride_{operand}{axis}" for axis in range(batch_rank))
        lines.append(f"{operand}_ptr += {terms}")
    return lines


def _kernel(name: str, batch_rank: int, dot: bool, accumulator: str) -> str:
    batch_sizes = "".join(f"B{axis}, " for axis in range(batch_rank))
    strides = [f"stride_{op}{axis}" for op in ("a", "b", "out") for axis in range(batch_rank)]
    batch_strides = f"    {', '.join(strides)},\n" if strides else ""
    batch_lines = "\n".join("    " + line for line in _batch_offsets(batch_rank)) if batch_rank else "    # no batch dims"
    product = ("acc = mma(a, b, acc, UPCAST)" if dot else
               f"acc += tl.sum(a.to({accumulator})[:, :, None] * b.to({accumulator})[None, :, :], axis=1)")
    no_specialize = ", ".join(f'"{s}"' for s in ["M", "N", "K", *(f"B{axis}" for axis in range(batch_rank))])
    return f'''@triton.jit(do_not_specialize=[{no_specialize}])  # sizes vary: no recompiles
def {name}_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr,
    # sizes: the broadcast batch dims, then out[..., M, N] = a[..., M, K] @ b[..., K, N]
    {batch_sizes}M, N, K,
    # strides: batch dims (0 where an operand is broadcast), then the matrix dims
{batch_strides}    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    # tile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of one batch entry per program (batch-major program order)."""
    pid = tl.program_id(axis=0).to(tl.int64)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * num_pid_n
    batch = pid // tiles
    tile = pid % tiles
{batch_lines}
    rows = (tile // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = rows < M
    n_mask = cols < N
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={accumulator})
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        {product}
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
'''


def _launch(name: str, batch_rank: int, configs: list, out_dtype: str) -> str:
    table = "\n".join(f"    ({limit}, {cfg})," for limit, cfg in configs)
    batch_args = "*batch, " if batch_rank else ""
    batch_strides = "*a.stride()[:-2], *b.stride()[:-2], *out.stride()[:-2],\n        " if batch_rank else ""
    return f'''# (largest M, tile): the first row whose limit admits M is used
CONFIGS = [
{table}
]


def launch(a, b):
    """out[*batch, M, N] = a @ b, batch dims broadcast: checks, allocates, picks the tile, launches."""
    (M, K), N = a.shape[-2:], b.shape[-1]
    assert b.shape[-2] == K, f"a {{tuple(a.shape)}} and b {{tuple(b.shape)}} disagree on K"
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    assert len(batch) == {batch_rank}
    out = torch.empty((*batch, M, N), device=a.device, dtype={out_dtype})
    if out.numel() == 0:
        return out
    a = a.expand(*batch, M, K)  # broadcast batch dims get stride 0: no copy
    b = b.expand(*batch, K, N)
    cfg = next(cfg for limit, cfg in CONFIGS if limit is None or M <= limit)
    grid = (out.numel() // (M * N) * triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    {name}_kernel[grid](
        a, b, out,
        {batch_args}M, N, K,
        {batch_strides}a.stride(-2), a.stride(-1), b.stride(-2), b.stride(-1), out.stride(-2), out.stride(-1),
        UPCAST=INTERPRETED and a.dtype == torch.bfloat16, **cfg,
    )
    return out
'''
