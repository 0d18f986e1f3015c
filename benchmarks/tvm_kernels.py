"""fuselm's cpu (TVM) kernels against torch at SmolLM2-135M shapes. Not a test.

    python benchmarks/tvm_kernels.py [--threads 2] [--rows 1,16,128,512] [--quick]

Each gemm group (fused epilogue) is built once and timed at every row count M through
`Kernel.run` (wrapper, allocation and the call included), beside torch's
`F.linear` followed by the same epilogue in torch, in the same process. Decode rows
(M=1) are also shown as weight bandwidth (GB/s): fp32 weights read once per call.
The norm kernels are timed the same way against torch's rms_norm / layer_norm.

Both runtimes use `--threads` threads (TVM_NUM_THREADS is set before TVM loads).
Torch's OpenMP threads spin for 200 ms after each parallel region (KMP_BLOCKTIME) and
then fight TVM's pool for the cores (torch's linear measured 20x slower after TVM
calls on 2 cores), so KMP_BLOCKTIME=0 unless set; each side is also timed in its own
block. The figure is the median of repeated calls. The machine is shared: compare
ratios, not absolutes.
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
    (576, 576, ()),  # q / o projection
    (576, 192, ()),  # k / v projection
    (576, 3072, ("gated_silu",)),  # gate|up -> silu(gate) * up, N -> 1536
    (1536, 576, ("residual",)),  # down projection + residual
    (576, 49152, ()),  # lm head
]


def median_seconds(fn, min_time: float = 0.25, min_calls: int = 5) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_group(K: int, N: int, steps: tuple):
    from fuselm.ir import GraphBuilder, TensorType

    b = GraphBuilder()
    x = b.input("x", TensorType(("T", K), "f32"))
    w = b.input("w", TensorType((N, K), "f32"))
    extras = [b.input("residual", TensorType(("T", N // (2 if "gated_silu" in steps else 1)), "f32"))
              for step in steps if step == "residual"]
    return b.build([b.op("gemm", x, w, *extras, epilogue=steps)])


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


def bench_gemms(rows: list) -> None:
    import torch

    from fuselm.codegen import tvm as tvm_codegen

    print(f"\n## gemm (fp32), {torch.get_num_threads()} threads\n")
    print("| K | N | epilogue | M | build s | fuselm ms | torch ms | fuselm | torch | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for K, N, steps in GEMMS:
        start = time.perf_counter()
        kernel = tvm_codegen.emit(gemm_group(K, N, steps))
        build_s = time.perf_counter() - start
        w = torch.randn(N, K) / K**0.5
        n_out = N // 2 if "gated_silu" in steps else N
        for M in rows:
            x = torch.randn(M, K)
            extras = [torch.randn(M, n_out) for s in steps if s == "residual"]
            torch.testing.assert_close(kernel.run(x, w, *extras), torch_gemm(x, w, extras, steps), rtol=1e-3, atol=1e-3)
            ours = median_seconds(lambda: kernel.run(x, w, *extras))
            theirs = median_seconds(lambda: torch_gemm(x, w, extras, steps))
            rate = (lambda s: f"{N * K * 4 / s / 1e9:.1f} GB/s") if M == 1 else (lambda s: f"{2 * M * N * K / s / 1e9:.1f} GF/s")
            print(f"| {K} | {N} | {'+'.join(steps) or '-'} | {M} | {build_s:.2f} | {ours * 1e3:.3f} | "
                  f"{theirs * 1e3:.3f} | {rate(ours)} | {rate(theirs)} | {theirs / ours:.2f}x |", flush=True)
            build_s = 0.0


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

            ours = median_seconds(lambda: kernel.run(xs, rs, *weights))
            theirs = median_seconds(reference)
            print(f"| {op}+residual | {M} | {ours * 1e3:.4f} | {theirs * 1e3:.4f} | "
                  f"{4 * M * D * 4 / ours / 1e9:.1f} | {theirs / ours:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,16,128,512")
    parser.add_argument("--quick", action="store_true", help="only the first three gemm shapes")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        GEMMS[:] = GEMMS[:3]
    rows = [int(r) for r in args.rows.split(",")]
    bench_gemms(rows)
    bench_norms(rows)


if __name__ == "__main__":
    main()
