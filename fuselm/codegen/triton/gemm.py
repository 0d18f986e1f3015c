"""GEMM with a generated epilogue: out[M, N] = epilogue(x[M, K] @ w[N, K]^T).

The kernel is Triton tutorial 03's tiled matmul (grouped program order for L2 reuse,
fp32 accumulator) with the epilogue lines generated from the gemm's `epilogue` list:
bias and residual loads, activations, and `gated_silu`, for which each program keeps
two accumulators, the gate columns n and the up columns N + n of the same weight, and
combines them as silu(gate) * up before anything is stored. M (x's leading dims,
flattened) is a launch-time size; the host wrapper picks a small-M (GEMV-like) tile, a
medium one or a large one by M, so one kernel serves every token count; on a GPU the
small and medium rows hold several candidates and the fastest is measured (tuning.py).
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.core_ops import ACTIVATIONS as IR_ACTIVATIONS
from ...ir.graph import Node
from .device_functions import ACTIVATIONS, mma_source
from .module import OMIT, GeneratedKernel, drop_omitted, optional, torch_dtype_name

OPS = ("gemm",)

# (largest M, candidate tiles) rows; the first row whose limit admits M is used. On a GPU
# the fastest candidate is measured once per shape and power-of-two M (tuning.py): for
# decode the best tile depends on the card and on how many programs N / BLOCK_N makes.
# Elsewhere the first candidate runs. fp32 tiles are smaller (no tensor-core TF32).
_SMALL = dict(BLOCK_M=16, GROUP_M=1, DOT=True)
# GEMV tiles for decode: a few rows, multiply-and-sum (tl.dot needs 16 rows and columns), so
# narrow column blocks give enough programs to keep every SM's loads in flight
_GEMV = dict(GROUP_M=1, DOT=False)
_CONFIGS = {
    "half": [
        (16, [dict(_SMALL, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
              dict(_SMALL, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4),
              dict(_SMALL, BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3),
              dict(_SMALL, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(_SMALL, BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=3),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=4),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=3),
              dict(_GEMV, BLOCK_M=4, BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=4)]),
        (64, [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3, DOT=True)]),
        (None, [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, DOT=True)]),
    ],
    "gated_half": [  # two accumulators per program: half the columns
        (16, [dict(_SMALL, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(_SMALL, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4),
              dict(_SMALL, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
              dict(_SMALL, BLOCK_N=16, BLOCK_K=512, num_warps=8, num_stages=3),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=3),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=4)]),
        (64, [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, DOT=True),
              dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, DOT=True)]),
        (None, [dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, DOT=True)]),
    ],
    "f32": [
        (16, [dict(_SMALL, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3),
              dict(_GEMV, BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=3)]),
        (None, [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2, DOT=True)]),
    ],
}


TILE_PRODUCT = '''@triton.jit
def tile_product(a, b, acc, UPCAST: tl.constexpr, DOT: tl.constexpr):
    """acc + a @ b in fp32: on the tensor cores (DOT), or as a broadcast multiply and sum
    over K, for the GEMV tiles of decode that tl.dot cannot take (under 16 rows or columns)."""
    if DOT:
        acc = mma(a, b, acc, UPCAST)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return acc
'''


def generate(node: Node) -> GeneratedKernel:
    x, w = node.inputs[0].type, node.inputs[1].type
    steps = tuple(node.attrs.get("epilogue", ()))
    if x.dtype not in ("f32", "f16", "bf16"):
        raise UnsupportedKernelError(f"gemm kernels take float inputs, got x {x}")
    if steps.count("gated_silu") > 1:
        raise UnsupportedKernelError("gemm: more than one gated_silu step")
    if node.attrs.get("weight_layout") is not None:
        raise UnsupportedKernelError(f"the Triton gemm reads w as [N, K], not the cpu layout {node.attrs['weight_layout']!r}")
    epilogue = Epilogue(steps)
    name = "_".join(["gemm", f"k{w.shape[1]}", f"n{node.type.shape[-1]}", *steps, x.dtype])
    if w.dtype != x.dtype:
        name += f"_w{w.dtype}"
    configs = _CONFIGS["f32" if x.dtype == "f32" else ("gated_half" if epilogue.gated else "half")]
    body = drop_omitted("\n\n".join(
        ["from fuselm.codegen.triton.tuning import fastest_config, power_of_two_bucket", mma_source(x.dtype),
         TILE_PRODUCT]
        + [ACTIVATIONS[a] for a in IR_ACTIVATIONS if a in steps or (a == "silu" and epilogue.gated)]
        + [_kernel(name, epilogue, x.dtype != w.dtype), _launch(name, epilogue, configs, torch_dtype_name(node.type.dtype))]
    ))
    summary = f"x[M, K] @ w[N, K]^T with epilogue [{', '.join(steps)}], K={w.shape[1]}, N={node.type.shape[-1]}, {x.dtype}"
    return GeneratedKernel(name, summary, body, ("x", "w", *epilogue.params))


class Epilogue:
    """The epilogue steps as kernel lines, kernel parameters and launch arguments."""

    def __init__(self, steps: tuple):
        self.steps = steps
        self.gated = "gated_silu" in steps
        reads = [s for s in steps if s in ("bias", "residual")]
        self.params = [s if reads.count(s) == 1 else f"{s}{reads[:i + 1].count(s)}" for i, s in enumerate(reads)]

    def kernel_args(self) -> tuple[list, list]:
        """(pointer parameters, stride parameters) of the extra inputs."""
        pointers = [f"{p}_ptr" for p in self.params]
        strides = [f"stride_{p}" if p.startswith("bias") else f"stride_{p}_m, stride_{p}_n" for p in self.params]
        return pointers, strides

    def lines(self) -> list[str]:
        """Kernel lines turning `acc` (and `acc_up` while gated) into the output tile."""
        tiles = [("acc", "offs_n"), ("acc_up", "offs_n + N")] if self.gated else [("acc", "offs_n")]
        params, out = iter(self.params), []
        for step in self.steps:
            if step in ("bias", "residual"):
                param = next(params)
                for tile, cols in tiles:
                    out.append(f"{tile} += {_extra_tile(step, param, cols)}")
            elif step == "gated_silu":
                out.append("acc = silu(acc) * acc_up")
                tiles = tiles[:1]
            else:
                out += [f"{tile} = {step}({tile})" for tile, _ in tiles]
        return out


def _extra_tile(step: str, param: str, cols: str) -> str:
    if step == "bias":
        return f"tl.load({param}_ptr + {_paren(cols)} * stride_{param}, mask=n_mask, other=0.0).to(tl.float32)[None, :]"
    return (f"tl.load({param}_ptr + rows[:, None] * stride_{param}_m + {_paren(cols)}[None, :] * stride_{param}_n, "
            f"mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)")


# The program's output tile: programs walk M in groups of GROUP_M (L2 reuse of the weight
# columns), each program one BLOCK_M x BLOCK_N tile.
TILE_ORDER = """\
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
"""


def _paren(expression: str) -> str:
    return expression if expression.isidentifier() else f"({expression})"


def _kernel(name: str, epilogue: Epilogue, cast_w: bool) -> str:
    pointers, strides = epilogue.kernel_args()
    return f'''@triton.jit(do_not_specialize=["M"])  # M varies with the token count: no recompiles
def {name}_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr{"".join(", " + p for p in pointers)},
    # sizes: out is [M, N]; the weight has {"2N (gate | up)" if epilogue.gated else "N"} rows of K
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on{"".join(", " + s for s in strides)},
    # tile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile per program; programs walk M in groups of GROUP_M."""
{TILE_ORDER}
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = rows < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    {optional(epilogue.gated, "acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)")}
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        {optional(cast_w, "w = w.to(x.dtype)")}
        acc = tile_product(x, w, acc, UPCAST, DOT)
        {optional(epilogue.gated, "w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)")}
        {optional(epilogue.gated and cast_w, "w_up = w_up.to(x.dtype)")}
        {optional(epilogue.gated, "acc_up = tile_product(x, w_up, acc_up, UPCAST, DOT)")}
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: {", ".join(epilogue.steps) or "none"}
{chr(10).join("    " + line for line in epilogue.lines())}
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
'''


def _launch(name: str, epilogue: Epilogue, configs: list, out_dtype: str) -> str:
    extras = epilogue.params
    extra_args = "".join(", " + p for p in extras)
    flatten = [f"    {p} = {p}.expand(out.shape).reshape(-1, N)" for p in extras if p.startswith("residual")]
    strides = [f"{p}.stride(0)" if p.startswith("bias") else f"{p}.stride(0), {p}.stride(1)" for p in extras]
    table = "\n".join(f"    ({limit}, [\n" + "".join(f"        {cfg},\n" for cfg in candidates) + "    ]),"
                      for limit, candidates in configs)
    return f'''# (largest M, candidate tiles): the first row whose limit admits M is used; on a GPU the
