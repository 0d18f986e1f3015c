"""`fuselm.compile`: capture, optimize, partition, generate kernels, run them.

    compiled = fuselm.compile(model, target="cpu")   # captures on the first call
    compiled(*args, **kwargs)                        # what the model returns, by fuselm's kernels

As torch.compile: with no example inputs the first call captures the model; a call whose
shapes differ recompiles once with the dims that changed made symbolic (automatic
dynamic), so later sizes of those dims reuse the same graph and kernels; non-tensor
arguments are guarded constants (a new value recompiles); past `recompile_limit`
recompiles a FuselmError names the dims that keep changing. `dynamic=True` makes every
dim symbolic from the start, `dynamic=False` compiles each shape statically, and a dict
names symbolic dims as in `frontend.capture` (`{"input_ids": {0: "T"}}`).

An ATen op the IR cannot express runs as a fallback (by torch), and so does a fused
group no kernel can compute (by the IR's reference): `compiled.fallbacks` counts them and
a `FallbackWarning` lists them once; `strict=True` (or FUSELM_STRICT=1) refuses both.

Kernels come from the kernel cache (`FUSELM_CACHE`), so a second compile of the same
model generates nothing, and a new token count runs on the kernels already built.
Weights are taken when the model is captured (prepacked for the kernels): changing the
model's weights afterwards needs a new compile.
"""
from __future__ import annotations

import functools
import inspect
import os
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .codegen.cache import KernelCache, program_cache
from .codegen.dump import write_kernel_dump
from .codegen.kernel import Kernel
from .errors import FallbackWarning, FuselmError, UnsupportedKernelError
from .frontend import capture
from .frontend.capture import AUTO, capture_module
from .frontend.signature import CallSignature, flat_forward
from .ir.graph import Graph
from .ir.registry import get_op
from .passes import CLEANUP, FUSION, run_passes
from .passes.partition import KernelGroup, partition
from .passes.quantize import quantization_passes
from .quant.config import PACKED, QuantizeConfig, quantize_config
from .runtime.compiled_graph import CompiledGraph, KernelInfo  # noqa: F401  (KernelInfo: re-exported)
from .runtime.executor import FALLBACK_PREFIX, fallback_kernel
from .target import Target, get_target

# "captures": graphs captured by compile (tests read it to prove a call reused a graph)
stats: Counter = Counter()
MAX_REMEMBERED_SHAPES = 256  # call shapes mapped straight to their compiled graph
# A program saves the executor's per-launch host work (~10 us a launch) and costs a build
# of seconds once per graph: below this many launches a graph runs kernel by kernel.
PROGRAM_MIN_LAUNCHES = 16


def compile(model: torch.nn.Module, example_inputs=None, *, target: Union[str, Target] = "cpu",
            dynamic: Union[None, bool, dict] = None, strict: bool = False, recompile_limit: int = 8,
            dump_dir: Optional[str] = None, cache_dir: Optional[str] = None,
            donate_weights: bool = False, quantize: Union[None, str, QuantizeConfig] = None,
            pack: bool = False) -> "CompiledModule":
    """Compile `model` for `target`; with `example_inputs` (a tuple of positional
    arguments) it is captured now, else at the first call.

    The graph goes through the generic pass pipeline, then the target's own passes (cpu:
    gemm weights prepacked into the layout its kernels read), then partition.
    `donate_weights=True` lets those layouts reuse the module's weight memory, so weights
    exist once even while compiling; the module must not run afterwards.
    `quantize`: a scheme name ("int8", "w8a8", "int4-g32", "int4-g64", "int4-g128",
    "llm.int8", "nf4") or a `fuselm.QuantizeConfig`: the fused graph's gemms read quantized
    weights (`qgemm`); w8a8 and llm.int8 calibrate on `QuantizeConfig(calibration=[args,
    ...])`, by default on the example inputs (or the first call's).
    `pack=True`: a padded encoder (an attention masked by a `[B, S]` padding-mask input)
    runs its token-wise ops on the real tokens only (passes/pack_varlen.py); the call
    is the same, real positions are eager's, padded positions of the results are zeros."""
    from .onnx_model import is_onnx_model

    onnx = is_onnx_model(model)
    if not onnx and not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuselm.compile takes a torch.nn.Module or an ONNX model (a path, bytes or a "
                        f"ModelProto), got {type(model).__name__}")
    if dynamic not in (None, True, False) and not (isinstance(dynamic, dict) and all(
            isinstance(dims, dict) for dims in dynamic.values())):
        raise TypeError(f"dynamic must be None, True, False or a dict {{parameter: {{dim: symbol}}}}, got {dynamic!r}")
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be True or False, got {pack!r}")
    if isinstance(recompile_limit, bool) or not isinstance(recompile_limit, int) or recompile_limit < 0:
        raise ValueError(f"recompile_limit must be an int >= 0, got {recompile_limit!r}")
    target = get_target(target)
    target.check_available()
    dump_dir = _directory("dump_dir", dump_dir or os.environ.get("FUSELM_DUMP") or None)
    cache_dir = _directory("cache_dir", cache_dir)
    options = CompileOptions(target, dynamic, strict or os.environ.get("FUSELM_STRICT", "") not in ("", "0"),
                             recompile_limit, dump_dir, cache_dir,
                             donate_weights, quantize_config(quantize), pack)
    if onnx:
        if example_inputs is not None or dynamic is not None or quantize is not None:
            raise TypeError("an ONNX model is compiled as its graph is: example_inputs, dynamic and quantize do not "
                            "apply (its dim_param dims are symbolic)")
        from .onnx_model import CompiledOnnxModel

        return CompiledOnnxModel(model, options, KernelCache(options.target, options.cache_dir))
    compiled = CompiledModule(model, options)
    if example_inputs is not None:
        compiled.capture(tuple(example_inputs), {})
    return compiled


