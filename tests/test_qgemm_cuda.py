"""The `cuda` qgemm kernels (codegen/triton/qgemm.py), run in Triton's interpreter on CPU
against `ir.interpret` (quant_ops.qgemm_reference).

One single-node qgemm graph per form, its parts graph inputs holding random tensors of
the format's dtypes; each kernel is emitted once and run at a few token counts (the
GEMV tile for M = 1, the small, medium and large tiles). K is neither a multiple of the
group nor of 32, and N no multiple of the tiles.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from fuselm import ir  # noqa: E402
from fuselm.errors import UnsupportedKernelError  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType  # noqa: E402
from fuselm.ir.quant_ops import groups, pack_nibbles  # noqa: E402

from fuselm.codegen import triton as triton_codegen  # noqa: E402

# masked-off lanes of a tile hold placeholder values that the interpreter warns about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# max|kernel - reference| / max|reference|: the reference casts the dequantized weight to
# x's dtype too, so float activations agree to accumulation order in fp32; f16 / bf16
# results (and the reference's epilogue, computed in x's dtype) round once or twice, and
# the interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest)
FLOAT_TOL = {"f32": 1e-4, "f16": 2e-3, "bf16": 3e-2}
# int8 activations: a code may differ by one rounding step, and the reference rounds the
# dequantized x to x's dtype where the kernel scales exact int32 sums
INT8_TOL = {"f32": 1e-3, "f16": 3e-3, "bf16": 3e-2}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qkernels")


def qgemm_group(fmt, k, n, group_size=None, dtype="f32", scale_dtype="f32", steps=(), activations="float",
                smooth=False, outliers=0):
    """A graph of one qgemm(x[T, k], *parts, *extras), its parts graph inputs."""
    group_size = group_size or k
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", k), dtype))
    g = groups(k, group_size)
    parts = {}
    if smooth:
        parts["smooth"] = TensorType((k,), "f32")
    parts["q"] = TensorType((n, k), "i8") if fmt == "int8" else TensorType((n, -(-k // 32) * 16), "u8")
    parts["scale"] = TensorType((n, g), scale_dtype)
    if fmt == "int4":
        parts["offset"] = TensorType((n, g), scale_dtype)
    if outliers:
        parts["keep"] = TensorType((outliers,), "i64")
        parts["w_keep"] = TensorType((n, outliers), "f32")
    inputs = [b.input(name, t) for name, t in parts.items()]
    extras, width = [], n
    for step in steps:
        if step == "gated_silu":
            width //= 2
        elif step in ("bias", "residual"):
            shape = (width,) if step == "bias" else ("T", width)
            extras.append(b.input(f"{step}{len(extras)}", TensorType(shape, dtype)))
    node = b.op("qgemm", x, *inputs, *extras, format=fmt, group_size=group_size, n=n, k=k, parts=list(parts),
                activations=activations, epilogue=tuple(steps))
    return b.build([node])


def random_args(group, tokens, seed=0):
    """Tensors for the group's inputs: parts of the format's dtypes and value ranges."""
    gen = torch.Generator().manual_seed(seed)
    node = group.nodes[0]
    k = node.attrs["k"]
    args = []
    for value in group.inputs:
        t = value.type
        shape = [tokens if not isinstance(d, int) else d for d in t.shape]
        if value.name == "q" and t.dtype == "i8":
            args.append(torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8))
        elif value.name == "q":
            args.append(pack_nibbles(torch.randint(0, 16, (shape[0], k), generator=gen)))
        elif value.name == "scale":
            args.append((torch.rand(shape, generator=gen) * 0.02 + 0.005).to(t.torch_dtype))
        elif value.name == "offset":
            args.append((-torch.rand(shape, generator=gen) * 0.1).to(t.torch_dtype))
        elif value.name == "smooth":
            args.append(torch.rand(shape, generator=gen) + 0.5)
        elif value.name == "keep":
            args.append(torch.randperm(k, generator=gen)[: shape[0]].sort().values)
        elif value.name == "w_keep":
            args.append(torch.randn(shape, generator=gen) * 0.2)
        else:
            args.append(torch.randn(shape, generator=gen).to(t.torch_dtype))
    if "keep" in [v.name for v in group.inputs]:  # outlier features: large values in x
        x, keep = args[0], args[[v.name for v in group.inputs].index("keep")]
        args[0] = x.index_fill(1, keep, 0.0) + torch.zeros_like(x).index_fill(1, keep, 8.0).to(x.dtype)
    return args


def assert_close(kernel, group, args, tol):
    expected = ir.interpret(group, *[a.clone() for a in args])
    got = kernel.run(*args)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    error = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert error <= tol, f"max|diff| / max|ref| = {error:.3g} > {tol}"
    return got


# ----------------------------------------------------------------------------- weight-only
@pytest.mark.parametrize("fmt, k, n, group_size, dtype, scale_dtype, steps, tokens", [
    ("int8", 72, 40, None, "f32", "f32", (), (1, 17)),  # per channel
    ("int8", 100, 56, 32, "f16", "f16", ("bias", "gelu"), (3, 130)),
    ("int4", 72, 80, 32, "f32", "f16", ("gated_silu", "residual"), (1, 17)),
    ("int4", 136, 48, 64, "bf16", "f32", ("bias",), (3, 130)),
    ("nf4", 100, 40, 64, "f16", "f16", ("silu",), (1, 130)),
    ("nf4", 40, 24, 32, "f32", "f32", ("residual",), (3, 17)),
])
def test_weight_only(fmt, k, n, group_size, dtype, scale_dtype, steps, tokens, kernel_dir):
    group = qgemm_group(fmt, k, n, group_size, dtype, scale_dtype, steps)
    kernel = triton_codegen.emit(group, kernel_dir)
    assert kernel.name.startswith(f"qgemm_{fmt}_g{group_size or k}_k{k}_") and kernel.ops == ("qgemm",)
    for t in tokens:
        assert_close(kernel, group, random_args(group, t, seed=t), FLOAT_TOL[dtype])


def test_source_is_readable_and_reads_the_parts(kernel_dir):
    group = qgemm_group("int4", 72, 40, 32, steps=("bias",))
    source = triton_codegen.emit(group, kernel_dir).source
    assert "def launch(x, q, scale, offset, bias)" in source
    assert "def int4_weight(" in source and "tile_product(x_lo" in source and "nf4_level" not in source


@pytest.mark.parametrize("form", [
    dict(fmt="nf4", k=72, n=48, group_size=32, dtype="f16", scale_dtype="f16", steps=("gated_silu",)),
    dict(fmt="int8", k=72, n=40, dtype="f32", activations="int8", smooth=True, outliers=3, steps=("bias",)),
])
def test_every_candidate_tile(form, kernel_dir, monkeypatch):
    """The interpreter runs a row's first candidate; on a GPU any may win (the GEMV tiles of decode)."""
    group = qgemm_group(**form)
    kernel = triton_codegen.emit(group, kernel_dir)
    module = sys.modules[kernel.run.__module__]
    candidates = [cfg for _, row in module.CONFIGS for cfg in row]
    assert any(not cfg["DOT"] for cfg in candidates)
    args = random_args(group, 5)
    tol = (INT8_TOL if form.get("activations") == "int8" else FLOAT_TOL)[form["dtype"]]
    for cfg in candidates:
        monkeypatch.setattr(module, "CONFIGS", [(None, [cfg])])
        assert_close(kernel, group, args, tol)


