"""`fuselm inspect DIR --profile`: time every kernel launch of one forward pass, at sizes
the user picks, against this machine's measured ceilings.

The graph runs once through the runtime's own Executor, every kernel wrapped: a launch
runs once for its result (the next kernels read it, so each gets realistic inputs),
then again in timed rounds on the same tensors. Launches of one kernel (identical
layers) are summed into its row. Views between kernels cost nothing and are not shown.

From a dump the kernels are reloaded, not guessed: the last IR is parsed (random
weights of the right types stand in for the missing constants), partitioned again (the
same deterministic `partition` the compile ran, so the same groups), and each group's
kernel comes from the kernel cache as at compile time: loaded when the cache holds it,
generated again otherwise. Its name is checked against index.json. For a model compiled
in this process, `profile(compiled, ...)` runs the very kernels the module runs.

Ceilings, measured once per run: memory bandwidth by a large copy, compute by a large
matmul (numpy on the cpu, torch on a GPU), so percentages compare against what this
machine reaches with its own libraries, not a datasheet.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..passes.partition import KernelGroup, partition
from ..runtime.executor import Executor
from .cost import launch_cost
from .workload import check_embedding_indices, filler, graph_inputs, symbol_sizes

TIMED_ROUNDS = 3  # the best round counts: the others absorb a noisy neighbour
SECONDS_PER_LAUNCH = 0.03  # measuring budget of one launch, all rounds together
MAX_CALLS_PER_ROUND = 10_000
COPY_BYTES = 128 << 20  # far past any cache: the copy streams from memory
MATMUL_SIZE = 1024  # 2 GFLOP: BLAS near its peak, a fraction of a second


@dataclass
class ProfileRow:
    kernel: str
    launches: int = 0
    seconds: float = 0.0  # per forward pass, all launches together
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def gbytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved: left of the ridge point a kernel is bound by memory."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass(frozen=True)
class Ceilings:
    gbytes_per_second: float
    gflops: float
    how: str

    @property
    def ridge(self) -> float:
        return self.gflops / self.gbytes_per_second


@dataclass
class Profile:
    rows: list  # ProfileRow, slowest first
    ceilings: Ceilings
    sizes: dict  # {symbol name: size} the graph ran at


# ----------------------------------------------------------------------------- entry points
def profile(compiled, tokens: int = 1, batch: int = 1, context: int | None = None, dims: dict | None = None,
            ceilings: Ceilings | None = None) -> Profile:
    """Profile the kernels of a `fuselm.compile`d module (its latest graph) in-process."""
    entry = compiled._latest()  # the graph, steps and kernels `compiled(...)` runs now
    kernels = {id(group): kernel for group, kernel in entry._launches}
    return profile_steps(entry.graph, entry.steps, lambda group: kernels[id(group)], compiled.target,
                         tokens, batch, context, dims, ceilings)


def profile_source(source, tokens: int = 1, batch: int = 1, context: int | None = None, dims: dict | None = None,
                   target: str | None = None, cache_dir: str | None = None,
                   ceilings: Ceilings | None = None) -> Profile:
    """Profile the kernels of an InspectSource (an artifact or a dump directory): see the module docstring."""
    from ..target import get_target

    target = get_target(target or source.target_name())
    target.check_available("--target {}")
    graph = source.graph(lambda name, type: filler(name, type, target.device))
    symbol_sizes(graph.inputs, tokens, batch, context, dims)  # refuse bad sizes before loading any kernel
    graph.constants.update(target.prepare_weights(graph.constants))
    steps = partition(graph)
    groups = [s for s in steps if isinstance(s, KernelGroup)]
    own = getattr(source, "load_kernels", None)  # an artifact runs its own kernels
    kernels = own(groups, target) if own is not None else _load_kernels(groups, target, cache_dir)
    _check_same_kernels(source, steps, kernels)
    return profile_steps(graph, steps, lambda group: kernels[id(group)], target, tokens, batch, context, dims,
                         ceilings)


def _load_kernels(groups: list, target, cache_dir) -> dict:
    """{id(group): Kernel} as the compile got them: from the kernel cache, generated when
    it lacks them, and torch fallbacks where no kernel takes a group."""
    from ..api import _first_of_each_uncached_kernel, _kernel
    from ..codegen.cache import KernelCache

    cache = KernelCache(target, cache_dir)
    missing = len(_first_of_each_uncached_kernel(groups, cache))
    if missing:
        print(f"fuselm inspect: {missing} kernels are not in the kernel cache {cache.root}: generating them "
              "(--cache-dir names the cache the model was compiled with)", file=sys.stderr)
    with target.importing():
        return {id(group): _kernel(group, cache, False, Counter()) for group in groups}


def _check_same_kernels(source, steps: list, kernels: dict) -> None:
    """The reloaded kernels are the dump's: same names, same launch counts."""
    rebuilt = Counter(kernels[id(s)].name for s in steps if isinstance(s, KernelGroup))
    dumped = Counter({entry.name: len(entry.launches) for entry in source.kernels()})
    if rebuilt != dumped:
        differ = sorted(set(rebuilt.items()) ^ set(dumped.items()))
        print(f"fuselm inspect: warning: the kernels reloaded for {source.directory} differ from its index.json "
              f"(fuselm changed since the dump?): {differ[:4]}", file=sys.stderr)


