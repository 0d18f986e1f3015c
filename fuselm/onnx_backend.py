"""An ONNX backend (`onnx.backend.base.Backend`) running fuselm's generated kernels, so
the onnx package's own backend test suite (`onnx.backend.test.BackendTest`) runs
against fuselm (benchmarks/onnx_conformance.py runs it and counts the results).

    from fuselm.onnx_backend import FuselmBackend

    rep = FuselmBackend.prepare(model, "CPU")       # "CPU": target cpu (TVM), "CUDA": target cuda (Triton)
    outputs = rep.run([x, y])                       # numpy arrays in, a tuple of numpy arrays out
    outputs = FuselmBackend.run_node(node, [x, y])  # one node, its inputs' types taken from the arrays

    import onnx.backend.test
    suite = onnx.backend.test.BackendTest(FuselmBackend, __name__)

A model is imported (frontend/onnx.py), goes through the target's passes and kernels
(`CompiledOnnxModel`, strict: a group no generated kernel computes is an error, not a
fallback) and runs; nothing here computes a result another way (no `onnx.reference`,
no ONNX Runtime).

Shape arguments that are graph inputs. The IR needs some op inputs as constants
(`STATIC_INPUTS`: Reshape's shape, Slice's starts...). When such an input is a graph
input, as in most backend node cases, its value is known only at `run`: the rep then
compiles lazily, at the first `run`, with those inputs fixed to the values given
(`import_onnx(specialize=...)`), and compiles again for other values (one compiled model
per distinct set, kept). A model without such inputs compiles in `prepare`.

Opsets below 13: a model whose ops all mean at its opset what they mean at opset 13
(their schema has not changed since) imports with the opset-13 semantics; otherwise
`prepare` raises UnsupportedOpError naming the first op that changed.

Errors: an op the importer cannot map is an `UnsupportedOpError`, a group no kernel of
the target computes an `UnsupportedKernelError` (both FuselmErrors), so a test runner
can tell "unsupported" from "failed" (a wrong result, or another exception).

On a machine without a GPU, device "CUDA" is supported when TRITON_INTERPRET=1 is set
before triton is imported: the cuda target's Triton kernels run in Triton's interpreter.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

import onnx
from onnx.backend.base import Backend, BackendRep

from .errors import UnsupportedOpError

DEVICES = {"CPU": "cpu", "CUDA": "cuda"}  # the onnx device type -> fuselm's target


def _target_name(device: str) -> str:
    kind = str(device).split(":")[0].upper()
    if kind not in DEVICES:
        raise ValueError(f"fuselm's ONNX backend runs on devices {', '.join(DEVICES)}, got {device!r}")
    return DEVICES[kind]


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _opset_check(model) -> bool:
    """False (import with opset-13 semantics) for a model below opset 13 whose ops have
    not changed since its opset; True for opset 13 and later. An op that changed is an
    UnsupportedOpError (the importer knows only the opset-13+ meaning), and so is an op
    of another domain."""
    from .frontend.onnx import MIN_OPSET

    for node in model.graph.node:  # (a model of only ai.onnx.ml ops may import no default opset)
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(node.op_type, node.name or node.output[0],
                                     f"custom domain {node.domain!r}: fuselm imports only the default ONNX domain")
    opset = _default_opset(model)
    if opset >= MIN_OPSET or opset == 0:
        return True
    for node in model.graph.node:
        try:
            since = onnx.defs.get_schema(node.op_type, MIN_OPSET).since_version
        except onnx.defs.SchemaError:
            continue  # not an ONNX op: the importer says so
        if since > opset:
            raise UnsupportedOpError(node.op_type, node.name or node.output[0],
                                     f"the model's opset {opset} defines it differently from opset {MIN_OPSET} "
                                     f"(changed in opset {since}); fuselm imports opset {MIN_OPSET} and later")
    return False


def _static_inputs(model) -> list:
    """The graph inputs the IR needs as constants (a STATIC_INPUTS argument of a node)."""
    from .frontend.onnx import STATIC_INPUTS

    inputs = {vi.name for vi in model.graph.input}
    static = set()
    for node in model.graph.node:
        for i in STATIC_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in inputs:
                static.add(node.input[i])
    return sorted(static)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A result as numpy: bf16 as ml_dtypes' bfloat16 (what onnx's numpy_helper reads)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class FuselmRep(BackendRep):
    """A model prepared for a target: `run(inputs)` (a list in graph-input order, or a
    dict by name; numpy arrays) returns a tuple of numpy arrays in graph-output order."""

    def __init__(self, model: onnx.ModelProto, target: str, cache_dir: Optional[str] = None, strict: bool = True):
        from .frontend.onnx import ONNX_DTYPES

        self.model, self.target = model, target
        self.cache_dir = cache_dir
        self.strict = strict
        self.opset_check = _opset_check(model)
        initializers = {t.name for t in model.graph.initializer}
        self.input_names = [vi.name for vi in model.graph.input if vi.name not in initializers]
        self.input_dtypes = {vi.name: ONNX_DTYPES.get(vi.type.tensor_type.elem_type) for vi in model.graph.input
                             if vi.type.HasField("tensor_type")}
        self.static = [name for name in _static_inputs(model) if name in self.input_names]
        self.compiled: dict = {}  # the static inputs' values (bytes, dtype, shape) -> CompiledOnnxModel
        if not self.static:
            self._compile({})

    def _compile(self, specialize: dict):
        from .api import CompileOptions, _directory
        from .codegen.cache import KernelCache
        from .onnx_model import CompiledOnnxModel
        from .target import get_target

        target = get_target(self.target)
        target.check_available()
        options = CompileOptions(target, None, self.strict, 0, None, _directory("cache_dir", self.cache_dir), False)
        compiled = CompiledOnnxModel(self.model, options, KernelCache(target, options.cache_dir),
                                     opset_check=self.opset_check, specialize=specialize)
        self.compiled[_key(specialize)] = compiled
        return compiled

    def run(self, inputs: Any, **kwargs: Any) -> tuple:
        from .frontend.onnx import _to_torch

        if isinstance(inputs, dict):
            by_name = dict(inputs)
        else:
            inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(inputs) > len(self.input_names):
                raise TypeError(f"the ONNX model takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}), got {len(inputs)}")
            by_name = dict(zip(self.input_names, inputs))
        specialize = {name: np.asarray(by_name[name]) for name in self.static if name in by_name}
        compiled = self.compiled.get(_key(specialize)) or self._compile(specialize)
        args = {}
        for name in compiled.input_names:
            if name not in by_name:
                raise TypeError(f"the ONNX model's input {name!r} is missing")
            value = by_name[name]
            dtype = self.input_dtypes.get(name)
            # through the importer's conversion: numpy has no bfloat16 torch reads
            args[name] = value if isinstance(value, torch.Tensor) or dtype is None else _to_torch(value, dtype)
        outputs = compiled(**args)
        return tuple(_to_numpy(t) for t in outputs)


def _key(specialize: dict) -> tuple:
    return tuple((name, a.dtype.str, a.shape, a.tobytes()) for name, a in sorted(specialize.items()))


class FuselmBackend(Backend):
    """`onnx.backend.base.Backend` for fuselm: devices "CPU" (target cpu) and "CUDA"
    (target cuda; a GPU, or Triton's interpreter under TRITON_INTERPRET=1).
    `prepare(model, device, cache_dir=None, strict=True)`: `cache_dir` is the kernel
    cache's folder (default: fuselm's, under $FUSELM_CACHE); `strict=False` lets a
    group without a generated kernel run by the IR's reference instead of failing."""

    @classmethod
    def is_compatible(cls, model, device: str = "CPU", **kwargs) -> bool:
        return True  # what fuselm cannot import is an UnsupportedOpError, counted by the runner

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            target = _target_name(device)
        except (ValueError, AttributeError):
            return False
        if target == "cpu":
            return True
        return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs) -> FuselmRep:
        if not isinstance(model, onnx.ModelProto):  # a path or the bytes
            model = onnx.load_model_from_string(bytes(model)) if isinstance(model, (bytes, bytearray)) \
                else onnx.load(os.fspath(model))
        cache_dir, strict = kwargs.pop("cache_dir", None), kwargs.pop("strict", True)
        return FuselmRep(model, _target_name(device), cache_dir, strict)

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs) -> tuple:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs, device: str = "CPU", outputs_info=None, **kwargs) -> tuple:
        """One node on `inputs` (numpy arrays, in the node's input order; its optional
        inputs left out with ""), made a one-node model of opset `opset_version` (default:
        this onnx's)."""
        from onnx import helper

        opset = kwargs.pop("opset_version", onnx.defs.onnx_opset_version())
        names = [name for name in node.input if name]
        arrays = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype),
                                                      np.shape(a)) for name, a in zip(names, arrays)]
        graph_outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
        graph = helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return cls.prepare(model, device, **kwargs).run(arrays)


prepare = FuselmBackend.prepare
run_model = FuselmBackend.run_model
run_node = FuselmBackend.run_node
supports_device = FuselmBackend.supports_device
