"""varlen_attention(q, k, v, cu_seqlens) {scale, causal}: flash attention over
packed sequences (no padding).

q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, H, Dv]; sequence n owns rows
cu_seqlens[n]:cu_seqlens[n+1] and its queries see its keys only (causal: keys at or
before their own row); query head h reads kv head h // (H // Hkv) (ir/varlen_ops.py).

Programs: axis 1 is the query head; axis 0 numbers query blocks of BLOCK_M rows so that
sequence n's blocks start at cu_seqlens[n] // BLOCK_M + n (paged_attention's numbering;
the shared `query_block` finds a program's sequence by binary search). T // BLOCK_M + N
programs cover every sequence's blocks, at most N more than there are, without the host
reading the lengths (no device sync: the launch stays capturable in a CUDA graph).
Per block, the sequence is one (batch, head) of attention.py: its kernel lines
(`attend_source`) walk the keys in BLOCK_N blocks with an online softmax, masked loads
for the tails, fp32 statistics. The sequences cover the rows (cu_seqlens[0] = 0,
cu_seqlens[N] = T): a row outside every sequence is not written.
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.graph import Node
from ...ir.types import dim_str
from .attention import _CONFIGS, attend_source
from .device_functions import ONLINE_SOFTMAX, QUERY_BLOCK, mma_source
from .module import GeneratedKernel, drop_omitted, number_token, torch_dtype_name

OPS = ("varlen_attention",)


def generate(node: Node) -> GeneratedKernel:
    q, k, v = (value.type for value in node.inputs[:3])
    causal, scale = bool(node.attrs.get("causal", False)), node.attrs.get("scale")
    if q.dtype not in ("f32", "f16", "bf16"):
        raise UnsupportedKernelError(f"varlen_attention kernels take float inputs, got q {q}")
    heads = f"h{dim_str(q.shape[1])}" + (f"_kv{dim_str(k.shape[1])}" if not q.shape[1] == k.shape[1] else "")
    parts = ["varlen_attention", heads, f"d{dim_str(q.shape[2])}", f"dv{dim_str(v.shape[2])}",
             *(["causal"] if causal else []), *([f"scale{number_token(scale)}"] if scale is not None else []), q.dtype]
    name = "_".join(parts)
    params = ("q", "k", "v", "cu_seqlens")
    body = "\n\n".join([mma_source(q.dtype), ONLINE_SOFTMAX, QUERY_BLOCK, _kernel(name, causal, k.dtype != q.dtype),
                        _launch(name, params, scale, _CONFIGS["f32" if q.dtype == "f32" else "half"],
                                torch_dtype_name(node.type.dtype))])
    summary = (f"{'causal ' if causal else ''}varlen flash attention, {heads.replace('_', ' ')} heads of "
               f"{q.shape[2]}, {q.dtype}")
    return GeneratedKernel(name, summary, drop_omitted(body), params)


def _kernel(name: str, causal: bool, cast_kv: bool) -> str:
    return f'''@triton.jit(do_not_specialize=["num_seqs"])  # the batch varies: no recompiles
def {name}_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr,
    # sizes
    num_seqs, KV_GROUP, D, DV,
    # strides ([token, head, feature] for each)
    stride_qs, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_os, stride_oh, stride_od,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """BLOCK_M query rows of one sequence and head against that sequence's keys."""
    head = tl.program_id(axis=1)
    kv_head = head // KV_GROUP
    seq, start, S_Q, start_m = query_block(cu_seqlens_ptr, num_seqs, tl.program_id(axis=0), BLOCK_M)
    S_K = tl.where(start_m < S_Q, S_Q, 0)  # a program past its sequence's rows visits no keys
    first = start.to(tl.int64)
    q_base = q_ptr + first * stride_qs + head * stride_qh
    k_base = k_ptr + first * stride_ks + kv_head * stride_kh
    v_base = v_ptr + first * stride_vs + kv_head * stride_vh
    out_base = out_ptr + first * stride_os + head * stride_oh
{attend_source(causal, cast_kv=cast_kv)}'''


def _launch(name: str, params: tuple, scale, config: dict, out_dtype: str) -> str:
    return f'''CONFIG = {config}
SCALE = {scale!r}  # None: 1 / sqrt(D)


def launch({", ".join(params)}):
    """Checks, allocates out[T, H, Dv], launches one program per BLOCK_M rows of a sequence and head."""
    T, H, D = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    N = cu_seqlens.shape[0] - 1
    assert k.shape == (T, HKV, D) and v.shape[:2] == (T, HKV) and H % HKV == 0 and cu_seqlens.is_contiguous()
    out = torch.empty((T, H, DV), device=q.device, dtype={out_dtype})
    if out.numel() == 0 or N <= 0:
        return out
    scale = D ** -0.5 if SCALE is None else SCALE
    grid = (T // CONFIG["BLOCK_M"] + N, H)  # sequence n's blocks start at cu_seqlens[n] // BLOCK_M + n
    {name}_kernel[grid](
        q, k, v, cu_seqlens, out,
        N, H // HKV, D, DV,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        scale * 1.4426950408889634,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16, **CONFIG,
    )
    return out
'''
