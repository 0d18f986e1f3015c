"""Choosing a kernel's tile by measurement: the fastest candidate config for a shape,
timed once per process on the GPU (what Triton's autotuner and inductor's max-autotune do).

Generated gemm modules call `fastest_config` with their candidates for small M, where
the best tile depends on the card and the weight's shape (how many programs fill the
SMs, how many bytes each keeps in flight). Timing uses `triton.testing.do_bench`, which
flushes the L2 cache before each run, so weights are read from memory as in decode.
There is no choice to make, and the first candidate is used, in Triton's interpreter,
with a single candidate, or while a CUDA graph is being captured (nothing can be timed
then; the engine's warm-up before each capture tunes the shapes it will see).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Hashable

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_chosen: dict = {}  # key -> the config found fastest


def fastest_config(key: Hashable, candidates: list, launch: Callable[[dict], object]) -> dict:
    """The fastest of `candidates` for `key` (kernel and shape), timing `launch(config)`."""
    if INTERPRETED or len(candidates) == 1:
        return candidates[0]
    chosen = _chosen.get(key)
    if chosen is None:
        if torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = [_median_ms(launch, config) for config in candidates]
        chosen = _chosen[key] = candidates[times.index(min(times))]
    return chosen


def _median_ms(launch: Callable[[dict], object], config: dict) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20, return_mode="median")
    except Exception:  # noqa: BLE001 - e.g. a tile needing more shared memory than the card has
        return math.inf


def power_of_two_bucket(m: int) -> int:
    """Token counts that share a tuned tile: 1, 2, 4, 8, ..."""
    return 1 << max(m - 1, 0).bit_length()
