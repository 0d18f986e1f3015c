"""GPTQ (Frantar et al., 2022): rounding that minimizes a layer's output error.

Round-to-nearest picks each weight's nearest grid point on its own. GPTQ rounds a
weight's input columns one at a time and moves each column's rounding error onto the
columns not yet rounded, as the calibration inputs correlate them: it minimizes
||X W^T - X Q^T||^2 over the calibration rows X through H = X^T X (`input_gram` of
quant/calibration.py), as the Optimal Brain Surgeon update with H's inverse in its
Cholesky form.

The grid is fixed first, from the float weight (round-to-nearest's scales and offsets,
"static groups"), so the parts are the formats and bytes of quant/weights.py and any
point of the grid may be chosen. Columns go in decreasing order of H's diagonal ("act
order": the features with the largest inputs first, while the most columns remain to
absorb their error), BLOCK at a time: within a block the error moves column by column,
to the later blocks in one matrix product.
"""
from __future__ import annotations

import torch

from ..threads import one_torch_thread
from .weights import code_values, nearest_codes, packed_codes, per_column, weight_grid

DAMPING = 0.01  # of H's mean diagonal, added to it: H is singular when few rows calibrate
BLOCK = 128


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, format: str, group_size: int,
                  damping: float = DAMPING) -> dict:
    """[n, k] float weight -> its parts in `format` (as `quantize_weight` returns them),
    rounded by GPTQ against `gram`, the [k, k] X^T X of the inputs the weight multiplies."""
    # its ops are small (a column of the weight at a time): on more threads their
    # fork/join costs more than they do, and on a busy machine (2 threads, 2 cores busy)
    # 30x more (0.4 s -> 12 s for a 384 x 1536 weight)
    with one_torch_thread():
        return _gptq(w, gram, format, group_size, damping)


def _gptq(w: torch.Tensor, gram: torch.Tensor, format: str, group_size: int, damping: float) -> dict:
    n, k = w.shape
    grid = weight_grid(w, format, group_size)
    h = gram.double().clone()
    never_seen = torch.diagonal(h) == 0  # a feature no calibration input had: rounded to nearest
    h[never_seen, never_seen] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    h.diagonal().add_(damping * h.diagonal().mean())
    # the upper Cholesky factor of H^-1: row i is the update that column i's error makes
    # to the columns after it, with the columns before it already fixed
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    # transposed, [k, n]: a column of the weight is a contiguous row here
    steps = {name: per_column(t, k, group_size)[:, order].T.contiguous() for name, t in grid.items()}
    scale, offset = steps["scale"], steps.get("offset")
    work = w.float()[:, order].T.contiguous()
    codes = torch.empty(k, n, dtype=torch.int64)
    errors = torch.empty(k, n)
    _round_columns(work, codes, errors, inverse, format, scale, offset)
    unpermuted = torch.empty(n, k, dtype=torch.int64)
    unpermuted[:, order] = codes.T
    return {"q": packed_codes(unpermuted, format), **grid}


def _round_columns(work, codes, errors, inverse, format, scale, offset) -> None:
    """GPTQ's loop over the transposed weight `work` [k, n], in place: codes[j] for each
    column j in order, its error moved onto the columns after it."""
    k = work.shape[0]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        for j in range(start, end):
            column_offset = offset[j] if offset is not None else None
            code = nearest_codes(work[j], format, scale[j], column_offset)
            codes[j] = code
            error = errors[j]
            torch.sub(work[j], code_values(code, format, scale[j], column_offset), out=error)
            error /= inverse[j, j]
            work[j:end].addr_(inverse[j, j:end], error, alpha=-1.0)
        work[end:].addmm_(inverse[start:end, end:].T, errors[start:end], alpha=-1.0)
