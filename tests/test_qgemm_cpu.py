"""The cpu qgemm kernels (codegen/tvm/qgemm.py) against the reference interpreter.

One kernel per case serves every row count (M is symbolic): it runs at M = 1 (gemv1),
2 (gemv2), 3 and 6 (gemv: a partial and a whole-plus-partial tile of 4 rows), 17 and 130
(the tiled form, with a partial tile of rows), and `build_count`
proves that no new M rebuilt it. K and N are odd: K is not whole vectors, chunks or
groups, N not whole tiles. Weights are random codes with scales (and offsets) around
what quantizing a random weight gives. Float activations must match to 1e-4 of max|ref|;
int8 activations are quantized the way quantize_rows does (same division, round half to
even), so they match as closely, but are held to 1e-3 (one rounding step of x apart
would still pass, a wrong scale would not).
"""
import pytest
import torch

from fuselm import ir
from fuselm.codegen import tvm as cpu
from fuselm.errors import UnsupportedKernelError
from fuselm.ir import GraphBuilder, TensorType, symbol
from fuselm.ir.quant_ops import groups, pack_nibbles, packed_columns

T, B, S = symbol("T"), symbol("B"), symbol("S")
ROWS = (1, 2, 3, 6, 17, 130)


def qgemm_group(fmt, k, n, group_size, steps=(), activations="float", scale_dtype="f32", smooth=False,
                outliers=0, lead=("T",)):
    """A graph of one qgemm(x[*lead, k], *parts, *extras) with the parts as inputs."""
    b = GraphBuilder()
    x = b.input("x", TensorType((*lead, k), "f32"))
    g = groups(k, group_size)
    parts = {}
    if smooth:
        parts["smooth"] = TensorType((k,), "f32")
    parts["q"] = TensorType((n, k), "i8") if fmt == "int8" else TensorType((n, packed_columns(k)), "u8")
    parts["scale"] = TensorType((n, g), scale_dtype)
    if fmt == "int4":
        parts["offset"] = TensorType((n, g), scale_dtype)
    if outliers:
        parts["keep"], parts["w_keep"] = TensorType((outliers,), "i64"), TensorType((n, outliers), "f32")
    inputs = [b.input(name, t) for name, t in parts.items()]
    extras, width = [], n
    for step in steps:
        if step == "gated_silu":
            width //= 2
        elif step == "bias":
            extras.append(b.input(f"bias{len(extras)}", TensorType((width,), "f32")))
        elif step == "residual":
            extras.append(b.input(f"residual{len(extras)}", TensorType((*lead, width), "f32")))
    y = b.op("qgemm", x, *inputs, *extras, format=fmt, group_size=group_size, n=n, k=k, parts=tuple(parts),
             activations=activations, epilogue=tuple(steps))
    return b.build([y])


def make_args(group, bindings, seed=0):
    """Random inputs: x ~ N(0, 1) with a few large features, codes uniform, scales (and
    offsets) of the size quantizing an N(0, 1/k) weight gives."""
    generator = torch.Generator().manual_seed(seed)
    node = group.nodes[0]
    attrs = node.attrs
    fmt, k = attrs["format"], attrs["k"]

    def shape(v):
        return [d if isinstance(d, int) else int(d.subs(bindings)) for d in v.type.shape]

    def randn(*size):
        return torch.randn(*size, generator=generator)

    args = []
    for v in group.inputs:
        size, name = shape(v), v.name
        if name == "x":
            x = randn(*size)
            x[..., ::7] *= 8  # outlier-like features
            args.append(x)
        elif name == "smooth":
            args.append(torch.rand(size, generator=generator) + 0.5)
        elif name == "q":
            if fmt == "int8":
                args.append(torch.randint(-127, 128, size, generator=generator, dtype=torch.int8))
            else:
                args.append(pack_nibbles(torch.randint(0, 16, (attrs["n"], k), generator=generator)))
        elif name in ("scale", "offset"):
            dtype = TensorType((), v.type.dtype).torch_dtype
            levels = 127 if fmt == "int8" else 8
            value = (torch.rand(size, generator=generator) + 0.5) * 2 / (levels * k ** 0.5)
            if name == "offset":
                value = -8 * value * (torch.rand(size, generator=generator) + 0.5)
            args.append(value.to(dtype))
        elif name == "keep":
            args.append(torch.randperm(k, generator=generator)[: size[0]])
        else:  # w_keep and the epilogue's inputs
            args.append(randn(*size))
    return args


def check(group, bindings_of, rtol, rows=ROWS):
    """Build once; compare with the interpreter at every row count."""
    kernel = cpu.emit(group)
    builds = cpu.build_count()
    for m in rows:
        args = make_args(group, bindings_of(m), seed=m)
        expected = ir.interpret(group, *[a.clone() for a in args])
        out = kernel.run(*args)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        error = (out - expected).abs().max().item()
        assert error <= rtol * expected.abs().max().item() + 1e-6, f"M={m}: max error {error}"
    assert cpu.build_count() == builds, "a new row count rebuilt the kernel"
    assert kernel.ops == ("qgemm",) and "T.prim_func" in kernel.source
    return kernel


