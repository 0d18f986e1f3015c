"""Float weights -> their quantized parts (the formats of ir/quant_ops.py), in torch.

A format's grid is its scales (and int4's offsets) per group of an [n, k] weight; `encode`
rounds each weight to the nearest point of a grid and returns {part name: tensor}: what
`dequantize(**parts)` turns back into (approximately) the same weight. Scales are
computed in f32, stored in `scale_dtype`, and the integers are rounded against the
stored scale, so the stored parts are the best codes for what a kernel will read.
Round-to-nearest is `quantize_weight`; GPTQ (quant/gptq.py) picks other points of the
same grid.
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


def per_column(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :k]


def int8_grid(w: torch.Tensor, group_size: int, scale_dtype=torch.float32) -> dict:
    """Symmetric int8: scale = max|w| / 127 per group."""
    amax = _grouped(w.float().abs(), group_size, 0.0).amax(dim=-1)
    return {"scale": torch.where(amax > 0, amax / INT8_LIMIT, torch.ones_like(amax)).to(scale_dtype)}


def int4_grid(w: torch.Tensor, group_size: int, scale_dtype=torch.float16) -> dict:
    """Asymmetric 4-bit: offset = the group's minimum, scale = its range / 15."""
    w = w.float()
    low = _grouped(w, group_size, float("inf")).amin(dim=-1)
    high = _grouped(w, group_size, float("-inf")).amax(dim=-1)
    offset = low.to(scale_dtype)
    return {"scale": ((high - offset.float()) / 15).to(scale_dtype), "offset": offset}


def nf4_grid(w: torch.Tensor, group_size: int, scale_dtype=torch.float16) -> dict:
    """NormalFloat-4: scale = max|w| per group."""
    amax = _grouped(w.float().abs(), group_size, 0.0).amax(dim=-1)
    return {"scale": torch.where(amax > 0, amax, torch.ones_like(amax)).to(scale_dtype)}


def _nf4_midpoints(device) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, device=device)
    return (levels[1:] + levels[:-1]) / 2


def nearest_codes(w: torch.Tensor, format: str, scale: torch.Tensor, offset=None) -> torch.Tensor:
    """The codes of the grid points nearest to `w` (f32), with `scale` (and the int4
    `offset`) broadcast against it: int8 -127..127, int4 0..15, NF4 level indices
    (ties to the lower level)."""
    if format == "int8":
        return torch.round(w / scale).clamp(-INT8_LIMIT, INT8_LIMIT)
    if format == "int4":
        codes = torch.round((w - offset) / torch.where(scale > 0, scale, 1.0))
        return torch.where(scale > 0, codes, 0).clamp(0, 15)
    return torch.bucketize(w / scale, _nf4_midpoints(w.device))


def code_values(codes: torch.Tensor, format: str, scale: torch.Tensor, offset=None) -> torch.Tensor:
    """The weights `codes` stand for: `nearest_codes` undone."""
    if format == "int8":
        return codes * scale
    if format == "int4":
        return codes * scale + offset
    return torch.tensor(NF4_LEVELS, device=codes.device)[codes] * scale


def encode(w: torch.Tensor, format: str, grid: dict, group_size: int) -> dict:
    """`w` rounded to the nearest points of `grid` (its scales, and offsets for int4),
    as the parts a kernel reads."""
    k = w.shape[1]
    columns = {name: per_column(t, k, group_size) for name, t in grid.items()}
    return {"q": packed_codes(nearest_codes(w.float(), format, columns["scale"], columns.get("offset")), format),
            **grid}


def packed_codes(codes: torch.Tensor, format: str) -> torch.Tensor:
    """[n, k] codes as the `q` part: int8 as they are, 4-bit codes two to a byte."""
    return codes.to(torch.int8) if format == "int8" else pack_nibbles(codes)


def quantize_int8(w: torch.Tensor, group_size: int, scale_dtype=torch.float32) -> dict:
    return encode(w, "int8", int8_grid(w, group_size, scale_dtype), group_size)


GRIDS = {"int8": int8_grid, "int4": int4_grid, "nf4": nf4_grid}


def weight_grid(w: torch.Tensor, format: str, group_size: int) -> dict:
    """The scales (and offsets) that quantize `w` in `format`: int8 keeps f32 scales per
    output channel, f16 per group; the 4-bit formats keep f16."""
    if format == "int8":
        return int8_grid(w, group_size, torch.float32 if group_size >= w.shape[1] else torch.float16)
    return GRIDS[format](w, group_size)


def quantize_weight(w: torch.Tensor, format: str, group_size: int) -> dict:
    """`w`'s parts in `format`, each weight rounded to its nearest grid point."""
    return encode(w, format, weight_grid(w, format, group_size), group_size)


def smoothing_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s [k]: x / s and w * s move activation outliers into the weight."""
    w_absmax = w.float().abs().amax(dim=0).clamp(min=1e-5)
    s = x_absmax.float().clamp(min=1e-5) ** alpha / w_absmax ** (1 - alpha)
    return s.clamp(min=1e-5)


def outlier_features(x_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8's outlier features: i64 indices of the inputs with max |x| > threshold."""
    return torch.nonzero(x_absmax > threshold).flatten().to(torch.int64)
