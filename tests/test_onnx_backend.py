"""The ONNX backend (fuselm/onnx_backend.py): onnx's own `BackendTest` runs a handful of
node cases through it on cpu (and on cuda in Triton's interpreter), results come back as
numpy arrays of the ONNX dtypes, shape arguments given as inputs compile lazily per
value, and what fuselm cannot run is an UnsupportedOpError.
(benchmarks/onnx_conformance.py runs the whole suite.)"""
import os
import unittest
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

import onnx.backend.test  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from fuselm.errors import UnsupportedOpError  # noqa: E402
from fuselm.onnx_backend import FuselmBackend  # noqa: E402

CASES = ("test_relu", "test_add_bcast", "test_reshape_reordered_all_dims", "test_reshape_negative_dim",
         "test_softmax_axis_1")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSELM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def backend_tests():
    """onnx's BackendTest over FuselmBackend: {test name: unittest.TestCase class}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suite = onnx.backend.test.BackendTest(FuselmBackend, __name__)
    node_tests = suite.test_cases["OnnxBackendNodeModelTest"]
    return node_tests


def run_backend_tests(node_tests, names) -> unittest.TestResult:
    result = unittest.TestResult()
    for name in names:
        node_tests(name).run(result)
    return result


def test_backend_test_runs_node_cases_on_cpu(backend_tests):
    result = run_backend_tests(backend_tests, [f"{case}_cpu" for case in CASES])
    problems = [f"{test.id()}: {trace.splitlines()[-1]}" for test, trace in result.errors + result.failures]
    assert result.testsRun == len(CASES) and not result.skipped
    assert problems == [] and result.wasSuccessful()


def test_backend_test_reports_a_wrong_result(backend_tests, monkeypatch):
    """The runner's comparison sees what the backend returns: break it, the case fails."""
    from fuselm.onnx_backend import FuselmRep

    run = FuselmRep.run
    monkeypatch.setattr(FuselmRep, "run", lambda self, inputs, **kw: tuple(o + 1 for o in run(self, inputs)))
    result = run_backend_tests(backend_tests, ["test_relu_cpu"])
    assert len(result.failures) == 1 and "tolerance" in result.failures[0][1]


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the cuda target needs a GPU or TRITON_INTERPRET=1 before triton is imported")
def test_backend_test_runs_node_cases_on_cuda(backend_tests):
    """Device CUDA: the Triton kernels (without a GPU in Triton's interpreter)."""
    assert FuselmBackend.supports_device("CUDA")
    result = run_backend_tests(backend_tests, ["test_relu_cuda", "test_add_bcast_cuda"])
    assert result.testsRun == 2 and not result.skipped
    assert result.wasSuccessful(), [trace.splitlines()[-1] for _, trace in result.errors + result.failures]
    # what ran: the cuda target's generated kernels, no fallback
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])])
    rep = FuselmBackend.prepare(relu, "CUDA")
    (compiled,) = rep.compiled.values()
    assert compiled.target.name == "cuda" and len(compiled.kernels) == 1 and compiled.fallbacks == {}
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    np.testing.assert_array_equal(rep.run([x])[0], np.maximum(x, 0))


def model(nodes, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_results_are_numpy_arrays_of_the_onnx_dtypes():
    import ml_dtypes

    m = model([helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Less", ["a", "b"], ["d"])],
              [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [3]) for n in "ab"],
              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [3]),
               helper.make_tensor_value_info("d", TensorProto.BOOL, [3])])
    a = np.array([1.5, -2.0, 3.0], dtype=ml_dtypes.bfloat16)
    b = np.array([0.5, 1.0, -4.0], dtype=ml_dtypes.bfloat16)
    c, d = FuselmBackend.prepare(m, "CPU").run([a, b])
    assert isinstance(c, np.ndarray) and c.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(c.astype(np.float32), [2.0, -1.0, -1.0])
    assert isinstance(d, np.ndarray) and d.dtype == np.bool_
    np.testing.assert_array_equal(d, [False, True, False])


def test_shape_inputs_compile_lazily_once_per_value():
    """Reshape's shape is a graph input: nothing compiles at prepare, each new value
    compiles at its first run, a value seen before reuses its compiled model."""
    m = model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
               helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    rep = FuselmBackend.prepare(m, "CPU")
    assert rep.static == ["shape"] and rep.compiled == {}
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for shape in ([6, 4], [4, -1], [6, 4]):
        (y,) = rep.run([x, np.array(shape, dtype=np.int64)])
        np.testing.assert_array_equal(y, x.reshape(shape))
    assert len(rep.compiled) == 2
    (y,) = rep.run({"shape": np.array([24], dtype=np.int64), "x": x})  # by name
    np.testing.assert_array_equal(y, x.reshape(-1))


def test_run_node():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=2.0)
    a, b, c = (np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in ((3, 4), (5, 4), (5,)))
    (y,) = FuselmBackend.run_node(node, [a, b, c])
    np.testing.assert_allclose(y, 2 * a @ b.T + c, rtol=1e-5, atol=1e-5)


def test_unsupported_op_and_changed_opset_raise_unsupported_op_error():
    hardmax = model([helper.make_node("Hardmax", ["x"], ["y"], name="hm")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    with pytest.raises(UnsupportedOpError, match="Hardmax at hm") as info:
        FuselmBackend.prepare(hardmax, "CPU")
    assert info.value.op == "Hardmax"
    # Softmax changed meaning at opset 13 (the axis): an opset-11 Softmax is refused, not misread
    softmax = model([helper.make_node("Softmax", ["x"], ["y"], axis=0)],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], opset=11)
    with pytest.raises(UnsupportedOpError, match=r"Softmax.*opset 11.*changed in opset 13"):
        FuselmBackend.prepare(softmax, "CPU")


def test_devices():
    assert FuselmBackend.supports_device("CPU")
    assert not FuselmBackend.supports_device("FPGA")
    with pytest.raises(ValueError, match="devices CPU, CUDA"):
        FuselmBackend.prepare(model([helper.make_node("Relu", ["x"], ["y"])],
                                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), "FPGA")
