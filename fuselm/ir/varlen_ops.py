"""Variable-length packing ops: padded `[B, S, ...]` activations as packed `[T, ...]` rows.

The `pack_varlen` pass rewrites an encoder's token-wise work onto the T real tokens of a
padded batch (effective_transformer, ByteTransformer, TensorRT-LLM's
remove_input_padding). Three graph inputs, computed on the host from the padding mask
by `fuselm.runtime.varlen.varlen_inputs`, describe the packing:

- `varlen_tokens i64[T]`: the flat position `b * S + s` of each real token, batch-major;
- `varlen_positions i64[B, S]`: the packed row of each padded position, -1 at padding;
- `varlen_cu_seqlens i32[B + 1]`: sequence b owns packed rows `cu[b] : cu[b + 1]`.

- `pack(x [B, S, *R], tokens i64[T]) -> [T, *R]`: the real tokens' rows of x.
- `unpack(p [T, *R], positions i64[B, S]) -> [B, S, *R]`: the padded form, zeros at
  padding (where eager computes values no real position reads).
- `varlen_attention(q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv], cu_seqlens i32[N + 1])
  {scale, causal} -> [T, H, Dv]`: each sequence's queries attend to that sequence's keys
  only (causal: to keys at or before their own row); query head h reads kv head
  h // (H / Hkv). The kernels size their work from T and N alone (cu_seqlens[0] = 0,
  cu_seqlens[N] = T), so no bound on a sequence's length is needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import IRTypeError, register
from .types import TensorType, dims_equal

TOKENS, POSITIONS, CU_SEQLENS = "varlen_tokens", "varlen_positions", "varlen_cu_seqlens"


def _pack_infer(types, attrs):
    x, tokens = types
    if x.rank < 2 or tokens.rank != 1 or tokens.dtype != "i64":
        raise IRTypeError(f"pack takes x [B, S, ...] and tokens i64[T], got {x}, {tokens}")
    return x.with_shape(tokens.shape + x.shape[2:])


def pack_reference(x, tokens):
    return x.reshape(-1, *x.shape[2:]).index_select(0, tokens)


def _unpack_infer(types, attrs):
    packed, positions = types
    if packed.rank < 1 or positions.rank != 2 or positions.dtype != "i64":
        raise IRTypeError(f"unpack takes packed [T, ...] and positions i64[B, S], got {packed}, {positions}")
    return packed.with_shape(positions.shape + packed.shape[1:])


def unpack_reference(packed, positions):
    flat = positions.reshape(-1)
    rows = packed.index_select(0, flat.clamp(min=0)) if packed.shape[0] else packed.new_zeros((flat.numel(),) + packed.shape[1:])
    keep = (flat >= 0).reshape((-1,) + (1,) * (packed.dim() - 1))
    return torch.where(keep, rows, torch.zeros((), dtype=packed.dtype)).reshape(*positions.shape, *packed.shape[1:])


def _varlen_attention_infer(types, attrs):
    q, k, v, cu = types
    if q.rank != 3 or k.rank != 3 or v.rank != 3 or cu.rank != 1 or cu.dtype != "i32":
        raise IRTypeError(f"varlen_attention takes q, k, v [T, H, D] and cu_seqlens i32[N+1], got {q}, {k}, {v}, {cu}")
    if not (dims_equal(q.shape[0], k.shape[0]) and dims_equal(k.shape[0], v.shape[0])
            and dims_equal(k.shape[1], v.shape[1]) and dims_equal(q.shape[2], k.shape[2])):
        raise IRTypeError(f"varlen_attention: q {q}, k {k} and v {v} disagree on tokens, kv heads or head dim")
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        raise IRTypeError(f"varlen_attention: {q.shape[1]} query heads do not share {k.shape[1]} kv heads evenly")
    return TensorType(q.shape[:2] + v.shape[2:], q.dtype)


def varlen_attention_reference(q, k, v, cu_seqlens, *, scale=None, causal=False):
    """Sequence by sequence through SDPA (slow and obvious)."""
    out = q.new_zeros(q.shape[:2] + v.shape[2:])
    bounds = cu_seqlens.tolist()
    group = q.shape[1] // k.shape[1]
    for start, end in zip(bounds, bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = (qs.float() @ ks.float().transpose(1, 2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        if causal:
            length = end - start
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        out[start:end] = (F.softmax(scores, -1) @ vs.float()).transpose(0, 1).to(out.dtype)
    return out


register("pack", _pack_infer, pack_reference, inputs=2)
register("unpack", _unpack_infer, unpack_reference, inputs=2)
register("varlen_attention", _varlen_attention_infer, varlen_attention_reference, inputs=4, heavy=True)
