"""`fuselm.load(DIR)`: an artifact loaded with no capture and no code generation.

The manifest is verified first (verify.py: format, versions, target, CPU, every file's
sha256), so nothing of an artifact that fails a check is loaded. Then the graph is
parsed from graph.ir over the memory-mapped weights, partitioned again (the same groups
as at build: same graph, same fuselm), and each group's kernel is loaded from the
artifact's copy of its cache entry by the target's backend (`load(group, directory)`),
found by the same key the kernel cache gave it. On cpu the forward runs the artifact's
program (program/, the whole graph as one Relax VM call, bound to the mapped weights);
the kernels serve `.kernels`, `inspect` and the Python executor.

The result is called as `fuselm.compile`'s result is, with the arguments of the model's
forward (positional or by name), and returns what the model returned; `.graph`,
`.kernels`, `.fallbacks` and `.steps` describe it.
"""
from __future__ import annotations

import functools
import importlib
import threading
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import torch

from ..codegen.cache import KernelCache
from ..errors import ArtifactError
from ..frontend.signature import CallSignature
from ..ir.interpreter import bind_symbols
from ..ir.text import IRParseError, parse
from ..passes.partition import KernelGroup, partition
from ..onnx_model import OnnxCalls, OnnxGraphConfig
from ..runtime.compiled_graph import CompiledGraph, DescribesCompiledGraph
from ..runtime.executor import FALLBACK_PREFIX, fallback_kernel
from ..target import Target, get_target
from .codec import decode_output, decode_signature
from .format import GRAPH, KERNELS, TOKENIZER, WEIGHTS, rebuild_command
from .machine import loading_settings
from .verify import verify
from .weights import map_weights

MAX_REMEMBERED_SHAPES = 256  # call shapes known to fit the graph (as fuselm.compile's result)


def load(directory: Union[str, Path], target: Union[None, str, Target] = None) -> "Artifact":
    """The artifact built by `fuselm build` at `directory`, ready to call. `target` (None
    or "auto": the artifact's own) is checked against the artifact's; an ArtifactError
    says what is wrong, before anything is loaded, if this machine cannot run it."""
    directory = Path(directory)
    manifest = verify(directory, target)
    target = get_target(manifest["target"])
    with target.importing():
        compiled = _compiled_graph(directory, manifest, target)
    if manifest["model"]["model_type"] == "onnx":
        return OnnxArtifact(directory, manifest, compiled)
    return Artifact(directory, manifest, compiled)


def _compiled_graph(directory: Path, manifest: dict, target: Target) -> CompiledGraph:
    rebuild = rebuild_command(manifest, directory)
    constants = map_weights(directory / WEIGHTS)
    if target.device.type != "cpu":
        constants = {name: tensor.to(target.device) for name, tensor in constants.items()}
    try:
        graph = parse((directory / GRAPH).read_text(), constants)
    except (IRParseError, KeyError, TypeError) as error:
        raise ArtifactError(f"{directory / GRAPH}: {error}; rebuild it: `{rebuild}`") from None
    steps = partition(graph)
    launches = _load_kernels(directory, manifest, target, steps, rebuild)
    program = _load_program(directory, manifest, target, graph, steps, rebuild)
    fallbacks = Counter(kernel.name.removeprefix(FALLBACK_PREFIX) for _, kernel in launches
                        if kernel.name.startswith(FALLBACK_PREFIX))
    return CompiledGraph(graph, steps, launches, fallbacks, decode_signature(manifest["signature"]),
                         decode_output(manifest["output"]), target, program=program)


def _load_program(directory: Path, manifest: dict, target: Target, graph, steps: list, rebuild: str):
    """The graph's native program (cpu), its weights the mapped ones; None without one."""
    if not manifest["program"]:
        return None
    backend = importlib.import_module(target.backend)
    try:
        program = backend.PROGRAMS.load(graph, directory / manifest["program"])
    except Exception as error:  # whatever the backend raises for files it cannot use
        raise ArtifactError(f"{directory / manifest['program']}: the program does not load "
                            f"({type(error).__name__}: {error}); rebuild it: `{rebuild}`") from None
    return program.bind(graph.constants, steps)


def _load_kernels(directory: Path, manifest: dict, target: Target, steps: list, rebuild: str) -> list:
    """[(group, Kernel)] for every kernel group, each distinct kernel loaded once. With a
    program, which runs the whole graph, a kernel loads only when something calls it."""
    listed = {kernel["key"]: kernel for kernel in manifest["kernels"]}
    kernels, launches = {}, []
    with loading_settings(manifest["machine"]):  # the CPU the kernels were built (and keyed) for
        keys = KernelCache(target, directory / KERNELS)  # for its keys only: nothing is generated here
        for group in (step for step in steps if isinstance(step, KernelGroup)):
            key = keys.key(group.graph)
            if key not in listed:
                raise ArtifactError(f"{directory / GRAPH} needs a kernel for [{' '.join(group.ops)}] (key {key}), "
                                    f"which {directory / KERNELS} does not hold; rebuild it: `{rebuild}`")
            if key not in kernels and listed[key].get("fallback"):  # the IR reference runs it, as at build
                kernels[key] = fallback_kernel(group, target.name, listed[key]["name"])
            if key not in kernels:
                load = functools.partial(_load_kernel, keys.backend, group.graph, directory / KERNELS / key,
                                         listed[key]["name"], manifest["machine"], rebuild)
                source = listed[key].get("source")
                kernels[key] = (DeferredKernel(listed[key]["name"], target.name, tuple(group.ops),
                                               str(directory / source) if source else None, load)
                                if manifest["program"] else load())
            launches.append((group, kernels[key]))
    return launches


