"""fuselm's Triton kernels against torch at SmolLM2-135M and TinyLlama-1.1B shapes, bf16.

    PYTHONPATH=. python benchmarks/gpu_kernels.py [--models smollm2,tinyllama] [--tokens 1,32,2048]

On a CUDA machine (torch 2.11, triton 3.6) it first compiles and checks every kernel
once on small inputs (the GPU compiler rejects some code Triton's interpreter accepts,
so this is the first thing to read), then times each kernel against the torch ops it
replaces (cuBLAS linear + eager epilogue, F.rms_norm, SDPA) and prints a table.
Times are device times from CUDA-graph replay, so Python launch overhead is left out
for both sides; weights are random. Without CUDA it runs the same steps in Triton's
interpreter on tiny shapes (`--smoke` is implied), to check the script itself.

A decode table compares, for one decode step of paged attention (batch 1 and 32,
context 4096, bf16, TinyLlama's 32/4 heads of 64): the split-KV kernels, the same
kernel with one partition (one program per sequence and kv head), the prefill kernel
(what decode used before), and SDPA on the same keys/values gathered into a dense cache.

    python benchmarks/gpu_kernels.py --sm90

needs no GPU: it records every kernel launch of the same cases (no kernel runs) and
compiles each for sm_90 (GPUTarget("cuda", 90, 32)) with the ptxas bundled in the
triton wheel, to catch what the GPU compiler rejects before a GPU session.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SM90 = "--sm90" in sys.argv[1:]  # compile for a GPU without one: the real compiler, not the interpreter
if not torch.cuda.is_available() and not SM90:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

from fuselm import ir  # noqa: E402
from fuselm.codegen.triton import emit  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int


MODELS = {
    "smollm2": Shape("SmolLM2-135M", 576, 9, 3, 64, 1536, 49152),
    "tinyllama": Shape("TinyLlama-1.1B", 2048, 32, 4, 64, 5632, 32000),
}
TINY = Shape("tiny", 48, 3, 1, 16, 40, 96)


@dataclass
class Case:
    """One kernel: its group, inputs, and the torch code it replaces."""

    label: str
    group: ir.Graph
    inputs: list
    baseline: Callable
    tolerance: float = 3e-2


# ----------------------------------------------------------------------------- groups
def gemm_case(label, tokens, n, k, steps, dtype="bf16"):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", k), dtype))
    w = b.input("w", TensorType((n, k), dtype))
    extras, width = [], n
    for step in steps:
        if step == "gated_silu":
            width //= 2
        elif step in ("bias", "residual"):
            extras.append(b.input(step, TensorType(("T", width) if step == "residual" else (width,), dtype)))
    group = b.build([b.op("gemm", x, w, *extras, epilogue=tuple(steps))])
    inputs = random_inputs(group, {"T": tokens}, scale={"w": k ** -0.5})

    def baseline(x, w, *extras):
        return ir.get_op("gemm").reference(x, w, *extras, epilogue=tuple(steps))  # F.linear + eager epilogue

    return Case(f"{label} gemm {'+'.join(steps) or 'plain'}", group, inputs, baseline)


def rms_norm_case(tokens, hidden, dtype="bf16"):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", hidden), dtype))
    w = b.input("w", TensorType((hidden,), dtype))
    r = b.input("residual", TensorType(("T", hidden), dtype))
    group = b.build([b.op("rms_norm", x, w, r, eps=1e-5, residual=True)])

    def baseline(x, w, r):
        total = x + r
        return F.rms_norm(total, (hidden,), w, 1e-5), total

    return Case("rms_norm + residual", group, random_inputs(group, {"T": tokens}), baseline)


def attention_case(shape: Shape, batch, seq, dtype="bf16"):
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", shape.heads, "S", shape.head_dim), dtype))
    k = b.input("k", TensorType(("B", shape.kv_heads, "S", shape.head_dim), dtype))
    v = b.input("v", TensorType(("B", shape.kv_heads, "S", shape.head_dim), dtype))
    group = b.build([b.op("attention", q, k, v, causal=True, scale=shape.head_dim ** -0.5, gqa=True)])

    def baseline(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return Case(f"attention causal B={batch} S={seq}", group, random_inputs(group, {"B": batch, "S": seq}), baseline)


def paged_cases(shape: Shape, q_lens, context_lens, block_size=16, dtype="bf16"):
    """kv_cache_write then paged_attention for one layer, and SDPA on the same data."""
    layers, d = 2, shape.head_dim
    num_blocks = sum(-(-c // block_size) for c in context_lens) + 4
    cache = torch.randn(layers, 2, num_blocks, block_size, shape.kv_heads, d, device=DEVICE).to(ir.DTYPES[dtype])
    tables, lens, cu, slots = paged_layout(q_lens, context_lens, block_size, num_blocks)
    tokens = sum(q_lens)
    query = torch.randn(tokens, shape.heads, d, device=DEVICE).to(cache.dtype)
    key, value = (torch.randn(tokens, shape.kv_heads, d, device=DEVICE).to(cache.dtype) for _ in range(2))

    b = GraphBuilder()
    c = b.input("kv_cache", TensorType((layers, 2, "NB", block_size, shape.kv_heads, d), dtype))
    kk = b.input("key", TensorType(("T", shape.kv_heads, d), dtype))
    vv = b.input("value", TensorType(("T", shape.kv_heads, d), dtype))
    sm = b.input("slot_mapping", TensorType(("T",), "i64"))
    write = b.build([b.op("kv_cache_write", c, kk, vv, sm, layer=1)])
    attend = paged_attention_group(shape, layers, block_size, dtype)

    def write_baseline(cache, key, value, slots):
        cache[1, 0].view(-1, shape.kv_heads, d)[slots] = key
        cache[1, 1].view(-1, shape.kv_heads, d)[slots] = value
        return cache

    # SDPA's view of the same work: contiguous keys/values per sequence (equal lengths only)
    n, q_len, ctx = len(q_lens), q_lens[0], context_lens[0]
    sdpa_q = torch.randn(n, shape.heads, q_len, d, device=DEVICE).to(cache.dtype)
    sdpa_kv = [torch.randn(n, shape.kv_heads, ctx, d, device=DEVICE).to(cache.dtype) for _ in range(2)]

    def attend_baseline(*_):
        causal = q_len == ctx  # decode (q_len 1) sees the whole context
        return F.scaled_dot_product_attention(sdpa_q, *sdpa_kv, is_causal=causal and q_len > 1, enable_gqa=True)

    label = f"N={n} q_len={q_len} ctx={ctx} BS={block_size}"
    return [
        Case(f"kv_cache_write {label}", write, [cache.clone(), key, value, slots], write_baseline, 1e-2),
        Case(f"paged_attention {label}", attend, [query, cache, tables, lens, cu], attend_baseline),
    ]


def paged_attention_group(shape: Shape, layers, block_size, dtype):
    b = GraphBuilder()
    qq = b.input("query", TensorType(("T", shape.heads, shape.head_dim), dtype))
    c = b.input("kv_cache", TensorType((layers, 2, "NB", block_size, shape.kv_heads, shape.head_dim), dtype))
    bt = b.input("block_tables", TensorType(("N", "MB"), "i32"))
    cl = b.input("context_lens", TensorType(("N",), "i32"))
    cq = b.input("cu_seqlens_q", TensorType(("N+1",), "i32"))
    return b.build([b.op("paged_attention", qq, c, bt, cl, cq, layer=1, scale=shape.head_dim ** -0.5)])


# ----------------------------------------------------------------------------- decode: split-KV or not
# Knobs of the generated paged_attention module, per way of computing a decode batch.
DECODE_VARIANTS = {
    "split-KV": {},
    "one partition": {"PARTITION_SIZE": 1 << 30},  # the split kernel with a single partition
    "prefill kernel": {"SPLIT_KV_DECODE": False},
}
SMOKE_DECODE_KNOBS = {"PARTITION_SIZE": 32}  # the interpreter has no SMs to fill: force several partitions


@dataclass
class DecodeCase:
    """One decode step: paged inputs, and the same query, keys and values as dense tensors for SDPA."""

    label: str
    group: ir.Graph
    inputs: list
    dense: tuple  # q [N, H, 1, D], k and v [N, Hkv, context, D]
    scale: float


def decode_case(shape: Shape, batch, context, block_size=16, dtype="bf16") -> DecodeCase:
    layers, d = 2, shape.head_dim
    num_blocks = batch * -(-context // block_size) + 4
    cache = torch.randn(layers, 2, num_blocks, block_size, shape.kv_heads, d, device=DEVICE).to(ir.DTYPES[dtype])
    tables, lens, cu, _ = paged_layout([1] * batch, [context] * batch, block_size, num_blocks)
    query = torch.randn(batch, shape.heads, d, device=DEVICE).to(cache.dtype)
    gathered = cache[1, :, tables.long()].flatten(2, 3)[:, :, :context]  # [2, N, context, Hkv, D]
    keys, values = (gathered[i].transpose(1, 2).contiguous() for i in range(2))
    group = paged_attention_group(shape, layers, block_size, dtype)
    label = f"decode N={batch} ctx={context} BS={block_size}"
    return DecodeCase(label, group, [query, cache, tables, lens, cu], (query[:, :, None], keys, values), d ** -0.5)


def sdpa_decode(case: DecodeCase):
    q, k, v = case.dense
    return F.scaled_dot_product_attention(q, k, v, scale=case.scale, enable_gqa=True)


def with_knobs(kernel, knobs: dict, fn):
    """fn() with the generated module's constants set to `knobs` (restored after)."""
    module = kernel.run.__globals__
    saved = {name: module[name] for name in knobs}
    module.update(knobs)
    try:
        return fn()
    finally:
        module.update(saved)


