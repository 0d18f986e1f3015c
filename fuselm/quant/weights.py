"""Float weights -> their quantized parts (the formats of ir/quant_ops.py), in torch.

Each function takes an [n, k] floating-point weight and returns {part name: tensor}:
what `dequantize(**parts)` turns back into (approximately) the same weight. Scales are
computed in f32, stored in `scale_dtype`, and the integers are rounded against the
stored scale, so the stored parts are the best codes for what a kernel will read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.quant_ops import NF4_LEVELS, groups, pack_nibbles

INT8_LIMIT = 127


def _grouped(w: torch.Tensor, group_size: int, pad: float) -> torch.Tensor:
    """[n, k] -> [n, G, group_size], the last group padded with `pad`."""
    n, k = w.shape
    count = groups(k, group_size)
    return F.pad(w, (0, count * group_size - k), value=pad).reshape(n, count, group_size)


def _per_column(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :k]


def quantize_int8(w: torch.Tensor, group_size: int, scale_dtype=torch.float32) -> dict:
    """Symmetric int8: scale = max|w| / 127 per group."""
    w = w.float()
    amax = _grouped(w.abs(), group_size, 0.0).amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_LIMIT, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(w / _per_column(scale, w.shape[1], group_size)).clamp(-INT8_LIMIT, INT8_LIMIT)
    return {"q": q.to(torch.int8), "scale": scale}


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype=torch.float16) -> dict:
    """Asymmetric 4-bit: offset = the group's minimum, scale = its range / 15."""
    w = w.float()
    low = _grouped(w, group_size, float("inf")).amin(dim=-1)
    high = _grouped(w, group_size, float("-inf")).amax(dim=-1)
    offset = low.to(scale_dtype)
    scale = ((high - offset.float()) / 15).to(scale_dtype)
    k = w.shape[1]
    step = _per_column(scale, k, group_size)
    codes = torch.round((w - _per_column(offset, k, group_size)) / torch.where(step > 0, step, 1.0))
    codes = torch.where(step > 0, codes, 0).clamp(0, 15)
    return {"q": pack_nibbles(codes), "scale": scale, "offset": offset}


def quantize_nf4(w: torch.Tensor, group_size: int, scale_dtype=torch.float16) -> dict:
    """NormalFloat-4: scale = max|w| per group, codes the nearest NF4 level of w / scale."""
    w = w.float()
    amax = _grouped(w.abs(), group_size, 0.0).amax(dim=-1)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)).to(scale_dtype)
    normalized = w / _per_column(scale, w.shape[1], group_size)
    levels = torch.tensor(NF4_LEVELS)
    midpoints = (levels[1:] + levels[:-1]) / 2  # the nearest level, ties to the lower one
    codes = torch.bucketize(normalized, midpoints)
    return {"q": pack_nibbles(codes), "scale": scale}


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "nf4": quantize_nf4}


def quantize_weight(w: torch.Tensor, format: str, group_size: int) -> dict:
    """`w`'s parts in `format`; int8 keeps f32 scales per output channel, f16 per group."""
    if format == "int8":
        return quantize_int8(w, group_size, torch.float32 if group_size >= w.shape[1] else torch.float16)
    return QUANTIZERS[format](w, group_size)


def smoothing_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s [k]: x / s and w * s move activation outliers into the weight."""
    w_absmax = w.float().abs().amax(dim=0).clamp(min=1e-5)
    s = x_absmax.float().clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)
    return s.clamp(min=1e-5)


def outlier_features(x_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8's outlier features: i64 indices of the inputs with max |x| > threshold."""
    return torch.nonzero(x_absmax > threshold).flatten().to(torch.int64)
