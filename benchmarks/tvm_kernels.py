"""fuselm's cpu (TVM) kernels against torch at SmolLM2-135M shapes. Not a test.

    python benchmarks/tvm_kernels.py [--threads 2] [--rows 1,16,128,512] [--quick] [--hot]
                                     [--sections gemm,norm,qgemv] [--lm-head]

Each gemm group (fused epilogue) is built twice, for the weight as the IR captures it
([N, K]) and prepacked in k16 panels (what the `layout` pass gives cpu kernels), and
timed at every row count M through `Kernel.run` (wrapper, allocation and the call
included), beside torch's `F.linear` followed by the same epilogue in torch, in the same
process. Decode rows (M <= 16) read their weights cold, as a real decode step does (30
layers of weights pass through the caches between two uses of one): each call takes the
next of several copies of the weights, more than the L3 cache holds (`--hot` reuses one
copy). Decode rows are shown as weight bandwidth (GB/s), prefill rows as GFLOP/s. The
norm kernels are timed against torch's rms_norm / layer_norm.

The qgemv section times decode (M = 1) with quantized weights: the qgemm GEMV kernel
(codegen/tvm/qgemm.py) for int8 (one f32 scale per channel), int4 with groups of 32 (f16
scale and offset), nf4 with groups of 64 (f16 scale), as the quantization passes store
them, and W8A8 (int8 activations), beside the fp32 gemv1 of k16 panels, cold as above
(`--lm-head` adds the 49152-row tied head). Each is shown as bytes of weight (codes,
scales and offsets) streamed per second, and as a fraction of the fp32 form's rate.

Both runtimes use `--threads` threads (TVM_NUM_THREADS is set before TVM loads).
Torch's OpenMP threads spin after each parallel region and then fight TVM's pool for the
cores, so each side is timed in its own block, after a short sleep. The machine is
shared: each figure is the best, over several rounds, of the median of repeated calls,
and the rounds interleave the three sides, so a burst of load elsewhere hits them alike.
Compare ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMMS = [  # (K, N, epilogue): SmolLM2-135M's projections, as fused by fuse_epilogue
    (576, 960, ()),  # q|k|v projection (fused siblings: 576 + 2 * 192)
    (576, 576, ("residual",)),  # o projection + residual
    (576, 3072, ("gated_silu",)),  # gate|up -> silu(gate) * up, N -> 1536
    (1536, 576, ("residual",)),  # down projection + residual
    (576, 49152, ()),  # lm head (tied to the embedding in SmolLM2, so `layout` leaves it [N, K])
]


COLD_BYTES = 96 << 20  # weight copies cycled through by decode rows: 3x the L3 cache
ROUNDS = 5


def median_seconds(fn, min_time: float = 0.1, min_calls: int = 5) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_seconds(fns: list, rounds: int = ROUNDS) -> list:
    """Per function, the best over interleaved rounds of its median time."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            time.sleep(0.02)  # let the other runtime's spinning workers sleep
            best[i] = min(best[i], median_seconds(fn))
    return best


def cycling(copies: list):
    """A function returning the next of `copies` at each call."""
    state = [0]

    def next_copy():
        state[0] = (state[0] + 1) % len(copies)
        return copies[state[0]]

    return next_copy


