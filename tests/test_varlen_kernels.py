"""pack, unpack and varlen_attention (ir/varlen_ops.py) on both targets against the ops'
torch references: the IR interpreter for pack / unpack, varlen_attention_reference for
varlen_attention.

varlen_attention: random cu_seqlens of up to 20 sequences with a length-1 one (and an
empty one), all-equal lengths, a single sequence; GQA; causal or not; the default scale or an explicit one;
Dv != D. On cpu each kernel is built once for symbolic T and N and run at two batches,
in its serial and its parallel form, with sequences longer than a query tile and a key
chunk. `cuda` runs the Triton kernels in the interpreter, so its shapes are tiny (D = 16,
short sequences, one sequence over two query blocks).

pack / unpack: R = (), (D,) and (H, D), symbolic sizes, and each fused with an
elementwise neighbour (unpack then a mul, an add then pack) in one kernel; unpack of an
empty p (no real token) reads nothing and gives zeros.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from fuselm import ir  # noqa: E402
from fuselm.codegen import triton as cuda  # noqa: E402
from fuselm.codegen import tvm as cpu  # noqa: E402
from fuselm.codegen.tvm import varlen  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType, symbol  # noqa: E402


# masked-off lanes of a tile hold placeholder values that the interpreter warns about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

T, N, B, S = symbol("T"), symbol("N"), symbol("B"), symbol("S")
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {"f32": 2e-5, "f16": 3e-3, "bf16": 2e-2}


def random_lengths(count: int, high: int, seed: int) -> list:
    """`count` lengths in 1..high, one of them 1."""
    lengths = torch.randint(1, high + 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    lengths[count // 2] = 1
    return lengths


def cu_seqlens(lengths: list) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


# ----------------------------------------------------------------------------- varlen_attention
def attention_group(heads, kv_heads, head_dim, value_dim, dtype="f32", **attrs):
    b = GraphBuilder()
    q = b.input("q", TensorType((T, heads, head_dim), dtype))
    k = b.input("k", TensorType((T, kv_heads, head_dim), dtype))
    v = b.input("v", TensorType((T, kv_heads, value_dim), dtype))
    cu = b.input("cu", TensorType((N + 1,), "i32"))
    return b.build([b.op("varlen_attention", q, k, v, cu, **attrs)])


def attention_inputs(group, lengths: list, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    q, k, v = (value.type for value in group.inputs[:3])
    return [torch.randn((tokens, *t.shape[1:]), generator=generator).to(TORCH[t.dtype]) for t in (q, k, v)] + [
        cu_seqlens(lengths)]


# (heads, kv heads, D, Dv, causal, scale)
LAYOUTS = {
    "gqa": (4, 2, 16, 16, False, None),
    "gqa-causal-scaled": (4, 2, 16, 16, True, 0.3),
    "mha-dv8-scaled": (2, 2, 16, 8, False, 0.3),
    "mqa-causal-dv24": (4, 1, 16, 24, True, None),
}
# per target: the batches a kernel runs, as lists of sequence lengths
CPU_BATCHES = {  # an empty sequence among the random ones; some past a 64-key chunk
    "random": [random_lengths(20, 40, seed=1), random_lengths(7, 150, seed=2) + [0, 9]],
    "equal": [[24] * 5, [17] * 3],
    "single": [[37], [130]],
}
CUDA_BATCHES = {
    "random": random_lengths(12, 5, seed=1) + [0, 4],
    "equal": [5] * 4,
    "single": [37],  # two query blocks of 32
}


def check_attention(kernel, group, lengths, dtype="f32"):
    args = attention_inputs(group, lengths)
    expected = ir.interpret(group, *args)
    got = kernel.run(*args)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_varlen_attention_cpu(layout, monkeypatch):
    heads, kv_heads, head_dim, value_dim, causal, scale = LAYOUTS[layout]
    group = attention_group(heads, kv_heads, head_dim, value_dim, causal=causal, scale=scale)
    kernel = cpu.emit(group)
    builds = cpu.build_count()
    for lengths in (lengths for batches in CPU_BATCHES.values() for lengths in batches):
        for serial_max in (1 << 62, 0):  # the serial twin, then the parallel form
            monkeypatch.setattr(varlen, "SERIAL_MAX", serial_max)
            check_attention(kernel, group, lengths)
    assert cpu.build_count() == builds, "a new batch rebuilt the kernel"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_varlen_attention_cpu_half_inputs(dtype):
    group = attention_group(4, 2, 16, 16, dtype, causal=True)
    check_attention(cpu.emit(group), group, random_lengths(6, 40, seed=3), dtype)


@pytest.mark.parametrize("batches", list(CUDA_BATCHES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_varlen_attention_cuda(layout, batches, tmp_path):
    heads, kv_heads, head_dim, value_dim, causal, scale = LAYOUTS[layout]
    group = attention_group(heads, kv_heads, head_dim, value_dim, causal=causal, scale=scale)
    check_attention(cuda.emit(group, tmp_path), group, CUDA_BATCHES[batches])


def test_varlen_attention_cuda_f16(tmp_path):
    group = attention_group(4, 2, 16, 16, "f16", causal=True, scale=0.3)
    check_attention(cuda.emit(group, tmp_path), group, [3, 1, 9], "f16")


# ----------------------------------------------------------------------------- pack / unpack
def padding(lengths: list, width: int):
    """(tokens i64[T], positions i64[B, S]) of sequences of `lengths` padded to `width`."""
    real = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    positions = torch.full(real.shape, -1, dtype=torch.int64)
    positions[real] = torch.arange(int(real.sum()))
    return real.reshape(-1).nonzero().reshape(-1), positions


def pack_group(rest: tuple, fused: bool, dtype="f32"):
    """pack(x [B, S, *rest], tokens); fused: pack(x + y, tokens)."""
    b = GraphBuilder()
    x = b.input("x", TensorType((B, S, *rest), dtype))
    if fused:
        x = b.op("add", x, b.input("y", TensorType((B, S, *rest), dtype)))
    return b.build([b.op("pack", x, b.input("tokens", TensorType((T,), "i64")))])


def unpack_group(rest: tuple, fused: bool, dtype="f32"):
    """unpack(p [T, *rest], positions); fused: unpack(...) * 3."""
    b = GraphBuilder()
    out = b.op("unpack", b.input("p", TensorType((T, *rest), dtype)), b.input("positions", TensorType((B, S), "i64")))
    return b.build([b.op("mul", out, scalar=3.0) if fused else out])


RESTS = {"rows": (), "hidden": (16,), "heads": (2, 8)}
PACK_BATCHES = [([3, 1, 5], 5), ([4, 4], 6), ([1], 1)]  # (lengths, padded width)


def pack_args(group, lengths, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens, positions = padding(lengths, width)
    args = []
    for value in group.inputs:
        if value.name == "tokens":
            args.append(tokens)
        elif value.name == "positions":
            args.append(positions)
        else:
            rows = len(tokens) if value.name == "p" else None
            shape = (rows, *value.type.shape[1:]) if rows is not None else (len(lengths), width, *value.type.shape[2:])
            args.append(torch.randn(shape, generator=generator).to(TORCH[value.type.dtype]))
    return args


def run_pack_cases(kernel, group, batches=PACK_BATCHES):
    for lengths, width in batches:
        args = pack_args(group, lengths, width)
        expected = ir.interpret(group, *args)
        got = kernel.run(*args)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def assert_one_loop_nest(kernel):
    """Fused: no intermediate buffer between the ops (cpu), one store per program (cuda)."""
    if kernel.target == "cpu":
        assert "alloc_buffer" not in kernel.source
    else:
        assert kernel.source.count("tl.store(") == 1


@pytest.mark.parametrize("fused", [False, True], ids=["alone", "fused"])
@pytest.mark.parametrize("rest", list(RESTS))
@pytest.mark.parametrize("op", ["pack", "unpack"])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_pack_unpack(target, op, rest, fused, tmp_path):
    group = (pack_group if op == "pack" else unpack_group)(RESTS[rest], fused)
    kernel = cpu.emit(group) if target == "cpu" else cuda.emit(group, tmp_path)
    run_pack_cases(kernel, group)
    if fused:
        assert_one_loop_nest(kernel)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_unpack_of_no_tokens_reads_nothing(target, tmp_path):
    group = unpack_group((16,), fused=True)
    kernel = cpu.emit(group) if target == "cpu" else cuda.emit(group, tmp_path)
    positions = torch.full((2, 3), -1, dtype=torch.int64)
    got = kernel.run(torch.empty((0, 16)), positions)
    assert torch.equal(got, torch.zeros(2, 3, 16))


def test_pack_half_cuda(tmp_path):
    group = pack_group((2, 8), fused=True, dtype="f16")
    run_pack_cases(cuda.emit(group, tmp_path), group, PACK_BATCHES[:1])
