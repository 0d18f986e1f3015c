"""`--profile --plot FILE.png`: the profiled kernels on this machine's roofline.

x is arithmetic intensity (FLOPs per byte the kernel must move), y achieved GFLOP/s,
both logarithmic. The roof is min(peak compute, bandwidth x intensity): a kernel far
below it has headroom; left of the ridge it is bound by memory, right of it by compute.
A point's area follows the kernel's share of the forward's time. Kernels that compute
nothing (a cache write, a copy) have no intensity and are left off.
"""
from __future__ import annotations

from pathlib import Path

from .plotting import new_figure

MAX_LABELS = 12  # the slowest kernels are named; the rest are unlabelled points


def plot_roofline(result, path) -> None:
    rows = [row for row in result.rows if row.flops > 0 and row.bytes > 0 and row.seconds > 0]
    ceilings = result.ceilings
    total = sum(row.seconds for row in result.rows) or 1.0
    figure = new_figure("--plot", figsize=(9, 6), dpi=100)
    axes = figure.add_subplot()
    intensities = [row.intensity for row in rows] + [ceilings.ridge]
    low, high = min(intensities) / 4, max(intensities) * 4
    xs = [low, ceilings.ridge, high]
    axes.loglog(xs, [min(ceilings.gflops, ceilings.gbytes_per_second * x) for x in xs], color="black",
                label=f"roof: {ceilings.gbytes_per_second:.1f} GB/s, {ceilings.gflops:.1f} GFLOP/s")
    axes.scatter([row.intensity for row in rows], [row.gflops for row in rows],
                 s=[20 + 600 * row.seconds / total for row in rows], alpha=0.6)
    for row in rows[:MAX_LABELS]:
        axes.annotate(row.kernel, (row.intensity, row.gflops), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("arithmetic intensity (FLOP / byte)")
    axes.set_ylabel("achieved GFLOP/s")
    sizes = ", ".join(f"{k}={v}" for k, v in sorted(result.sizes.items()))
    axes.set_title(f"kernels on the roofline ({sizes or 'static sizes'})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(Path(path), format="png")
