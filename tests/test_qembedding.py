"""qembedding(ids, q, scale[, offset]): the rows `ids` of a quantized [n, k] table,
dequantized (ir/quant_ops.py), against `dequantize_weight`, and its kernels on both
targets against the reference: the cpu kernel (codegen/tvm/lowering.py) and the cuda
kernel (codegen/triton/elementwise.py) run in Triton's interpreter on the CPU.

Tables are real weights quantized by fuselm/quant/weights.py in every format, with f16
and f32 scales, at odd k (a partial last group and, for 4 bits, a partial last chunk)
and n; ids are symbolic in every dim, i64 or i32, repeat, and include rows 0 and n - 1.
The reference must equal the full table's rows exactly (it gathers before it
dequantizes, so it only ever dequantizes the rows asked for); the kernels must match
it to 1e-6 of max|reference|.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from fuselm import ir  # noqa: E402
from fuselm.codegen import tvm as cpu  # noqa: E402
from fuselm.codegen import triton as cuda  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType  # noqa: E402
from fuselm.ir import quant_ops  # noqa: E402
from fuselm.ir.quant_ops import dequantize_weight, packed_columns  # noqa: E402
from fuselm.ir.registry import IRTypeError  # noqa: E402
from fuselm.quant.weights import GRIDS, encode  # noqa: E402

# masked-off lanes hold placeholder values that the interpreter warns about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TOLERANCE = 1e-6  # max|kernel - reference| / max|reference|
SCALE_DTYPES = {"f16": torch.float16, "f32": torch.float32}

# (format, group_size (None: k, one scale per row), scale dtype, k, n)
TABLES = [
    ("int8", 32, "f16", 45, 7),  # GGUF's Q8_0: a partial last group
    ("int8", None, "f32", 100, 300),  # one scale per row
    ("int8", 32, "f32", 576, 300),  # SmolLM2's width
    ("int4", 32, "f16", 45, 300),  # a partial last chunk
    ("int4", 64, "f32", 100, 7),
    ("nf4", 64, "f16", 576, 7),
    ("nf4", 64, "f32", 45, 300),
]
# symbolic shapes of ids, and the ids given for each: repeats, row 0 and row n - 1
IDS = [(("T",), lambda n: [0, n - 1, 3, 3, n // 2]),
       (("B", "S"), lambda n: [[n - 1, 0, 2], [2, n - 1, n // 3]])]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qembedding")


def quantized_table(fmt: str, group_size: int, scale_dtype: str, k: int, n: int, seed: int = 0) -> dict:
    """The parts (q, scale[, offset]) of a random [n, k] weight quantized in `fmt`."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return encode(w, fmt, GRIDS[fmt](w, group_size, SCALE_DTYPES[scale_dtype]), group_size)


def ir_type(t: torch.Tensor) -> TensorType:
    dtype = {torch.int8: "i8", torch.uint8: "u8", torch.float16: "f16", torch.float32: "f32"}[t.dtype]
    return TensorType(tuple(t.shape), dtype)


def qembedding_graph(parts: dict, fmt: str, group_size: int, k: int, n: int, ids_shape: tuple, ids_dtype="i64",
                     then=None):
    """A graph of qembedding(ids, *parts) (then `then` of its result), everything an input."""
    b = GraphBuilder()
    ids = b.input("ids", TensorType(ids_shape, ids_dtype))
    inputs = [b.input(name, ir_type(t)) for name, t in parts.items()]
    out = b.op("qembedding", ids, *inputs, format=fmt, group_size=group_size, n=n, k=k)
    if then is not None:
        out = then(b, out)
    return b.build([out])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=TABLES, ids=lambda t: f"{t[0]}-g{t[1] or 'k'}-{t[2]}-k{t[3]}-n{t[4]}")
def table(request):
    fmt, group_size, scale_dtype, k, n = request.param
    group_size = group_size or k
    return fmt, group_size, k, n, quantized_table(fmt, group_size, scale_dtype, k, n)


@pytest.mark.parametrize("ids_shape, ids_of", IDS, ids=["ids1d", "ids2d"])
def test_reference_and_both_kernels(table, ids_shape, ids_of, kernel_dir):
    fmt, group_size, k, n, parts = table
    ids_dtype = "i64" if len(ids_shape) == 1 else "i32"
    ids = torch.tensor(ids_of(n), dtype=TensorType((), ids_dtype).torch_dtype)
    graph = qembedding_graph(parts, fmt, group_size, k, n, ids_shape, ids_dtype)
    args = [ids, *parts.values()]

    # (a) the reference: the table's rows, exactly
    expected = ir.interpret(graph, *args)
    table_f32 = dequantize_weight(*parts.values(), format=fmt, group_size=group_size, n=n, k=k)
    assert expected.shape == (*ids.shape, k) and torch.equal(expected, table_f32[ids.long()])

    # (b) the cpu kernel, built once for every size of the ids
    kernel = cpu.emit(graph)
    assert kernel.ops == ("qembedding",) and "T.prim_func" in kernel.source
    builds = cpu.build_count()
    assert relative_error(kernel.run(*args), expected) <= TOLERANCE
    last = torch.full((1,) * ids.dim(), n - 1, dtype=ids.dtype)  # row n - 1 alone: other sizes
    assert relative_error(kernel.run(last, *parts.values()), table_f32[n - 1].reshape(*last.shape, k)) <= TOLERANCE
    assert cpu.build_count() == builds, "a new size of ids rebuilt the kernel"

    # (c) the cuda kernel, in Triton's interpreter
    triton_kernel = cuda.emit(graph, kernel_dir)
    assert "@triton.jit" in triton_kernel.source and ("nf4_level(" in triton_kernel.source) == (fmt == "nf4")
    assert relative_error(triton_kernel.run(*args), expected) <= TOLERANCE


