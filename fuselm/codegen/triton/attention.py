"""attention(q, k, v[, mask]) {causal, scale, gqa} as a flash-attention kernel.

q [B, H, S_q, D], k [B, Hkv, S_k, D], v [B, Hkv, S_k, Dv] -> [B, H, S_q, Dv]. Each program
owns BLOCK_M query rows of one (batch, head) and walks the keys in BLOCK_N blocks with
an online softmax (base-2 exponentials, fp32 statistics), so the S_q x S_k scores never
reach memory. Query head h reads kv head h // (H // Hkv) (grouped-query attention).
Generated parts: the causal bound (top-left aligned, as torch's is_causal) and the mask
form: none, bool (True = attend) or additive float, any shape that broadcasts to
[B, H, S_q, S_k] (BERT's padding mask is [B, 1, 1, S]); broadcast axes get stride 0.
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.graph import Node
from ...ir.types import dim_str
from .device_functions import ONLINE_SOFTMAX, mma_source
from .module import GeneratedKernel, drop_omitted, number_token, optional, torch_dtype_name

OPS = ("attention",)

_CONFIGS = {
    "half": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "f32": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
}


def generate(node: Node) -> GeneratedKernel:
    q, k, v = (value.type for value in node.inputs[:3])
    mask = node.inputs[3].type if len(node.inputs) > 3 else None
    causal, scale = bool(node.attrs.get("causal", False)), node.attrs.get("scale")
    if q.dtype not in ("f32", "f16", "bf16"):
        raise UnsupportedKernelError(f"attention kernels take float inputs, got q {q}")
    if scale is not None and isinstance(q.shape[-1], int) and abs(scale - q.shape[-1] ** -0.5) < 1e-12:
        scale = None  # the default, spelled out by the frontend
    mask_kind = None if mask is None else ("bool" if mask.dtype == "bool" else "additive")
    heads = f"h{dim_str(q.shape[1])}" + (f"_kv{dim_str(k.shape[1])}" if not q.shape[1] == k.shape[1] else "")
    parts = ["attention", heads, f"d{dim_str(q.shape[-1])}", *(["causal"] if causal else []),
             *([f"{mask_kind}mask"] if mask else []), *([f"scale{number_token(scale)}"] if scale is not None else []), q.dtype]
    name = "_".join(parts)
    params = ("q", "k", "v", *(("mask",) if mask else ()))
    body = "\n\n".join([mma_source(q.dtype), ONLINE_SOFTMAX, _kernel(name, causal, mask_kind, k.dtype != q.dtype),
                        _launch(name, params, mask_kind, scale, _CONFIGS["f32" if q.dtype == "f32" else "half"],
                                torch_dtype_name(node.type.dtype))])
    summary = (f"{'causal ' if causal else ''}flash attention, {heads.replace('_', ' ')} heads of {q.shape[-1]}"
               f"{', ' + mask_kind + ' mask' if mask else ''}, {q.dtype}")
    return GeneratedKernel(name, summary, drop_omitted(body), params)


def _kernel(name: str, causal: bool, mask_kind, cast_kv: bool) -> str:
    return f'''@triton.jit(do_not_specialize=["S_Q", "S_K"])  # sequence lengths vary: no recompiles
def {name}_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    # sizes
    H, KV_GROUP, S_Q, S_K, D, DV,
    # strides ([batch, head, position, feature] for each; the mask's are 0 where it broadcasts)
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_os, stride_od,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """BLOCK_M query rows of one (batch, head) against all the keys it may see."""
    start_m = tl.program_id(axis=0) * BLOCK_M
    batch = tl.program_id(axis=1) // H
    head = tl.program_id(axis=1) % H
    kv_head = head // KV_GROUP
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
    mask_base = mask_ptr + batch.to(tl.int64) * stride_mb + head * stride_mh
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh
{attend_source(causal, mask_kind, cast_kv)}'''


def attend_source(causal: bool, mask_kind=None, cast_kv: bool = False) -> str:
    """The kernel lines of one query block against one head's keys (flash attention),
    shared with varlen_attention.py: they read q_base, k_base, v_base (mask_base) and
    out_base (one head of one sequence, `stride_*s` between positions), start_m, the
    lengths S_Q and S_K, the head dims D and DV and the BLOCK_* sizes, and store the rows."""
    return f'''    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_mask = rows < S_Q
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    {"hi = tl.minimum(S_K, start_m + BLOCK_M)  # causal: keys past the last row are hidden" if causal else "hi = S_K"}
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_mask = cols < S_K
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=col_mask[None, :] & (offs_d < D)[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                    mask=col_mask[:, None] & (offs_dv < DV)[None, :], other=0.0)
        {optional(cast_kv, "k = k.to(q.dtype)")}
        scores = mma(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST) * qk_scale
        visible = row_mask[:, None] & col_mask[None, :]
        {optional(causal, "visible = visible & (cols[None, :] <= rows[:, None])")}
        {optional(mask_kind is not None, "mask_ptrs = mask_base + rows[:, None] * stride_mq + cols[None, :] * stride_mk")}
        {optional(mask_kind == "bool", "visible = visible & (tl.load(mask_ptrs, mask=visible, other=0) != 0)")}
        {optional(mask_kind == "additive", "scores += tl.load(mask_ptrs, mask=visible, other=0.0).to(tl.float32) * 1.4426950408889634")}
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, UPCAST)

    out = finish_softmax(acc, l_i)
    out_ptrs = out_base + rows[:, None] * stride_os + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_dv < DV)[None, :])
'''


def _launch(name: str, params: tuple, mask_kind, scale, config: dict, out_dtype: str) -> str:
    mask_line = {
        None: "mask = q  # unused; its strides are never read",
        "bool": "mask = mask.expand(B, H, S_Q, S_K).view(torch.uint8)",
        "additive": "mask = mask.expand(B, H, S_Q, S_K)",
    }[mask_kind]
    mask_strides = "0, 0, 0, 0" if mask_kind is None else "*mask.stride()"
    return f'''CONFIG = {config}
SCALE = {scale!r}  # None: 1 / sqrt(D)


def launch({", ".join(params)}):
    """Checks, allocates out[B, H, S_q, Dv], launches one program per BLOCK_M rows of a head."""
    B, H, S_Q, D = q.shape
    HKV, S_K, DV = k.shape[1], k.shape[2], v.shape[3]
    assert k.shape == (B, HKV, S_K, D) and v.shape[:3] == (B, HKV, S_K) and H % HKV == 0
    out = torch.empty((B, H, S_Q, DV), device=q.device, dtype={out_dtype})
    if out.numel() == 0:
        return out
    {mask_line}
    scale = D ** -0.5 if SCALE is None else SCALE
    grid = (triton.cdiv(S_Q, CONFIG["BLOCK_M"]), B * H)
    {name}_kernel[grid](
        q, k, v, mask, out,
        H, H // HKV, S_Q, S_K, D, DV,
        *q.stride(), *k.stride(), *v.stride(), {mask_strides}, *out.stride(),
        scale * 1.4426950408889634,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16, **CONFIG,
    )
    return out
'''
