"""fuselm's generic kernels, one op at a time, against torch eager. Not a test.

    python benchmarks/ops.py [--target cpu] [--threads N] [--ops add,matmul,...] [--rounds 3]

For a representative shape of each op (activations of a small LLM: [512, 1536] rows,
[12, 128, 128] attention scores, a 49152-entry vocabulary, the matmul shapes of
attention and of a projection), the op alone is a group, as partition makes it; its
kernel is built with `emit` of the target and timed through `Kernel.run` (argument
checks, output allocation and the call included) beside the op's torch reference (what
`ir.interpret` runs, i.e. torch eager) in the same process, both with the same threads
(every core unless `--threads`: torch.set_num_threads, TVM's pool as large), torch first
(see `run`).
Each figure is the fastest of many calls (rounds of `--min-time` seconds each): on a
shared machine a parallel call stalls whenever another process holds one of the cores
(a whole scheduler slice, ~8 ms on 2 cores; torch's OpenMP team, which sleeps between
regions, far more often than TVM's spinning pool), so only undisturbed calls compare.
Compare ratios, not absolutes. The ratio is torch time / fuselm time (above 1: fuselm
faster).

Targets are rows of TARGETS: a builder of a group's kernel and the torch device.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("KMP_BLOCKTIME", "0")  # torch's OpenMP workers: sleep right after a region

ROWS = (512, 1536)  # [tokens, hidden] of a small LLM's MLP activations
SCORES = (12, 128, 128)  # [heads, queries, keys]
F, I, L, B = "f32", "i32", "i64", "bool"


def unary(dtype=F, domain="any"):
    return ([(ROWS, dtype)], {}, domain)


def binary(**attrs):
    return ([(ROWS, F), ((ROWS[-1],), F)], attrs, "nonzero")


# op -> (inputs [(shape, dtype)], attrs, domain of the inputs)
SHAPES = {
    **{op: binary() for op in ("add", "sub", "mul", "div", "maximum", "minimum", "pow", "remainder", "floor_divide")},
    **{op: binary() for op in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{op: ([(ROWS, B), (ROWS, B)], {}, "any") for op in ("logical_and", "logical_or", "logical_xor")},
    **{op: unary() for op in ("neg", "abs", "relu", "sign", "floor", "ceil", "round", "trunc", "copy", "exp", "sin",
                             "cos", "tanh", "erf", "sigmoid", "silu", "gelu", "expm1", "tan", "atan", "isnan",
                             "isinf")},
    **{op: unary(domain="positive") for op in ("log", "sqrt", "rsqrt", "reciprocal", "log1p")},
    "logical_not": unary(B),
    "cast": ([(ROWS, F)], {"dtype": "f16"}, "any"),
    "where": ([(ROWS, B), (ROWS, F), ((1,), F)], {}, "any"),
    "masked_fill": ([(SCORES, F), (SCORES[1:], B)], {"value": -math.inf}, "any"),
    "sum": ([(ROWS, F)], {"dims": (-1,)}, "any"),
    "mean": ([(ROWS, F)], {"dims": (-1,), "keepdim": True}, "any"),
    "amax": ([(ROWS, F)], {"dims": (0,)}, "any"),
    "amin": ([(ROWS, F)], {"dims": ()}, "any"),
    "var": ([(ROWS, F)], {"dims": (-1,)}, "any"),
    "argmax": ([((32, 49152), F)], {"dim": -1}, "any"),  # greedy sampling over a vocabulary
    "argmin": ([(ROWS, F)], {"dim": 0}, "any"),
    "softmax": ([(SCORES, F)], {"dim": -1}, "any"),
    "log_softmax": ([((32, 49152), F)], {"dim": -1}, "any"),
    "cumsum": ([((32, 49152), F)], {"dim": -1}, "any"),  # top-p over a sorted vocabulary
    "tril": ([(SCORES, F)], {"diagonal": 0}, "any"),
    "triu": ([(SCORES, F)], {"diagonal": 1}, "any"),
    "gather": ([((32, 49152), F), ((32, 64), L)], {"dim": 1}, "index"),
    "index_select": ([(ROWS, F), ((256,), L)], {"dim": 0}, "index"),
    "concat": ([(ROWS, F), (ROWS, F)], {"dim": -1}, "any"),
    "full": ([], {"shape": ROWS, "value": 0.5, "dtype": F}, "any"),
    "arange": ([], {"end": 4096, "dtype": L}, "any"),
}
MATMULS = [  # (a, b): attention scores and values, a projection, a batched square product
    ((2, 4, 64, 64), (2, 4, 64, 64)),
    ((1, 12, 128, 64), (1, 12, 64, 128)),
    ((128, 576), (576, 576)),
    ((12, 128, 128), (12, 128, 64)),
]


@dataclass(frozen=True)
class Target:
    build: Callable  # group -> Kernel (with .run)
    device: str  # where the tensors live
    sync: Callable = lambda: None  # waits for the device


def _cpu_build(group):
    from fuselm.codegen import tvm as cpu

    return cpu.emit(group)


TARGETS = {"cpu": Target(_cpu_build, "cpu")}  # cuda: a Triton builder and torch.cuda.synchronize


# ----------------------------------------------------------------------------- timing
def fastest_seconds(fn, sync, min_time: float) -> float:
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < 10 or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def best_seconds(fn, sync, rounds: int, min_time: float) -> float:
    return min(fastest_seconds(fn, sync, min_time) for _ in range(rounds))


# ----------------------------------------------------------------------------- cases
def random_input(shape, dtype: str, domain: str, device: str, high: int = 0):
    import torch

    from fuselm.ir import TensorType

    torch_dtype = TensorType((), dtype).torch_dtype
    if dtype == "bool":
        return torch.rand(shape, device=device) > 0.5
    if domain == "index":
        return torch.randint(0, high, shape, device=device).to(torch_dtype)
    values = torch.randn(shape, device=device) * 3
    if domain == "positive":
        values = values.abs() + 0.1
    elif domain == "nonzero":
        values = torch.where(values.abs() < 0.1, 1.5, values)
    return values.to(torch_dtype)


def cases(ops: list):
    """(op, label, group, inputs) per benchmarked op."""
    from fuselm.ir import GraphBuilder, TensorType

    for op in ops:
        specs = [([(a, F), (b, F)], {}, "any") for a, b in MATMULS] if op == "matmul" else [SHAPES[op]]
        for inputs, attrs, domain in specs:
            b = GraphBuilder()
            values = [b.input(f"x{i}", TensorType(tuple(shape), dtype)) for i, (shape, dtype) in enumerate(inputs)]
            group = b.build([b.op(op, *values, **attrs)])
            label = " x ".join("x".join(map(str, shape)) for shape, _ in inputs) or "x".join(
                map(str, group.outputs[0].type.shape))
            yield op, label, group, inputs, domain


def run(target_name: str, ops: list, rounds: int, min_time: float) -> list:
    """Time torch on every case, then build, check and time every kernel.

    Torch goes first, before anything is built: TVM's thread pool (building starts it)
    keeps its workers spinning between calls, and they steal the cores from torch's
    OpenMP team, whose parallel regions then stall a scheduler slice each."""
    import torch

    from fuselm import ir
    from fuselm.ir.registry import get_op

    target = TARGETS[target_name]
    prepared = []
    for op, label, group, inputs, domain in cases(ops):
        high = inputs[0][0][0] if op == "index_select" else 49152
        args = [random_input(shape, dtype, domain if i == len(inputs) - 1 or domain != "index" else "any",
                             target.device, high) for i, (shape, dtype) in enumerate(inputs)]
        eager = get_op(op).reference
        prepared.append((op, label, group, args, lambda r=eager, a=args, k=group.nodes[0].attrs: r(*a, **k)))
    theirs = [best_seconds(eager, target.sync, rounds, min_time) for *_, eager in prepared]
    print(f"## generic kernels, target {target_name}, {torch.get_num_threads()} threads\n")
    print("| op | shape | fuselm ms | torch ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    results = []
    for (op, label, group, args, _), eager_time in zip(prepared, theirs):
        kernel = target.build(group)
        torch.testing.assert_close(kernel.run(*args), ir.interpret(group, *args), rtol=1e-3, atol=1e-3, equal_nan=True)
        ours = best_seconds(lambda: kernel.run(*args), target.sync, rounds, min_time)
        results.append((op, eager_time / ours))
        print(f"| {op} | {label} | {ours * 1e3:.4f} | {eager_time * 1e3:.4f} | {eager_time / ours:.2f}x |", flush=True)
    return results


def summary(results: list) -> str:
    ratios = [r for _, r in results]
    slow = [f"{op} {r:.2f}x" for op, r in results if r < 0.5]
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return (f"\n{len(results)} kernels: geometric mean ratio {geomean:.2f}x (torch / fuselm); "
            f"{len(slow)} below 0.5x{': ' + ', '.join(slow) if slow else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cpu", choices=sorted(TARGETS))
    parser.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds of calls per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for torch and TVM's pool")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    import torch

    torch.set_num_threads(args.threads)
    ops = args.ops.split(",") if args.ops else [*SHAPES, "matmul"]
    print(summary(run(args.target, ops, args.rounds, args.min_time)))


if __name__ == "__main__":
    main()