# fastest candidate is timed once per power-of-two M (fuselm's tuning.py), elsewhere the first
CONFIGS = [
{table}
]


def launch(x, w{extra_args}):
    """out[..., N] = epilogue(x[..., K] @ w^T): checks, allocates, picks the tile, launches."""
    K = x.shape[-1]
    N = w.shape[0]{" // 2" if epilogue.gated else ""}
    assert w.dim() == 2 and w.shape[1] == K{" and w.shape[0] % 2 == 0" if epilogue.gated else ""}, f"x {{tuple(x.shape)}} and w {{tuple(w.shape)}} disagree"
    out = torch.empty((*x.shape[:-1], N), device=x.device, dtype={out_dtype})
    x = x.reshape(-1, K)
    M = x.shape[0]
    if M == 0:
        return out
{chr(10).join(flatten) or OMIT}
    out2d = out.view(-1, N)
    candidates = next(candidates for limit, candidates in CONFIGS if limit is None or M <= limit)
    shape = ("{name}", power_of_two_bucket(M), N, K)
    cfg = fastest_config(shape, candidates, lambda cfg: launch_tile(cfg, x, w, out2d{extra_args}))
    launch_tile(cfg, x, w, out2d{extra_args})
    return out


def launch_tile(cfg, x, w, out2d{extra_args}):
    """One launch with the tile and launch options `cfg`."""
    (M, K), N = x.shape, out2d.shape[1]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    {name}_kernel[grid](
        x, w, out2d{extra_args},
        M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out2d.stride(0), out2d.stride(1){"".join(", " + s for s in strides)},
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16, **cfg,
    )
'''