def test_reference_dequantizes_only_the_gathered_rows(monkeypatch):
    """A 49152-row table must stay cheap in the interpreter: only len(ids) rows are dequantized."""
    parts = quantized_table("int8", 32, "f16", 64, 500)
    seen = []

    def spy(q, *rest, **attrs):
        seen.append(q.shape[0])
        return dequantize_weight(q, *rest, **attrs)

    monkeypatch.setattr(quant_ops, "dequantize_weight", spy)
    ids = torch.tensor([[4, 499, 4]])
    out = quant_ops.qembedding_reference(ids, *parts.values(), format="int8", group_size=32, n=500, k=64)
    assert seen == [3] and out.shape == (1, 3, 64)


def test_fused_with_what_follows_in_one_kernel(kernel_dir):
    """Like embedding, qembedding is a cheap gather: partition fuses the scaling after it
    (Gemma's sqrt(d)) into its kernel, whose table parts are the graph's constants."""
    from fuselm.passes.partition import KernelGroup, partition
    from fuselm.runtime.executor import Executor

    parts = quantized_table("int4", 32, "f16", 72, 40)
    b = GraphBuilder()
    ids = b.input("ids", TensorType(("T",), "i64"))
    constants = [b.constant(f"embed.{name}", t) for name, t in parts.items()]
    rows = b.op("qembedding", ids, *constants, format="int4", group_size=32, n=40, k=72)
    graph = b.build([b.op("mul", rows, scalar=72 ** 0.5)])
    steps = partition(graph)
    assert [s.graph.op_counts() for s in steps if isinstance(s, KernelGroup)] == [{"qembedding": 1, "mul": 1}]
    x = torch.tensor([39, 0, 5, 5])
    expected = ir.interpret(graph, x)
    for emit in (lambda group: cpu.emit(group).run, lambda group: cuda.emit(group, kernel_dir).run):
        out = Executor(graph, steps, lambda step: emit(step.graph))(x)
        assert relative_error(out, expected) <= TOLERANCE


@pytest.mark.parametrize("fmt, parts, ids_dtype, match", [
    ("q5_k", {"q": ((8, 16), "i8"), "scale": ((8, 1), "f32")}, "i64", "format 'q5_k'"),
    ("int4", {"q": ((8, 16), "u8"), "scale": ((8, 1), "f16")}, "i64", r"\['q', 'scale', 'offset'\], got 2"),
    ("int8", {"q": ((8, 16), "i8"), "scale": ((8, 1), "f32"), "offset": ((8, 1), "f32")}, "i64", "got 3"),
    ("int8", {"q": ((8, 16), "u8"), "scale": ((8, 1), "f32")}, "i64", "q must be i8"),
    ("nf4", {"q": ((8, 16), "i8"), "scale": ((8, 1), "f32")}, "i64", "q must be u8"),
    ("int8", {"q": ((8, 16), "i8"), "scale": ((8, 2), "f32")}, "i64", "scale must be"),
    ("int8", {"q": ((8, 16), "i8"), "scale": ((8, 1), "f32")}, "f32", "ids must be i64 or i32"),
])
def test_type_errors_name_the_op(fmt, parts, ids_dtype, match):
    b = GraphBuilder()
    ids = b.input("ids", TensorType(("T",), ids_dtype))
    inputs = [b.input(name, TensorType(*t)) for name, t in parts.items()]
    with pytest.raises(IRTypeError, match=f"qembedding: .*{match}"):
        b.op("qembedding", ids, *inputs, format=fmt, group_size=32, n=8, k=16)


def test_part_shapes_follow_the_format():
    """A 4-bit q is [n, packed_columns(k)] bytes; the result is f32 [*ids, k]."""
    b = GraphBuilder()
    ids = b.input("ids", TensorType(("B", "S"), "i32"))
    q = b.input("q", TensorType((10, packed_columns(45)), "u8"))
    scale, offset = (b.input(name, TensorType((10, 1), "f16")) for name in ("scale", "offset"))
    node = b.op("qembedding", ids, q, scale, offset, format="int4", group_size=64, n=10, k=45)
    assert node.type.same_as(TensorType((*ids.type.shape, 45), "f32"))


def test_inspect_counts_the_gathered_rows_and_checks_the_ids():
    """As for embedding: a launch reads the rows of each part it gathers, not the table,
    and `inspect profile` refuses ids past the table (kernels do not bounds-check)."""
    from fuselm.inspect.cost import launch_cost
    from fuselm.inspect.source import InspectError
    from fuselm.inspect.workload import check_embedding_indices

    parts = quantized_table("int4", 32, "f16", 64, 500)
    graph = qembedding_graph(parts, "int4", 32, 64, 500, ("T",))
    ids = torch.tensor([1, 499, 1])
    rows_read = sum(3 * t[0].nbytes for t in parts.values())  # q's bytes, scale and offset of 3 rows
    assert launch_cost(graph, (ids, *parts.values())).bytes == ids.nbytes + rows_read + 3 * 64 * 4
    check_embedding_indices(graph, (ids, *parts.values()))
    with pytest.raises(InspectError, match="reaches 500, past the 500 rows"):
        check_embedding_indices(graph, (torch.tensor([500]), *parts.values()))
