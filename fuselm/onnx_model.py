"""`fuselm.compile("model.onnx")`: an ONNX model through fuselm's passes and kernels.

    compiled = fuselm.compile("model.onnx", target="cpu")   # or a ModelProto, or its bytes
    outputs = compiled(input_ids, attention_mask)            # or by name; torch or numpy
    outputs = compiled(input_ids=ids, attention_mask=mask)   # a tuple, in graph-output order

The importer (frontend/onnx.py) makes the IR graph; from there it is the torch path's:
the same pass pipeline, partition, kernel cache and program. An ONNX graph is fixed, so
there is no lazy capture and no recompile: the inputs' `dim_param` dims are symbols (any
size), the other dims must match, and a call that does not fit is a TypeError naming the
input.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .frontend.signature import TENSOR, CallSignature, OutputRecord
from .runtime.compiled_graph import CompiledGraph, DescribesCompiledGraph


def is_onnx_model(model) -> bool:
    """Whether `model` is what compile takes as ONNX: a path, bytes or a ModelProto."""
    import os

    if isinstance(model, (str, os.PathLike, bytes, bytearray)):
        return True
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


@dataclass(frozen=True)
class OnnxGraphConfig:
    """What an artifact's manifest records of an ONNX model: its inputs' and outputs' names."""
    input_names: tuple
    output_names: tuple
    model_type: str = "onnx"


MAX_REMEMBERED_SHAPES = 256  # call shapes known to fit the graph


class OnnxCalls(DescribesCompiledGraph):
    """Calls as an ONNX runtime takes them, on the CompiledGraph in `_compiled`: inputs by
    position or by ONNX name, torch tensors or numpy arrays; a tuple of tensors in
    graph-output order. A call that does not fit the graph is a TypeError naming the input."""

    def _calls(self, compiled: CompiledGraph, config: OnnxGraphConfig) -> None:
        self._compiled, self.config = compiled, config
        self.input_names, self.output_names = tuple(config.input_names), tuple(config.output_names)
        inputs = compiled.graph.inputs
        self._parameters = inspect.Signature([inspect.Parameter(value.name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                              for value in inputs])
        self._by_onnx_name = {name: value.name for name, value in zip(self.input_names, inputs)}
        self._fitting: set = set()  # (dtypes, shapes) of calls the graph was found to take

    @property
    def compiled_graph(self) -> CompiledGraph:
        return self._compiled

    def __call__(self, *args, **kwargs):
        kwargs = {self._by_onnx_name.get(name, name): value for name, value in kwargs.items()}
        try:
            bound = self._parameters.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"the ONNX model takes ({', '.join(self.input_names)}): {error}") from None
        tensors = tuple(_tensor(name, bound.arguments[name], self.target.device) for name in self._parameters.parameters)
        self._check_fits(tensors)
        with torch.no_grad(), self.target.running():
            return tuple(self._compiled.run(tensors))

    def _check_fits(self, tensors: tuple) -> None:
        key = tuple((t.dtype, t.shape) for t in tensors)
        if key in self._fitting:
            return
        from .ir.interpreter import bind_symbols

        try:
            bind_symbols(self._compiled.graph.inputs, self._compiled.graph_inputs(tensors))
        except TypeError as error:
            raise TypeError(f"the ONNX model: {error}") from None
        if len(self._fitting) >= MAX_REMEMBERED_SHAPES:
            self._fitting.clear()
        self._fitting.add(key)


class CompiledOnnxModel(OnnxCalls):
    """An ONNX model compiled for a target: called with its inputs by position or by name
    (torch tensors or numpy arrays), it returns a tuple of torch tensors, one per graph
    output. `.graph`, `.kernels`, `.fallbacks` as `fuselm.compile`'s result."""

    def __init__(self, model, options, cache, opset_check: bool = True, specialize=None):
        """`opset_check` and `specialize` go to `import_onnx` (the ONNX backend,
        fuselm/onnx_backend.py, fixes shape arguments that are graph inputs with them)."""
        from .api import generate, warn_fallbacks
        from .frontend.onnx import import_onnx
        from .passes import run_passes

        self.options, self.target = options, options.target
        with self.target.importing():
            imported = import_onnx(model, opset_check=opset_check, specialize=specialize)
            graph = run_passes(imported.graph, self.target.passes(options.donate_weights, None, None, options.pack),
                               dump_dir=options.dump_dir)
        steps, launches, fallbacks, program = generate(graph, options, cache)
        if fallbacks:
            warn_fallbacks(fallbacks, stacklevel=4)
        parameters = inspect.Signature([inspect.Parameter(value.name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                        for value in imported.graph.inputs])
        signature, _ = CallSignature.of(None, tuple(_example(v.type) for v in graph.inputs), {}, parameters)
        spec = pytree.tree_flatten(tuple(range(len(graph.outputs))))[1]
        output = OutputRecord(spec, (TENSOR,) * len(graph.outputs))
        compiled = CompiledGraph(graph, steps, launches, fallbacks, signature, output, self.target, False, program)
        self._calls(compiled, OnnxGraphConfig(tuple(imported.input_names), tuple(imported.output_names)))


def _tensor(name: str, value, device) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the ONNX model's input {name!r} must be a torch tensor or a numpy array, "
                        f"got {type(value).__name__}")
    return value.to(device)


def _example(t) -> torch.Tensor:
    """A placeholder of the type's rank and dtype (the signature records only structure)."""
    return torch.empty((0,) * t.rank, dtype=t.torch_dtype)