# ----------------------------------------------------------------------------- int8 activations
@pytest.mark.parametrize("dtype, smooth, steps, tokens", [
    ("f32", True, ("bias", "relu"), (1, 3, 17)),
    ("bf16", False, ("gated_silu",), (1, 130)),
])
def test_w8a8(dtype, smooth, steps, tokens, kernel_dir):
    group = qgemm_group("int8", 100, 48, dtype=dtype, steps=steps, activations="int8", smooth=smooth)
    kernel = triton_codegen.emit(group, kernel_dir)
    assert "_quantize_kernel" in kernel.source and "int8_tile_product" in kernel.source
    for t in tokens:
        assert_close(kernel, group, random_args(group, t, seed=t), INT8_TOL[dtype])


@pytest.mark.parametrize("dtype, smooth, tokens", [("f32", False, (1, 17)), ("f16", True, (3, 130))])
def test_llm_int8_outlier_features(dtype, smooth, tokens, kernel_dir):
    group = qgemm_group("int8", 72, 40, dtype=dtype, steps=("residual",), activations="int8", smooth=smooth,
                        outliers=5)
    kernel = triton_codegen.emit(group, kernel_dir)
    for t in tokens:
        assert_close(kernel, group, random_args(group, t, seed=t), INT8_TOL[dtype])


def test_float_activations_with_outlier_features(kernel_dir):
    group = qgemm_group("nf4", 72, 40, 32, outliers=3)
    kernel = triton_codegen.emit(group, kernel_dir)
    for t in (1, 17):
        assert_close(kernel, group, random_args(group, t, seed=t), FLOAT_TOL["f32"])


def test_int8_activations_catch_a_wrong_scale(kernel_dir):
    """The tolerance of the int8 path still fails a kernel whose scales are off by 1%."""
    group = qgemm_group("int8", 72, 40, activations="int8")
    kernel = triton_codegen.emit(group, kernel_dir)
    args = random_args(group, 3)
    expected = ir.interpret(group, *args)
    wrong = kernel.run(args[0], args[1], args[2] * 1.01)
    assert (wrong - expected).abs().max() / expected.abs().max() > INT8_TOL["f32"]


# ----------------------------------------------------------------------------- unsupported
@pytest.mark.parametrize("fmt, group_size, match", [
    ("int4", 32, "int8 activations .* int8 weight, not a int4"),
    ("int8", 32, "one scale per output channel"),
])
def test_unsupported_int8_activation_forms(fmt, group_size, match, kernel_dir):
    group = qgemm_group(fmt, 64, 16, group_size, activations="int8")
    with pytest.raises(UnsupportedKernelError, match=match):
        triton_codegen.emit(group, kernel_dir)
