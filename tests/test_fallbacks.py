"""Fallbacks: ATen ops with no IR mapping become opaque `aten` nodes run by calling torch.

Capture (non-strict by default) keeps going where the table stops; the reference
interpreter, partition (a group per aten node) and the executor run such graphs, complex
values included; strict=True refuses them with the op and the model's source line.
"""
import pytest
import torch
import torch.nn.functional as F

from fuselm import UnsupportedKernelError, UnsupportedOpError, ir
from fuselm.errors import FallbackWarning
from fuselm.frontend import capture
from fuselm.ir.aten_op import decode_arg, encode_arg, fallback_ops
from fuselm.ir.registry import infer_type, is_fallback
from fuselm.ir.types import TensorType
from fuselm.passes import run_passes
from fuselm.passes.manager import pipeline
from fuselm.passes.partition import KernelGroup, partition
from fuselm.runtime.executor import Executor, interpreted_kernel


class _Module(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _FftReal(torch.nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real + 1


class _Unmapped(torch.nn.Module):
    """cummax and sort (tuples), unfold (decomposes to constant_pad_nd and an aten.index
    with two index tensors, which the table maps to IR ops), a linear layer between."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        values, indices = torch.cummax(x, 1)
        ordered = torch.sort(self.proj(x), dim=-1).values
        patches = F.unfold(x[None, None], (2, 2))
        return torch.relu(values + ordered), indices, patches


class _TwoIndexTensors(torch.nn.Module):
    def forward(self, x, rows, cols):
        return x[rows, :, cols] * 2  # the refused index: indexed dims not consecutive


class _Spectrum(torch.nn.Module):
    """Complex values between fallbacks, IR ops around them, a weight, a symbolic batch."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 4)

    def forward(self, x):
        spectrum = torch.fft.rfft(x)  # c64[B, 5]
        return self.proj(spectrum.abs() * 2) + torch.view_as_real(torch.exp(spectrum))[..., 1].sum(-1, keepdim=True)


def _round_trips(graph):
    ir.verify(graph)
    text = str(graph)
    assert str(ir.parse(text, constants=graph.constants)) == text


def _eager(model, *args):
    with torch.no_grad():
        return model(*args)


# ----------------------------------------------------------------------------- capture
def test_fft_real_plus_one_is_two_fallbacks_then_ir_ops():
    x = torch.randn(4, 8)
    graph = capture(_FftReal(), (x,))
    assert fallback_ops(graph) == {"aten._fft_r2c.default": 1, "aten.view_as_real.default": 1}
    assert [n.op for n in graph.nodes] == ["aten", "aten", "select", "add"]
    fft, as_real, select, add = graph.nodes
    assert str(fft.type) == "c64[4,8]" and str(as_real.type) == "f32[4,8,2]"
    assert fft.attrs == {"overload": "aten._fft_r2c.default", "args": (None, (1,), 0, False), "tensors": ((0,),),
                         "shape": (4, 8), "dtype": "c64"}
    assert add.inputs == (select,) and add.attrs == {"scalar": 1} and str(add.type) == "f32[4,8]"
    assert fft.source and fft.source.startswith("test_fallbacks.py:")
    _round_trips(graph)
    torch.testing.assert_close(ir.interpret(graph, x), _FftReal()(x))


def test_unmapped_ops_fall_back_and_interpret_equal_to_eager():
    model = _Unmapped().eval()
    x = torch.randn(5, 8)
    graph = capture(model, (x,))
    assert fallback_ops(graph) == {
        "aten.cummax.default": 2,  # one node per result the graph reads
        "aten.sort.default": 1,  # .indices unused: no node
        "aten.constant_pad_nd.default": 1,
    }
    assert graph.op_counts()["index_select"] == 1  # unfold's two-tensor index
    assert graph.op_counts()["gemm"] == 1
    assert sorted(n.attrs["index"] for n in graph.nodes if n.attrs.get("overload") == "aten.cummax.default") == [0, 1]
    _round_trips(graph)
    for got, expected in zip(ir.interpret(graph, x), _eager(model, x)):
        torch.testing.assert_close(got, expected)


def test_handler_refusal_falls_back_and_strict_raises():
    x, rows, cols = torch.randn(6, 4, 7), torch.tensor([0, 2, 5]), torch.tensor([1, 1, 6])
    graph = capture(_TwoIndexTensors(), (x, rows, cols))
    assert fallback_ops(graph) == {"aten.index.Tensor": 1}
    index = next(n for n in graph.nodes if n.op == "aten")
    assert index.attrs["args"] == (None, (None, None, None)) and index.attrs["tensors"] == ((0,), (1, 0), (1, 2))
    _round_trips(graph)
    torch.testing.assert_close(ir.interpret(graph, x, rows, cols), x[rows, :, cols] * 2)
    with pytest.raises(UnsupportedOpError) as err:
        capture(_TwoIndexTensors(), (x, rows, cols), strict=True)
    assert "aten.index.Tensor" in str(err.value) and "x[rows, :, cols] * 2" in str(err.value)


def test_strict_names_the_op_and_the_model_line():
    with pytest.raises(UnsupportedOpError) as err:
        capture(_Unmapped(), (torch.randn(5, 8),), strict=True)
    message = str(err.value)
    assert err.value.op == "aten.cummax.default"
    assert "test_fallbacks.py:" in message and "torch.cummax(x, 1)" in message


def test_non_tensor_arguments_round_trip():
    """kwargs, dtypes, strings, a complex scalar, symbolic sizes among the arguments."""
    boundaries = torch.tensor([-1.0, 0.0, 1.0])
    cases = [
        lambda x: torch.bucketize(x, boundaries, out_int32=True, right=True),
        lambda x: torch.searchsorted(torch.sort(x, dim=-1).values, x * 0.5, side="right"),
        lambda x: torch.cumprod(x, 0, dtype=torch.float64),
        lambda x: (x * 1j).imag,
        lambda x: torch.narrow(x, 0, 1, x.shape[0] - 1).cummin(0).values,
        lambda x: torch.linalg.vector_norm(x, ord=3, dim=1),
    ]
    for fn in cases:
        model = _Module(fn)
        graph = capture(model, (torch.randn(6, 8),), dynamic={"x": {0: ("B", 3, 64)}})
        assert fallback_ops(graph), str(graph)
        _round_trips(graph)
        for rows in (4, 9):
            x = torch.randn(rows, 8)
            got, expected = ir.interpret(graph, x), fn(x)
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected)
    kwargs = capture(_Module(cases[0]), (torch.randn(6, 8),)).nodes[0].attrs["kwargs"]
    assert kwargs == (("out_int32", True), ("right", True))
    dtype = capture(_Module(cases[2]), (torch.randn(6, 8),)).nodes[0].attrs["kwargs"]
    assert dtype == (("dtype", "torch.float64"),)


def test_canonical_arguments():
    cases = [(None, None), (True, True), (3, 3), (-2.5, -2.5), ("reflect", "reflect"), ((1, (2, 3)), [1, [2, 3]]),
             (torch.float16, torch.float16), (torch.strided, torch.strided),
             (torch.contiguous_format, torch.contiguous_format), (1 + 2j, 1 + 2j),
             ("torch.float32", "torch.float32"), ("=x", "=x")]  # real strings that look like tags
    for value, expected in cases:
        encoded = encode_arg(value)
        hash(encoded)
        assert decode_arg(encoded, torch.device("cpu")) == expected
    assert encode_arg("torch.float32") != encode_arg(torch.float32)
    assert decode_arg(encode_arg(torch.device("cpu")), torch.device("meta")) == torch.device("meta")
    with pytest.raises(TypeError):
        encode_arg(object())


def test_symbolic_dims_at_two_sizes():
    graph = capture(_FftReal(), (torch.randn(4, 8),), dynamic={"x": {0: "B"}})
    assert [str(n.type) for n in graph.nodes] == ["c64[B,8]", "f32[B,8,2]", "f32[B,8]", "f32[B,8]"]
    _round_trips(graph)
    for rows in (3, 11):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(ir.interpret(graph, x), _FftReal()(x))


def test_data_dependent_result_size():
    model = _Module(lambda x: torch.nonzero(x > 0).float().sum(0))
    graph = capture(model, (torch.randn(6, 8),))
    nonzero = next(n for n in graph.nodes if n.op == "aten")
    assert nonzero.attrs["overload"] == "aten.nonzero.default" and nonzero.attrs["shape"] == ("u0", 2)
    _round_trips(graph)
    x = torch.randn(6, 8)
    torch.testing.assert_close(ir.interpret(graph, x), model(x))


# ----------------------------------------------------------------------------- types
def test_complex_dtypes():
    c64 = TensorType((4, 8), "c64")
    assert c64.torch_dtype == torch.complex64 and TensorType((2,), "c128").torch_dtype == torch.complex128
    assert not c64.is_float and c64.is_complex and not TensorType((1,), "f32").is_complex
    assert ir.dtype_of(torch.complex64) == "c64" and str(ir.parse_type("c128[T,3]")) == "c128[T,3]"
    assert str(infer_type("add", [TensorType((4, 8), "f32"), c64], {})) == "c64[4,8]"
    assert str(infer_type("mul", [c64], {"scalar": 2.0})) == "c64[4,8]"


def test_ir_op_that_mistypes_complex_falls_back():
    """abs of c64 maps to an IR op whose rule says c64 where torch says f32: capture checks
    the mapping's dtype against torch's and calls the op instead (exp of c64 is typed right)."""
    model = _Spectrum().eval()
    graph = capture(model, (torch.randn(6, 8),))
    assert fallback_ops(graph) == {"aten._fft_r2c.default": 1, "aten.abs.default": 1,
                                   "aten.view_as_real.default": 1}
    assert graph.op_counts()["exp"] == 1
    x = torch.randn(6, 8)
    torch.testing.assert_close(ir.interpret(graph, x), _eager(model, x))
    with pytest.raises(UnsupportedOpError):
        capture(_Module(lambda x: (x * 1j).imag), (torch.randn(2, 3),), strict=True)


def test_fallback_flag_and_warning_type():
    assert is_fallback("aten") and not is_fallback("add")
    assert issubclass(FallbackWarning, UserWarning)
    assert fallback_ops(capture(_Module(lambda x: x + 1), (torch.randn(2, 3),))) == {}


# ----------------------------------------------------------------------------- partition, executor
def test_partition_gives_each_aten_node_a_group_of_its_own():
    graph = run_passes(capture(_Unmapped().eval(), (torch.randn(5, 8),)), pipeline("cpu"))
    groups = [s for s in partition(graph) if isinstance(s, KernelGroup)]
    with_aten = [g for g in groups if "aten" in g.ops]
    assert all(g.ops == ("aten",) for g in with_aten)
    assert len(with_aten) == sum(fallback_ops(graph).values()) == 4


@pytest.mark.parametrize("model_cls,dynamic,sizes", [
    (_Unmapped, None, [5]),
    (_FftReal, {"x": {0: "B"}}, [3, 10]),
    (_Spectrum, {"x": {0: ("B", 2, 64)}}, [2, 7]),
])
def test_executor_with_interpreted_kernels_equals_eager(model_cls, dynamic, sizes):
    model = model_cls().eval()
    graph = run_passes(capture(model, (torch.randn(sizes[0], 8),), dynamic), pipeline("cpu"))
    steps = partition(graph)
    assert any(isinstance(s, KernelGroup) and s.ops == ("aten",) for s in steps)
    assert any(isinstance(s, KernelGroup) and s.ops != ("aten",) for s in steps)
    run = Executor(graph, steps, interpreted_kernel)
    for rows in sizes:
        x = torch.randn(rows, 8)
        got, expected = run(x), _eager(model, x)
        for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(a, b)


def test_backends_refuse_aten_groups():
    graph = capture(_FftReal(), (torch.randn(4, 8),), dynamic={"x": {0: "B"}})
    groups = [s.graph for s in partition(graph) if isinstance(s, KernelGroup) and s.ops == ("aten",)]
    assert len(groups) == 2
    pytest.importorskip("tvm")
    from fuselm.codegen.tvm.kernels import plan_of

    for group in groups:
        with pytest.raises(UnsupportedKernelError):
            plan_of(group)


def test_triton_refuses_aten_groups(tmp_path):
    pytest.importorskip("triton")
    from fuselm.codegen import triton as triton_backend

    graph = capture(_FftReal(), (torch.randn(4, 8),))
    for step in partition(graph):
        if isinstance(step, KernelGroup) and step.ops == ("aten",):
            with pytest.raises(UnsupportedKernelError):
                triton_backend.emit(step.graph, tmp_path)


# ----------------------------------------------------------------------------- fuselm.compile
class FftReal(torch.nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real + 1


class ComplexScale(torch.nn.Module):
    def forward(self, x):
        return torch.view_as_real(torch.fft.fft(x) * 2) + 1  # a complex mul: no kernel takes it


def test_compile_runs_fallbacks_and_warns_once_listing_them(tmp_path):
    import warnings

    import fuselm

    x = torch.randn(3, 8)
    compiled = fuselm.compile(FftReal(), target="cpu", cache_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(x)
        compiled(x + 1)
    torch.testing.assert_close(got, FftReal()(x))
    assert compiled.fallbacks == {"aten._fft_r2c.default": 1, "aten.view_as_real.default": 1}
    fallback_warnings = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallback_warnings) == 1
    assert "aten._fft_r2c.default x1" in str(fallback_warnings[0].message)
    (add,) = [k for k in compiled.kernels if "add" in k.ops]
    assert add.source_path and not add.name.startswith("fallback_")  # a generated kernel


def test_compile_strict_refuses_fallbacks(tmp_path, monkeypatch):
    import fuselm

    x = torch.randn(3, 8)
    with pytest.raises(UnsupportedOpError, match="aten._fft_r2c.default"):
        fuselm.compile(FftReal(), target="cpu", strict=True, cache_dir=str(tmp_path))(x)
    monkeypatch.setenv("FUSELM_STRICT", "1")
    with pytest.raises(UnsupportedOpError, match="aten._fft_r2c.default"):
        fuselm.compile(FftReal(), target="cpu", cache_dir=str(tmp_path))(x)


def test_a_group_no_kernel_takes_runs_by_the_reference(tmp_path):
    import fuselm

    x = torch.randn(3, 8)
    compiled = fuselm.compile(ComplexScale(), target="cpu", cache_dir=str(tmp_path))
    with pytest.warns(FallbackWarning, match="mul x1"):
        torch.testing.assert_close(compiled(x), ComplexScale()(x))
    assert compiled.fallbacks["mul"] == 1
    doubled = _Module(lambda z: z * 2)  # captures strictly (an IR mul), but no kernel takes c64
    with pytest.raises(UnsupportedKernelError, match="complex"):
        fuselm.compile(doubled, (torch.randn(4, dtype=torch.complex64),), target="cpu", strict=True,
                       cache_dir=str(tmp_path))
