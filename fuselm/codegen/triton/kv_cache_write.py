"""kv_cache_write: scatter the new tokens' keys and values into the paged cache, in place.

key/value [T, Hkv, D] (any strides, e.g. column slices of a fused qkv output) go to
kv_cache[layer, 0 | 1, slot // BS, slot % BS] for slot = slot_mapping[t]; slots < 0
(padding tokens) are skipped. One program per token writes all its heads. With
`rope=true` the keys are rotated (rotate-half, cos/sin [T, D]) on the way in. `run`
returns the cache tensor it was given, updated (the IR op aliases its first input).
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.graph import Node
from ...ir.types import dim_str
from .device_functions import ROPE
from .module import GeneratedKernel, drop_omitted, optional

OPS = ("kv_cache_write",)


def generate(node: Node) -> GeneratedKernel:
    cache, key = node.inputs[0].type, node.inputs[1].type
    rope, layer = bool(node.attrs.get("rope", False)), int(node.attrs["layer"])
    if cache.rank != 6 or key.rank != 3:
        raise UnsupportedKernelError(f"kv_cache_write takes a [L,2,NB,BS,Hkv,D] cache and [T,Hkv,D] keys, got {cache}, {key}")
    parts = ["kv_cache_write", f"kv{dim_str(key.shape[1])}", f"d{dim_str(key.shape[2])}", f"layer{layer}",
             *(["rope"] if rope else []), cache.dtype]
    if key.dtype != cache.dtype:
        parts.append(f"from{key.dtype}")
    name = "_".join(parts)
    params = ("kv_cache", "key", "value", "slot_mapping", *(("cos", "sin") if rope else ()))
    body = "\n\n".join(([ROPE] if rope else []) + [_kernel(name, rope), _launch(name, params, rope, layer)])
    summary = f"store {key.shape[1]} kv heads of {key.shape[2]} per token in cache layer {layer}{' with rope on the keys' if rope else ''}"
    return GeneratedKernel(name, summary, drop_omitted(body), params)


def _kernel(name: str, rope: bool) -> str:
    return f'''@triton.jit
def {name}_kernel(
    # pointers
    key_ptr, value_ptr, slot_mapping_ptr, cache_ptr, cos_ptr, sin_ptr,
    # sizes
    num_kv_heads, head_dim, block_size,
    # strides: key/value [T, Hkv, D], the layer's cache [2, NB, BS, Hkv, D], cos/sin [T, D]
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_ct, stride_cosd, stride_st, stride_sind,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Writes token t's keys and values (all heads) to its slot, unless the slot is < 0."""
    token = tl.program_id(axis=0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.where(slot >= 0, num_kv_heads, 0)  # a padding token (slot < 0) writes nothing
    mask = (offs_h < heads)[:, None] & (offs_d < head_dim)[None, :]
    dest = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    dest += offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
    key_rows = key_ptr + token * stride_kt + offs_h[:, None] * stride_kh
    k = tl.load(key_rows + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
    {optional(rope, "partner = tl.load(key_rows + rope_partner(offs_d, head_dim)[None, :] * stride_kd, mask=mask, other=0.0)")}
    {optional(rope, "cos = tl.load(cos_ptr + token * stride_ct + offs_d * stride_cosd, mask=offs_d < head_dim, other=0.0).to(tl.float32)")}
    {optional(rope, "sin = tl.load(sin_ptr + token * stride_st + offs_d * stride_sind, mask=offs_d < head_dim, other=0.0).to(tl.float32)")}
    {optional(rope, "k = apply_rope(k.to(tl.float32), partner.to(tl.float32), cos[None, :], sin[None, :], offs_d, head_dim)")}
    tl.store(dest, k.to(cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
    tl.store(dest + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)
'''


def _launch(name: str, params: tuple, rope: bool, layer: int) -> str:
    rope_strides = "*cos.stride(), *sin.stride()" if rope else "0, 0, 0, 0"
    return f'''LAYER = {layer}


def launch({", ".join(params)}):
    """Checks, launches one program per token; returns kv_cache itself, written in place."""
    T, HKV, D = key.shape
    L, _, NB, BS, _, _ = kv_cache.shape
    assert kv_cache.shape[1] == 2 and kv_cache.shape[4:] == (HKV, D) and value.shape == (T, HKV, D)
    assert slot_mapping.shape == (T,) and slot_mapping.is_contiguous() and 0 <= LAYER < L
    {optional(rope, "assert cos.shape == (T, D) and sin.shape == (T, D)")}
    {optional(not rope, "cos = sin = key  # unused")}
    if T == 0:
        return kv_cache
    cache = kv_cache[LAYER]  # torch computes the layer's offset (no int32 overflow in the kernel)
    {name}_kernel[(T,)](
        key, value, slot_mapping, cache, cos, sin,
        HKV, D, BS,
        *key.stride(), *value.stride(), *cache.stride(), {rope_strides},
        BLOCK_H=triton.next_power_of_2(HKV), BLOCK_D=triton.next_power_of_2(D),
    )
    return kv_cache
'''