def gemm_group(K: int, N: int, steps: tuple, packed: bool):
    """The group partition gives a gemm: weight [N, K], or k16 panels as `layout` packs it."""
    from fuselm.ir import GraphBuilder, TensorType
    from fuselm.ir.core_ops import packed_weight_shape, weight_halves

    b = GraphBuilder()
    x = b.input("x", TensorType(("T", K), "f32"))
    w = b.input("w", TensorType(packed_weight_shape(N, K, weight_halves(steps)) if packed else (N, K), "f32"))
    extras = [b.input("residual", TensorType(("T", N // weight_halves(steps)), "f32"))
              for step in steps if step == "residual"]
    layout = {"weight_layout": "k16", "n": N} if packed else {}
    return b.build([b.op("gemm", x, w, *extras, epilogue=steps, **layout)])


def torch_gemm(x, w, extras, steps):
    import torch.nn.functional as F

    y = F.linear(x, w)
    for step in steps:
        if step == "gated_silu":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        elif step == "residual":
            y = y + extras[0]
    return y


def bench_gemms(rows: list, hot: bool) -> None:
    import torch

    from fuselm.codegen import tvm as tvm_codegen
    from fuselm.ir.core_ops import pack_weight, weight_halves

    print(f"\n## gemm (fp32), {torch.get_num_threads()} threads, decode weights {'hot' if hot else 'cold'}\n")
    print("| K | N | epilogue | M | [N,K] ms | k16 ms | torch ms | [N,K] | k16 | torch | k16 vs [N,K] | k16 vs torch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for K, N, steps in GEMMS:
        plain, packed = (tvm_codegen.emit(gemm_group(K, N, steps, p)) for p in (False, True))
        copies = 1 if hot else max(1, min(64, COLD_BYTES // (N * K * 4)))
        weights = [torch.randn(N, K) / K**0.5 for _ in range(copies)]
        panels = [pack_weight(w, weight_halves(steps)) for w in weights]
        n_out = N // weight_halves(steps)
        for M in rows:
            x = torch.randn(M, K)
            extras = [torch.randn(M, n_out) for s in steps if s == "residual"]
            expected = torch_gemm(x, weights[0], extras, steps)
            for kernel, w in ((plain, weights[0]), (packed, panels[0])):
                torch.testing.assert_close(kernel.run(x, w, *extras), expected, rtol=1e-3, atol=1e-3)
            cold = M <= 16 and copies > 1
            w_of, p_of = (cycling(weights), cycling(panels)) if cold else (lambda: weights[0], lambda: panels[0])
            t_plain, t_packed, t_torch = best_seconds([
                lambda: plain.run(x, w_of(), *extras),
                lambda: packed.run(x, p_of(), *extras),
                lambda: torch_gemm(x, w_of(), extras, steps),
            ])
            rate = (lambda s: f"{N * K * 4 / s / 1e9:.1f} GB/s") if M <= 16 else (lambda s: f"{2 * M * N * K / s / 1e9:.1f} GF/s")
            print(f"| {K} | {N} | {'+'.join(steps) or '-'} | {M} | {t_plain * 1e3:.3f} | {t_packed * 1e3:.3f} | "
                  f"{t_torch * 1e3:.3f} | {rate(t_plain)} | {rate(t_packed)} | {rate(t_torch)} | "
                  f"{t_plain / t_packed:.2f}x | {t_torch / t_packed:.2f}x |", flush=True)


def bench_norms(rows: list) -> None:
    import torch
    import torch.nn.functional as F

    from fuselm.codegen import tvm as tvm_codegen
    from fuselm.ir import GraphBuilder, TensorType

    print("\n## norms (fp32, D=576, residual form: x + r, then the norm; outputs both)\n")
    print("| norm | M | fuselm ms | torch ms | fuselm GB/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    D = 576
    for op in ("rms_norm", "layer_norm"):
        b = GraphBuilder()
        x, r = b.input("x", TensorType(("T", D), "f32")), b.input("r", TensorType(("T", D), "f32"))
        params = [b.input("w", TensorType((D,), "f32"))] + ([b.input("b", TensorType((D,), "f32"))] if op == "layer_norm" else [])
        kernel = tvm_codegen.emit(b.build([b.op(op, x, *params, r, eps=1e-5, residual=True)]))
        weights = [torch.randn(D) for _ in params]
        for M in rows:
            xs, rs = torch.randn(M, D), torch.randn(M, D)

            def reference():
                total = xs + rs
                if op == "rms_norm":
                    return F.rms_norm(total, (D,), weights[0], 1e-5), total
                return F.layer_norm(total, (D,), *weights, 1e-5), total

            ours, theirs = best_seconds([lambda: kernel.run(xs, rs, *weights), reference])
            print(f"| {op}+residual | {M} | {ours * 1e3:.4f} | {theirs * 1e3:.4f} | "
                  f"{4 * M * D * 4 / ours / 1e9:.1f} | {theirs / ours:.2f}x |", flush=True)


QGEMV_SHAPES = [(576, 1536), (1536, 576)]  # SmolLM2-135M: up|gate half, down projection
QGEMV_FORMATS = [  # (label, format, group size (None: one per channel), activations)
    ("int8", "int8", None, "float"),
    ("int4-g32", "int4", 32, "float"),
    ("nf4-g64", "nf4", 64, "float"),
    ("w8a8", "int8", None, "int8"),
]


def qgemm_group(K: int, N: int, parts: dict, fmt: str, group_size: int, activations: str):
    """One qgemm of x [T, K] with the quantized weight's parts as inputs."""
    from fuselm.ir import GraphBuilder, TensorType

    b = GraphBuilder()
    x = b.input("x", TensorType(("T", K), "f32"))
    inputs = [b.input(name, TensorType.of(t)) for name, t in parts.items()]
    return b.build([b.op("qgemm", x, *inputs, format=fmt, group_size=group_size, n=N, k=K, parts=tuple(parts),
                         activations=activations)])


def weight_sets(tensors: tuple, hot: bool) -> list:
    """`tensors` and copies of them, COLD_BYTES in all (capped at 256 sets; one if hot)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copies = 1 if hot else max(1, min(256, COLD_BYTES // nbytes))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]


def bench_qgemv(hot: bool, lm_head: bool) -> None:
    import torch

    from fuselm import ir
    from fuselm.codegen import tvm as tvm_codegen
    from fuselm.ir.core_ops import pack_weight
    from fuselm.quant.weights import quantize_weight

    print(f"\n## qgemm decode (M = 1), {torch.get_num_threads()} threads, weights {'hot' if hot else 'cold'}\n")
    print("| K | N | weight | build s | us | weight MB | GB/s | vs fp32 (bytes/s) | vs fp32 (time) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for K, N in QGEMV_SHAPES + ([(576, 49152)] if lm_head else []):
        w = torch.randn(N, K) / K**0.5
        x = torch.randn(1, K)
        dense = tvm_codegen.emit(gemm_group(K, N, (), True))
        rows = [("fp32 k16", 0.0, dense, weight_sets((pack_weight(w, 1),), hot))]  # (label, build s, kernel, sets)
        for label, fmt, group_size, activations in QGEMV_FORMATS:
            group_size = group_size or K
            parts = quantize_weight(w, fmt, group_size)
            group = qgemm_group(K, N, parts, fmt, group_size, activations)
            start = time.perf_counter()
            kernel = tvm_codegen.emit(group)
            build = time.perf_counter() - start
            weights = tuple(parts.values())
            expected = ir.interpret(group, x, *weights)
            atol = 1e-3 * expected.abs().max().item()
            torch.testing.assert_close(kernel.run(x, *weights), expected, rtol=1e-3, atol=atol)
            rows.append((label, build, kernel, weight_sets(weights, hot)))
        times = best_seconds([lambda kernel=kernel, next_set=cycling(sets): kernel.run(x, *next_set())
                              for _, _, kernel, sets in rows])
        sizes = [sum(t.numel() * t.element_size() for t in sets[0]) for _, _, _, sets in rows]
        base_rate, base_time = sizes[0] / times[0], times[0]
        for (label, build, _, _), nbytes, t in zip(rows, sizes, times):
            print(f"| {K} | {N} | {label} | {build:.1f} | {t * 1e6:.1f} | {nbytes / 1e6:.2f} | "
                  f"{nbytes / t / 1e9:.1f} | {nbytes / t / base_rate:.2f} | {base_time / t:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,16,128,512")
    parser.add_argument("--quick", action="store_true", help="only the first three gemm shapes")
    parser.add_argument("--hot", action="store_true", help="decode rows reuse one weight copy (L3-resident)")
    parser.add_argument("--sections", default="gemm,norm,qgemv", help="which of gemm, norm, qgemv to run")
    parser.add_argument("--lm-head", action="store_true", help="qgemv: also the 49152-row lm head")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        GEMMS[:] = GEMMS[:3]
    rows = [int(r) for r in args.rows.split(",")]
    sections = args.sections.split(",")
    if "gemm" in sections:
        bench_gemms(rows, args.hot)
    if "norm" in sections:
        bench_norms(rows)
    if "qgemv" in sections:
        bench_qgemv(args.hot, args.lm_head)


if __name__ == "__main__":
    main()