def decode_table(shape: Shape, smoke: bool, kernel_dir, device_name) -> int:
    """Checks every variant against SDPA first, then times them; returns the failures."""
    batches, context = ((1, 3), 150) if smoke else ((1, 32), 4096)
    variants = dict(DECODE_VARIANTS, **({"split-KV": SMOKE_DECODE_KNOBS} if smoke else {}))
    names = list(variants) + ["SDPA dense"]
    print(f"\n== paged attention decode, {shape.name} ({shape.heads}/{shape.kv_heads} heads of {shape.head_dim}), "
          f"bf16, {device_name}\n{'case':<34}" + "".join(f"{n + ' ms':>18}" for n in names) + f"{'SDPA/split-KV':>15}")
    failures = 0
    for batch in batches:
        case = decode_case(shape, batch, context)
        times = {}
        try:
            kernel = emit(case.group, kernel_dir)
            expected = sdpa_decode(case)[:, :, 0]
            for name, knobs in variants.items():
                got = with_knobs(kernel, knobs, lambda: kernel.run(*case.inputs))
                error = relative_error(got, expected)
                if error > 3e-2:
                    raise AssertionError(f"{name}: relative error {error:.1e} against SDPA")
            for name, knobs in variants.items():
                times[name] = with_knobs(kernel, knobs, lambda: device_ms(lambda: kernel.run(*case.inputs)))
            times["SDPA dense"] = device_ms(lambda: sdpa_decode(case))
        except Exception as exc:
            print(f"FAIL  {case.label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            failures += 1
            continue
        row = "".join(f"{times[n]:>18.4f}" for n in names)
        print(f"{case.label:<34}{row}{times['SDPA dense'] / times['split-KV']:>14.2f}x")
    return failures


# ----------------------------------------------------------------------------- inputs
def random_inputs(group, sizes, scale=None):
    bindings = {ir.symbol(k): v for k, v in sizes.items()}
    out = []
    for value in group.inputs:
        shape = [ir.types.evaluate_dim(d, bindings) for d in value.type.shape]
        t = torch.randn(shape, device=DEVICE) * (scale or {}).get(value.name, 1.0)
        out.append(t.to(value.type.torch_dtype))
    return out


def paged_layout(q_lens, context_lens, block_size, num_blocks):
    order = torch.randperm(num_blocks)
    max_blocks = max(-(-c // block_size) for c in context_lens)
    tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)
    slots, used = [], 0
    for n, (q_len, ctx) in enumerate(zip(q_lens, context_lens)):
        count = -(-ctx // block_size)
        tables[n, :count] = order[used : used + count].to(torch.int32)
        used += count
        slots += [int(tables[n, p // block_size]) * block_size + p % block_size for p in range(ctx - q_len, ctx)]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (tables, lens, cu, torch.tensor(slots, dtype=torch.int64))]


# ----------------------------------------------------------------------------- cases
def model_cases(shape: Shape, tokens_list, smoke: bool) -> list:
    h, q, kv, f = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.ffn
    cases = []
    for tokens in tokens_list:
        t = f"T={tokens}"
        cases += [
            gemm_case(f"{t} qkv", tokens, q + 2 * kv, h, ()),
            gemm_case(f"{t} o_proj", tokens, h, q, ("residual",)),
            gemm_case(f"{t} gate_up", tokens, 2 * f, h, ("gated_silu",)),
            gemm_case(f"{t} down", tokens, h, f, ("residual",)),
            gemm_case(f"{t} mlp (bert-style)", tokens, f, h, ("bias", "gelu")),
            rms_norm_case(tokens, h),
        ]
        cases[-1].label = f"{t} {cases[-1].label}"
    n = 2 if smoke else 32
    cases.append(gemm_case(f"N={n} lm_head", n, shape.vocab, h, ()))
    seq, batch = (20, 2) if smoke else (1024, 4)
    cases.append(attention_case(shape, batch, seq))
    cases += paged_cases(shape, [seq] * batch, [seq] * batch)  # prefill, fresh cache
    cases += paged_cases(shape, [1] * n, [seq] * n)  # decode
    return cases


def dtype_cases() -> list:
    """Small fp32 and fp16 kernels: they compile other code paths (IEEE fp32 dots)."""
    out = []
    for dtype in ("f32", "f16"):
        out.append(gemm_case(f"{dtype} T=37", 37, 96, 80, ("bias", "gated_silu", "residual"), dtype))
        out.append(gemm_case(f"{dtype} T=5", 5, 96, 80, ("gelu_tanh",), dtype))
        case = attention_case(TINY, 2, 33, dtype)
        case.label = f"{dtype} {case.label}"
        out.append(case)
    return out


# ----------------------------------------------------------------------------- running
def compile_and_check(cases, kernel_dir) -> list:
    """Emit every kernel and run it once against the IR reference; returns what works."""
    ok = []
    for case in cases:
        try:
            kernel = emit(case.group, kernel_dir)
            started = time.perf_counter()
            got = kernel.run(*clone(case.inputs))
            sync()
            compile_s = time.perf_counter() - started
            expected = ir.interpret(case.group, *clone(case.inputs))
            error = relative_error(got, expected)
        except Exception as exc:  # report every failure, keep going
            print(f"FAIL  {case.label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        status = "ok  " if error <= case.tolerance else "BAD "
        print(f"{status}  {case.label:<48} {kernel.name:<58} first run {compile_s:6.2f} s  rel. error {error:.1e}")
        if error <= case.tolerance:
            ok.append((case, kernel))
    return ok


def relative_error(got, expected) -> float:
    got, expected = got.float(), expected.float()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def clone(tensors):
    return [t.clone() for t in tensors]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_ms(fn, calls=20, replays=10) -> float:
    """Mean device time of fn() from CUDA-graph replay (wall clock on CPU)."""
    if DEVICE != "cuda":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    sync()
    return start.elapsed_time(end) / (calls * replays)


# ----------------------------------------------------------------------------- sm_90 without a GPU
TRITON_TYPES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
    torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


class LaunchRecorder:
    """Stands in for a @triton.jit kernel in its generated module: records launches, runs nothing."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def recorded_launches(kernel, inputs, knobs=None) -> list:
    """[(jit function, args, kwargs)] of the launches kernel.run(*inputs) makes (host code only)."""
    from triton.runtime.jit import JITFunction

    module = kernel.run.__globals__
    recorders = {name: LaunchRecorder(fn) for name, fn in module.items()
                 if name.endswith("_kernel") and isinstance(fn, JITFunction)}
    with_knobs(kernel, dict(recorders, **(knobs or {})), lambda: kernel.run(*inputs))
    return [(r.fn, args, kwargs) for r in recorders.values() for args, kwargs in r.launches]


def compile_launch(fn, args, kwargs, target):
    """triton.compile of one launch, specialized as the JIT would (ints == 1, 16-byte alignment)."""
    import triton

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs[param.name]
        aligned = [["tt.divisibility", 16]]
        if param.is_constexpr or value is None or (type(value) is int and value == 1 and not param.do_not_specialize):
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = aligned
        else:
            signature[param.name] = "fp32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target, options=options)


def compile_for_sm90(labelled) -> int:
    """Compiles every launch of [(label, group, inputs, knobs)] for sm_90; returns the failures."""
    from triton.backends.compiler import GPUTarget

    target, failures, kernel_dir = GPUTarget("cuda", 90, 32), 0, tempfile.mkdtemp(prefix="fuselm_kernels_")
    print(f"== compile for sm_90 with the bundled ptxas, no kernel runs (kernel sources in {kernel_dir})")
    for label, group, inputs, knobs in labelled:
        try:
            launches = recorded_launches(emit(group, kernel_dir), inputs, knobs)
        except Exception as exc:
            print(f"FAIL  {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            failures += 1
            continue
        for fn, args, kwargs in launches:
            started = time.perf_counter()
            try:
                compiled = compile_launch(fn, args, kwargs, target)
            except Exception as exc:
                print(f"FAIL  {label:<48} {fn.__name__}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
                failures += 1
                continue
            kind = fn.__name__.removesuffix("_kernel").rsplit("_", 1)[-1]
            kind = kind if kind in ("split", "merge") else "main"  # a module's kernels: main, or decode's two
            print(f"ok    {label:<48} {kind:<8} {time.perf_counter() - started:5.1f} s  "
                  f"{len(compiled.asm['cubin']):>7} B cubin  {compiled.metadata.shared:>6} B shared")
    return failures


def sm90_cases(suites, smoke: bool) -> list:
    """(label, group, inputs, knobs) for every kernel variant the GPU run would launch."""
    cases = dtype_cases() + [c for shape, tokens in suites for c in model_cases(shape, tokens, smoke)]
    labelled = [(c.label, c.group, c.inputs, None) for c in cases]
    batches, context = ((1, 3), 150) if smoke else ((1, 32), 4096)
    for shape, _ in suites:
        for batch in batches:
            case = decode_case(shape, batch, context)
            labelled += [(f"{shape.name} {case.label} {name}", case.group, case.inputs, knobs) for name, knobs in DECODE_VARIANTS.items()]
    return labelled


def timing_table(title, working) -> None:
    print(f"\n{title}\n{'case':<52} {'fuselm ms':>10} {'torch ms':>10} {'torch/fuselm':>13}")
    for case, kernel in working:
        try:
            ours = device_ms(lambda: kernel.run(*case.inputs))
            theirs = device_ms(lambda: case.baseline(*case.inputs))
        except Exception as exc:
            print(f"{case.label:<52} timing failed: {type(exc).__name__}: {exc}")
            continue
        print(f"{case.label:<52} {ours:>10.4f} {theirs:>10.4f} {theirs / ours:>12.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--tokens", default="1,32,2048", help="token counts (rows) of the gemm and norm cases")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (implied without CUDA)")
    parser.add_argument("--sm90", action="store_true", help="only compile every kernel for sm_90 (no GPU needed)")
    args = parser.parse_args(argv)
    smoke = args.smoke or DEVICE != "cuda"
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, Triton interpreter"
    print(f"{device_name}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    kernel_dir = tempfile.mkdtemp(prefix="fuselm_kernels_")
    suites = [(MODELS[m], [int(t) for t in args.tokens.split(",")]) for m in args.models.split(",")]
    if args.sm90:
        failures = compile_for_sm90(sm90_cases(suites if not args.smoke else [(TINY, [3, 40])], args.smoke))
        print(f"\n{failures} kernel launch(es) failed to compile for sm_90")
        return 1 if failures else 0
    if smoke:
        suites = [(TINY, [3, 40])]
    failures = 0
    print("\n== compile and check (kernel sources in %s)" % kernel_dir)
    dtype_ok = compile_and_check(dtype_cases(), kernel_dir)
    failures += len(dtype_cases()) - len(dtype_ok)
    for shape, tokens in suites:
        cases = model_cases(shape, tokens, smoke)
        working = compile_and_check(cases, kernel_dir)
        failures += len(cases) - len(working)
        timing_table(f"== {shape.name} (d={shape.hidden}, {shape.heads}/{shape.kv_heads} heads, ffn {shape.ffn}), bf16, {device_name}", working)
    failures += decode_table(TINY if smoke else MODELS["tinyllama"], smoke, kernel_dir, device_name)
    print(f"\n{failures} kernel(s) failed to compile or to match the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