def _directory(option: str, path) -> Optional[str]:
    """A directory option as a str path, created now: a path that cannot be one is
    refused at compile, naming the option, not at the first call with an OS error."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{option} must be a str or os.PathLike path, got {type(path).__name__}")
    path = os.path.expanduser(os.fspath(path))  # "~/kernels", as a shell would
    if "\0" in path:
        raise FuselmError(f"{option}={path!r}: a path cannot hold a NUL character")
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise FuselmError(f"{option}={path!r} is a file, not a directory") from None
    except OSError as error:
        raise FuselmError(f"{option}={path!r}: cannot create the directory ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FuselmError(f"{option}={path!r}: the directory is not writable")
    return path


@dataclass(frozen=True)
class CompileOptions:
    target: Target
    dynamic: Union[None, bool, dict]
    strict: bool
    recompile_limit: int
    dump_dir: Optional[str]
    cache_dir: Optional[str]
    donate_weights: bool
    quantize: Optional[QuantizeConfig] = None
    pack: bool = False


class CompiledModule:
    """Callable like the model. `.graph`, `.kernels` and `.fallbacks` describe the graph
    compiled last (they exist once the model has been captured)."""

    def __init__(self, model: torch.nn.Module, options: CompileOptions):
        self.model, self.options, self.target = model, options, options.target
        self.entries: list = []  # CompiledGraph, one per guard and shape class
        self._by_shape: dict = {}
        self._shapes_seen: dict = {}  # guard key -> the tensor shapes of each capture
        self._cache = KernelCache(options.target, options.cache_dir)
        self._warned = False
        self._capturing = threading.RLock()
        self._parameters = inspect.signature(model.forward)

    def __call__(self, *args, **kwargs):
        signature, tensors = CallSignature.of(self.model, args, kwargs, self._parameters)
        entry = self._entry_for(signature, tensors)
        with torch.no_grad(), self.target.running():
            return entry.run(tensors)

    # -- what was compiled
    @property
    def graph(self) -> Graph:
        return self._latest().graph

    @property
    def kernels(self) -> list:
        return self._latest().kernels

    @property
    def fallbacks(self) -> dict:
        return dict(self._latest().fallbacks)

    @property
    def steps(self) -> list:
        return self._latest().steps

    def _latest(self) -> "CompiledGraph":
        if not self.entries:
            raise FuselmError("the model has not been compiled yet: fuselm.compile without example inputs "
                              "captures it at the first call; call it once (or pass example_inputs)")
        return self.entries[-1]

    # -- guards and recompiles
    def _entry_for(self, signature: CallSignature, tensors: tuple) -> "CompiledGraph":
        key = (signature.guard_key(), self.model.training, tuple((t.dtype, t.shape) for t in tensors))
        entry = self._by_shape.get(key)
        if entry is None:
            with self._capturing:  # two threads' first calls capture once
                entry = next((e for e in reversed(self.entries) if e.serves(signature, tensors, self.model.training)), None)
                if entry is None:
                    entry = self.capture_call(signature, tensors)
                if len(self._by_shape) >= MAX_REMEMBERED_SHAPES:
                    self._by_shape.clear()
                self._by_shape[key] = entry
        return entry

    def capture(self, args: tuple, kwargs: dict) -> "CompiledGraph":
        signature, tensors = CallSignature.of(self.model, args, kwargs, self._parameters)
        return self.capture_call(signature, tensors)

    def capture_call(self, signature: CallSignature, tensors: tuple) -> "CompiledGraph":
        ranks = tuple(t.dim() for t in tensors)  # shapes of other ranks are other graphs
        seen = self._shapes_seen.setdefault((signature.guard_key(), ranks), [])
        seen.append(tuple(tuple(t.shape) for t in tensors))
        if len(self.entries) > self.options.recompile_limit:
            raise FuselmError(f"recompile_limit={self.options.recompile_limit} reached: the model was compiled "
                              f"{len(self.entries)} times; {_changing(signature, self._shapes_seen)}. Pass "
                              "dynamic={...} naming those dims, or dynamic=True, or raise recompile_limit")
        if self.entries and self.options.donate_weights:
            raise FuselmError("this call needs a new graph, but donate_weights=True gave the model's weights to the "
                              f"first one; {_changing(signature, self._shapes_seen)}. Compile with dynamic=... "
                              "covering such calls, or without donate_weights")
        dynamic = self._dynamic_spec(signature, seen)
        entry = compile_graph(self.model, signature, tensors, dynamic, self.options, self._cache)
        stats["captures"] += 1
        self.entries.append(entry)
        if entry.fallbacks and not self._warned:
            self._warned = True
            warn_fallbacks(entry.fallbacks, stacklevel=5)
        return entry

    def _dynamic_spec(self, signature: CallSignature, seen: list) -> Optional[dict]:
        """dynamic=None: the dims whose size changed between calls with this guard
        become symbolic; True: every dim; False: none; a dict: as given (plus changes)."""
        policy = self.options.dynamic
        if policy is False:
            return None
        spec: dict = {}
        if isinstance(policy, dict):
            spec = {name: dict(dims) for name, dims in policy.items()}
        for i, name in enumerate(signature.names):
            for dim in range(len(seen[-1][i])):
                sizes = {shapes[i][dim] for shapes in seen}
                wanted = len(sizes) > 1 or (policy is True and seen[-1][i][dim] > 1)  # 0 and 1 stay static
                if wanted and dim not in spec.get(name, {}):
                    spec.setdefault(name, {})[dim] = AUTO
        return spec or None


def _changing(signature: CallSignature, shapes_seen: dict) -> str:
    changes = []
    for seen in shapes_seen.values():
        for i, name in enumerate(signature.names[: len(seen[-1])]):
            for dim in range(len(seen[-1][i])):
                sizes = list(dict.fromkeys(shapes[i][dim] for shapes in seen if len(shapes) > i))
                if len(sizes) > 1:
                    changes.append(f"{name} dim {dim} took sizes {sizes}")
    return "changing: " + "; ".join(changes) if changes else "changing: the non-tensor arguments"


def compile_graph(model: torch.nn.Module, signature: CallSignature, tensors: tuple, dynamic: Optional[dict],
                  options: CompileOptions, cache: KernelCache) -> CompiledGraph:
    """Capture one call of `model`, run the passes, partition, and get every kernel."""
    target = options.target
    training = model.training  # captured in the mode it is in (a new mode is a new graph)
    with torch.no_grad(), target.importing(), flat_forward(model, signature) as (flat, output):
        captured = capture_module(flat, tensors, dynamic, strict=options.strict)
        graph = captured.graph
        quantize = _quantization(model, flat, signature, tensors, options)
        passes = target.passes(options.donate_weights, quantize, _packed_weights(options.quantize), options.pack)
        graph = run_passes(graph, passes, dump_dir=options.dump_dir)
    model.train(training)
    steps, launches, fallbacks, program = generate(graph, options, cache)
    state = {name: functools.partial(model.get_buffer, buffer) for name, buffer in captured.state.items()}
    return CompiledGraph(graph, steps, launches, fallbacks, signature, output, target, training, program,
                         captured.guards, captured.updates, state)


def warn_fallbacks(fallbacks: Counter, stacklevel: int) -> None:
    """The FallbackWarning listing a compiled graph's fallbacks (`stacklevel` as warnings.warn
    counts it from here: the caller of fuselm.compile's code)."""
    listed = ", ".join(f"{op} x{n}" for op, n in sorted(fallbacks.items()))
    warnings.warn(FallbackWarning(f"fuselm.compile: ops without a generated kernel run by torch or the IR "
                                  f"reference: {listed}"), stacklevel=stacklevel)