# (format, k, n, group_size, scale dtype, epilogue)
WEIGHT_ONLY = [
    ("int8", 75, 37, 75, "f32", ("bias", "gelu")),  # one scale per channel
    ("int8", 75, 37, 32, "f16", ("residual",)),  # Q8_0-like groups, a partial last group
    ("int8", 75, 37, 20, "f32", ("relu",)),  # groups that are not whole vectors
    ("int4", 75, 38, 32, "f16", ("bias", "gated_silu", "residual")),  # a partial last chunk
    ("int4", 150, 37, 64, "f32", ("silu",)),  # the last group has fewer chunks than the others
    ("nf4", 96, 37, 64, "f16", ("gelu_tanh",)),
    ("nf4", 75, 21, 96, "f32", ()),  # one group per row
]


@pytest.mark.parametrize("fmt,k,n,group_size,scale_dtype,steps", WEIGHT_ONLY)
def test_weight_only(fmt, k, n, group_size, scale_dtype, steps):
    group = qgemm_group(fmt, k, n, group_size, steps, scale_dtype=scale_dtype)
    kernel = check(group, lambda m: {T: m}, 1e-4)
    assert kernel.name.startswith("qgemm_k")


@pytest.mark.parametrize("fmt,k,n,group_size,scale_dtype,steps", [WEIGHT_ONLY[1], WEIGHT_ONLY[3], WEIGHT_ONLY[5]])
def test_weight_only_in_8_lanes(monkeypatch, fmt, k, n, group_size, scale_dtype, steps):
    """The kernels use 16-lane vectors where the CPU has AVX-512 (this one may); a CPU
    with AVX2 only gets 8 lanes, and nf4 then reads its levels by two permutes and a blend."""
    from fuselm.codegen.tvm import qgemm

    monkeypatch.setattr(qgemm, "lanes", lambda: 8)
    group = qgemm_group(fmt, k, n, group_size, steps, scale_dtype=scale_dtype)
    kernel = check(group, lambda m: {T: m}, 1e-4, rows=(1, 3, 17))
    assert "T.vectorized(8)" in kernel.source


@pytest.mark.parametrize("smooth,outliers,steps", [
    (False, 0, ("bias", "relu")),
    (True, 3, ("gated_silu", "residual")),  # SmoothQuant's factor and LLM.int8's outliers
])
def test_int8_activations(smooth, outliers, steps):
    group = qgemm_group("int8", 77, 38, 77, steps, activations="int8", smooth=smooth, outliers=outliers)
    check(group, lambda m: {T: m}, 1e-3)


def test_int8_activations_catch_a_wrong_row_scale():
    """The tolerance of the W8A8 check is tight enough to see a row scale one step off."""
    group = qgemm_group("int8", 77, 38, 77, activations="int8")
    args = make_args(group, {T: 3})
    expected = ir.interpret(group, *args)
    out = cpu.emit(group).run(*args)
    assert (out - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert (out * (1 + 1 / 127) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_outliers_with_float_activations_and_leading_dims():
    """keep/w_keep replace q's columns; x [B, S, K] is flattened and restored."""
    group = qgemm_group("int4", 96, 37, 32, ("residual",), scale_dtype="f16", outliers=4, lead=("B", "S"))
    check(group, lambda m: {B: 1 if m == 1 else 2, S: m if m == 1 else m // 2 + 1}, 1e-4, rows=(1, 3, 40))


def test_gemv_is_vectorized_and_prefetches():
    kernel = cpu.emit(qgemm_group("int4", 128, 64, 32, scale_dtype="f16"))
    asm = kernel.extra_sources["s"]
    assert "prefetcht0" in asm and "vcvtdq2ps" in asm and "vfmadd" in asm
    assert kernel.source.count("T.parallel") >= 3


def test_int8_activations_need_one_scale_per_channel():
    with pytest.raises(UnsupportedKernelError):
        cpu.emit(qgemm_group("int4", 64, 16, 32, activations="int8"))
    with pytest.raises(UnsupportedKernelError):
        cpu.emit(qgemm_group("int8", 64, 16, 32, activations="int8"))


def test_compiled_model_runs_qgemm_in_the_program(monkeypatch, tmp_path):
    """fuselm.compile(quantize=...) on the cpu, as one TVM program (FUSELM_PROGRAM=1):
    every gemm is a qgemm kernel, and the program computes what the graph means."""
    import fuselm

    monkeypatch.setenv("FUSELM_PROGRAM", "1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40)).eval()
    x = torch.randn(5, 64)
    compiled = fuselm.compile(model, (x,), quantize="int4-g32", cache_dir=str(tmp_path))
    with torch.no_grad():
        out, reference = compiled(x), model(x)
    ops = [node.op for node in compiled.graph.nodes]
    assert "qgemm" in ops and "gemm" not in ops and not compiled.fallbacks
    assert compiled.entries[-1].program is not None
    expected = ir.interpret(compiled.graph, x)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (out - reference).abs().max() <= 0.25 * reference.abs().max()  # 4-bit weights: near the model