def _load_kernel(backend, group, entry: Path, name: str, machine: dict, rebuild: str):
    with loading_settings(machine):
        try:
            return backend.load(group, entry)
        except Exception as error:  # whatever the backend raises for files it cannot use
            raise ArtifactError(f"{entry}: kernel {name} does not load ({type(error).__name__}: {error}); "
                                f"rebuild it: `{rebuild}`") from None


class DeferredKernel:
    """A kernel of an artifact whose program computes the whole graph: named as the
    manifest lists it, and loaded (which imports the code generator: seconds) only when
    something runs it or reads its source (`fuselm inspect`, the executor)."""

    def __init__(self, name: str, target: str, ops: tuple, source_path: Optional[str], load):
        self.name, self.target, self.ops, self.source_path = name, target, ops, source_path
        self._load, self._kernel, self._lock = load, None, threading.Lock()

    def kernel(self):
        with self._lock:
            if self._kernel is None:
                self._kernel = self._load()
            return self._kernel

    def run(self, *tensors):
        return self.kernel().run(*tensors)

    def __getattr__(self, name: str):  # source, source_ext, extra_sources: the loaded kernel's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.kernel(), name)


class Artifact(DescribesCompiledGraph):
    """A loaded artifact, called like the model it was built from: `artifact(*args,
    **kwargs)` returns what the model's forward returns. `.graph`, `.kernels`,
    `.fallbacks` and `.steps` as `fuselm.compile`'s result; `.config`, `.tokenizer`,
    `.dtype`, `.target`, `.max_model_len`, `.block_size` and `.manifest` for serving."""

    def __init__(self, directory: Path, manifest: dict, compiled: CompiledGraph):
        from ..models.config import config_from_dict

        self.path, self.manifest, self._compiled = directory, manifest, compiled
        self.target = compiled.target
        model = manifest["model"]
        if model["model_type"] != "onnx":  # (an ONNX graph's config is its inputs' and outputs' names)
            self.config = config_from_dict({**model["config"], "model_type": model["model_type"]})
        self.dtype = getattr(torch, manifest["dtype"])
        self.max_model_len: int = manifest["max_model_len"]
        self.block_size: Optional[int] = manifest["block_size"]
        self._parameters = compiled.signature.parameters
        self._fitting: set = set()  # (guard key, dtypes and shapes) of calls the graph was found to take

    def __call__(self, *args, **kwargs):
        signature, tensors = CallSignature.of(None, args, kwargs, self._parameters)
        self._check_call(signature, tensors)
        with torch.no_grad(), self.target.running():
            return self._compiled.run(tensors)

    def _check_call(self, signature: CallSignature, tensors: tuple) -> None:
        """TypeError, naming what differs, for a call the artifact's graph does not take."""
        key = (signature.guard_key(), tuple((t.dtype, t.shape) for t in tensors))
        if key in self._fitting:
            return
        built = self._compiled.signature
        if signature.guard_key() != built.guard_key():
            raise TypeError(f"fuselm artifact {self.path}: it was built for calls forward({self._inputs()}) "
                            f"with {_leaves(built)}; this call passes {_leaves(signature)}")
        try:
            bind_symbols(self._compiled.graph.inputs, self._compiled.graph_inputs(tensors))
        except TypeError as error:
            raise TypeError(f"fuselm artifact {self.path}: {error} (it takes forward({self._inputs()}))") from None
        if len(self._fitting) >= MAX_REMEMBERED_SHAPES:
            self._fitting.clear()
        self._fitting.add(key)

    def _inputs(self) -> str:
        return ", ".join(f"{value.name}: {value.type}" for value in self._compiled.graph.inputs)

    # -- for serving
    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, read from the artifact at first use (None without one)."""
        from ..models.tokenizer import Tokenizer

        return Tokenizer.from_file(self.path / TOKENIZER) if self.manifest["tokenizer"] else None

    def __repr__(self) -> str:
        model = self.manifest["model"]
        return (f"Artifact({str(self.path)!r}, model={model['source']!r} ({model['model_type']}), "
                f"target={self.target.name}, {len(self.kernels)} kernels)")


class OnnxArtifact(OnnxCalls, Artifact):
    """An artifact built from an .onnx file, called as `fuselm.compile` of that file is:
    inputs by position or ONNX name, torch tensors or numpy arrays; a tuple of outputs."""

    def __init__(self, directory: Path, manifest: dict, compiled: CompiledGraph):
        super().__init__(directory, manifest, compiled)
        config = manifest["model"]["config"]
        self._calls(compiled, OnnxGraphConfig(tuple(config["input_names"]), tuple(config["output_names"])))


def _leaves(signature: CallSignature) -> str:
    return ", ".join(f"{name}=<tensor>" if name in signature.names else f"{name}={value!r}"
                     for name, value in zip(signature.leaf_names, signature.constants)) or "no arguments"