def generate(graph: Graph, options: CompileOptions, cache: KernelCache) -> tuple:
    """(steps, [(group, kernel)], fallbacks, program) of a graph the passes ran on: its
    weights prepared for the target (in place), partitioned, every kernel from the cache
    or generated, the kernel dump written, and the native program built where the target
    has them."""
    target = options.target
    graph.constants.update(target.prepare_weights(graph.constants))
    steps = partition(graph)
    groups = [step for step in steps if isinstance(step, KernelGroup)]
    fallbacks: Counter = Counter()
    generating = _first_of_each_uncached_kernel(groups, cache)
    launches = []
    with _progress(len(generating), f"fuselm: generating {target} kernels") as bar:
        for group in groups:
            launches.append((group, _kernel(group, cache, options.strict, fallbacks)))
            if id(group) in generating:
                bar.update()
    if options.dump_dir:
        write_kernel_dump(options.dump_dir, graph, launches)
    return steps, launches, fallbacks, _program(graph, steps, options, cache)


def _quantization(model: torch.nn.Module, flat: torch.nn.Module, signature: CallSignature, tensors: tuple,
                  options: CompileOptions) -> Optional[list]:
    """The quantization passes of options.quantize (None without one), calibrated on its
    samples (positional argument tuples, each called as the model is; a sample of other
    shapes runs on a graph captured for it through `flat`, the model's flat_forward
    shell) or on this call's tensors."""
    config = options.quantize
    if config is None:
        return None
    samples = None
    if config.needs_calibration:
        samples = [tensors]
        if config.calibration is not None:
            samples = [_call_tensors(model, signature, sample, i) for i, sample in enumerate(config.calibration)]

    def recapture(sample: tuple) -> Graph:
        graph = capture(flat, sample, None, strict=options.strict)
        return run_passes(graph, CLEANUP + FUSION)

    return quantization_passes(config, samples, recapture)