def profile_steps(graph, steps: list, kernel_of: Callable, target, tokens: int, batch: int, context, dims,
                  ceilings: Ceilings | None = None) -> Profile:
    """Run `graph`'s steps once at the chosen sizes, timing each kernel launch."""
    sizes = symbol_sizes(graph.inputs, tokens, batch, context, dims)
    inputs = graph_inputs(graph.inputs, sizes, tokens, batch, context, target.device)
    check_embedding_indices(graph, inputs)
    synchronize = _synchronizer(target.device)
    rows: dict = {}

    def timed(group: KernelGroup):
        kernel = kernel_of(group)

        def run(*args):
            result = kernel.run(*args)
            row = rows.setdefault(kernel.name, ProfileRow(kernel.name))
            row.launches += 1
            row.seconds += seconds_per_call(lambda: kernel.run(*args), synchronize)
            cost = launch_cost(group.graph, args)
            row.flops += cost.flops
            row.bytes += cost.bytes
            return result

        return run

    with torch.no_grad(), target.running():
        Executor(graph, steps, timed)(*inputs)
    ceilings = ceilings or measure_ceilings(target.device, _compute_dtype(graph))
    ordered = sorted(rows.values(), key=lambda row: -row.seconds)
    return Profile(ordered, ceilings, {str(s): n for s, n in sizes.items()})


# ----------------------------------------------------------------------------- timing
def seconds_per_call(call: Callable, synchronize: Callable = lambda: None) -> float:
    """The best of a few rounds of back-to-back calls, sized to the time budget."""
    synchronize()
    started = time.perf_counter()
    call()
    synchronize()
    once = max(time.perf_counter() - started, 1e-7)
    calls = int(min(MAX_CALLS_PER_ROUND, max(1, SECONDS_PER_LAUNCH / TIMED_ROUNDS / once)))
    best = float("inf")
    for _ in range(TIMED_ROUNDS):
        synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def _synchronizer(device: torch.device) -> Callable:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _compute_dtype(graph) -> torch.dtype:
    """The dtype most weights have: what the gemms compute in."""
    counts = Counter(t.dtype for t in graph.constants.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.float32) -> Ceilings:
    """Memory bandwidth (a copy: bytes read + written) and matmul GFLOP/s, best of a few."""
    if device.type == "cuda":
        return _measure_torch(device, dtype)
    source = np.ones(COPY_BYTES // 4, dtype=np.float32)
    target = np.empty_like(source)
    copy = seconds_per_call(lambda: np.copyto(target, source))
    a = np.random.default_rng(0).random((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    matmul = seconds_per_call(lambda: a @ a)
    return Ceilings(2 * source.nbytes / copy / 1e9, 2 * MATMUL_SIZE**3 / matmul / 1e9,
                    f"numpy copy of {COPY_BYTES >> 20} MiB, numpy f32 matmul {MATMUL_SIZE}^2")


def _measure_torch(device: torch.device, dtype: torch.dtype) -> Ceilings:
    source = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy = seconds_per_call(lambda: target.copy_(source), torch.cuda.synchronize)
    size = MATMUL_SIZE * 4
    a = torch.randn(size, size, device=device, dtype=dtype)
    matmul = seconds_per_call(lambda: a @ a, torch.cuda.synchronize)
    name = str(dtype).removeprefix("torch.")
    return Ceilings(2 * source.numel() * 4 / copy / 1e9, 2 * size**3 / matmul / 1e9,
                    f"torch copy of {COPY_BYTES >> 20} MiB, torch {name} matmul {size}^2 on {device}")


# ----------------------------------------------------------------------------- report
def format_profile(result: Profile) -> str:
    from .table import format_columns

    ceilings = result.ceilings
    total = sum(row.seconds for row in result.rows) or 1.0
    lines = [f"sizes: {', '.join(f'{k}={v}' for k, v in sorted(result.sizes.items())) or 'static'}",
             f"ceilings: {ceilings.gbytes_per_second:.1f} GB/s memory, {ceilings.gflops:.1f} GFLOP/s compute "
             f"({ceilings.how})"]
    table = [("kernel", "launches", "us/forward", "share", "us/launch", "GB/s", "%bw", "GFLOP/s", "%peak")]
    for row in result.rows:
        table.append((row.kernel, str(row.launches), _figure(row.seconds * 1e6), f"{100 * row.seconds / total:.1f}%",
                      _figure(row.seconds * 1e6 / row.launches), _figure(row.gbytes_per_second),
                      f"{100 * row.gbytes_per_second / ceilings.gbytes_per_second:.1f}", _figure(row.gflops),
                      f"{100 * row.gflops / ceilings.gflops:.1f}"))
    launches = sum(row.launches for row in result.rows)
    footer = f"{len(result.rows)} kernels, {launches} launches: {total * 1e6:.1f} us per forward in kernels"
    return "\n".join(lines) + "\n" + format_columns(table, right=range(1, len(table[0]))) + footer + "\n"


def _figure(value: float) -> str:
    """Three significant digits, never in exponent form: 1234, 12.3, 0.0123."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value >= 1e-3 or value == 0 else f"{value:.1e}"