def _packed_weights(config: Optional[QuantizeConfig]):
    """The pass serving a loaded checkpoint's packed weights (quantize="gguf"), or None."""
    if config is None or config.scheme != PACKED:
        return None
    if not config.packed:
        raise FuselmError("quantize='gguf' serves the quantized tensors of a GGUF file as fuselm loaded them: "
                          "use fuselm.LLM(model=FILE.gguf, quantize='gguf'), or compile the model of "
                          "fuselm.models.load(FILE.gguf, packed=True) with quantize=QuantizeConfig('gguf', "
                          "packed=loaded.packed)")
    from .passes.packed_weights import use_packed_weights

    return ("packed_weights", functools.partial(use_packed_weights, packed=config.packed))


def _call_tensors(model: torch.nn.Module, signature: CallSignature, sample, index: int) -> tuple:
    args = sample if isinstance(sample, (tuple, list)) else (sample,)
    sample_signature, tensors = CallSignature.of(model, tuple(args), {})
    if sample_signature.guard_key() != signature.guard_key():
        raise FuselmError(f"quantize: calibration sample {index} is not a call like the one compiled "
                          "(its non-tensor arguments or structure differ)")
    return tensors


def _program(graph: Graph, steps: list, options: CompileOptions, cache: KernelCache):
    """The graph as one native program, from the program cache (built once per graph), on
    targets that have them, for graphs of PROGRAM_MIN_LAUNCHES kernel launches or more
    (FUSELM_PROGRAM=1: any graph; =0: none); None (the executor runs it kernel by kernel)
    otherwise, for complex values, or when it cannot be built (a warning says why; strict
    raises)."""
    target = options.target
    setting = os.environ.get("FUSELM_PROGRAM", "auto")
    launches = sum(isinstance(step, KernelGroup) for step in steps)
    if not target.programs or setting == "0" or (setting != "1" and launches < PROGRAM_MIN_LAUNCHES):
        return None
    if any(v.type.is_complex for v in [*graph.inputs, *graph.nodes]):
        return None  # programs are real-valued: the executor runs it (the complex ops are fallbacks anyway)
    try:
        program = program_cache(target, cache.root).kernel(graph)
    except Exception as error:  # the kernel-by-kernel path still runs the graph
        if options.strict:
            raise
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        warnings.warn(FallbackWarning(f"fuselm.compile: the graph runs kernel by kernel, not as one {target} "
                                      f"program: {reason}"), stacklevel=5)
        return None
    return program.bind(graph.constants, steps)


def _kernel(group: KernelGroup, cache: KernelCache, strict: bool, fallbacks: Counter) -> Kernel:
    """The group's generated kernel; without one (and not strict), the IR reference runs it."""
    if not _torch_only(group.graph):
        try:
            return cache.kernel(group.graph)
        except UnsupportedKernelError:
            if strict:
                raise
    elif strict:
        raise UnsupportedKernelError(f"no generated kernel runs {list(group.ops)} (fallback ops or complex values)")
    names = [n.attrs["overload"] if get_op(n.op).fallback else n.op for n in group.graph.nodes
             if not get_op(n.op).view]
    name = "+".join(dict.fromkeys(names)) or "copy"
    fallbacks[name] += 1
    return fallback_kernel(group, cache.target.name, f"{FALLBACK_PREFIX}{name}")


def _torch_only(group: Graph) -> bool:
    """Groups no backend generates: fallback ops, or complex values (kernels are real-valued)."""
    values = list(group.inputs) + list(group.nodes)
    return any(get_op(n.op).fallback for n in group.nodes) or any(v.type.is_complex for v in values)


def compile_lm(loaded, target: Union[str, Target], block_size: int, dtype: torch.dtype, cache_dir: Optional[str],
               donate_weights: bool = False, quantize: Union[None, str, QuantizeConfig] = None, pack: bool = False):
    """A loaded language model compiled for `target` in the LM contract (models/contract.py),
    with symbolic token and batch sizes: the engine's forward pass.
    `donate_weights`: the compiled layouts may reuse (and scramble) the module's weights.
    `quantize`: as for `compile`; calibration samples are texts or token lists (default:
    an English text, see quant/calibration.py), run as one prefill; an encoder's are
    texts (default: that text's first prose sentences), run as padded batches. `pack`: as for
    `compile` (an encoder's padded batch runs on its real tokens)."""
    from .models.contract import capture_example, pack_prompts
    from .quant.calibration import calibration_prompts, encoder_calibration

    target = get_target(target)
    example, dynamic = capture_example(loaded.config, block_size=block_size, dtype=dtype)
    model = loaded.model.to(target.device)
    example = tuple(t.to(target.device) for t in example)
    config = quantize_config(quantize)
    if config is not None and config.loads_packed:
        config = config.with_packed(loaded.packed)
    if config is not None and config.needs_calibration:
        if loaded.config.model_type == "bert":  # padded sentence batches, as the encoder is called
            samples = encoder_calibration(loaded.tokenizer, config.calibration, loaded.config.max_position_embeddings)
        else:
            prompts = calibration_prompts(loaded.tokenizer, config.calibration, loaded.config.vocab_size)
            samples = [pack_prompts(loaded.config, prompts, block_size=block_size, all_logits=True,
                                    dtype=dtype).as_tuple()]
        config = config.with_calibration([tuple(t.to(target.device) for t in sample) for sample in samples])
    return compile(model, example, target=target, dynamic=dynamic, cache_dir=cache_dir,
                   donate_weights=donate_weights, quantize=config, pack=pack)


def _first_of_each_uncached_kernel(groups: list, cache: KernelCache) -> set:
    """ids of the groups whose kernel will be generated: of each distinct kernel the cache
    holds neither in memory nor on disk, the first group that needs it (identical layers
    after it reuse that kernel, and torch-only groups generate nothing)."""
    seen, first = set(), set()
    for group in groups:
        if _torch_only(group.graph):
            continue
        key = cache.key(group.graph)
        if key not in seen and not cache.holds(key):  # a corrupt entry is rebuilt uncounted
            first.add(id(group))
        seen.add(key)
    return first


def _progress(kernels: int, description: str):
    """A bar over the kernels to generate, on an interactive terminal (the CLI's first
    compile); none when every kernel is cached or stderr is not a terminal. The ETA uses
    the average rate (smoothing=0): build times differ between kernels, and tqdm's moving
    average would swing it."""
    from tqdm import tqdm

    return tqdm(total=kernels, desc=description, unit="kernel", leave=False, smoothing=0,
                disable=None if kernels else True)
