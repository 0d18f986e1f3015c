"""`fuselm.compile`: capture, optimize, partition, generate kernels, run them.

    compiled = fuselm.compile(model, example_inputs, target="cpu", dynamic={...})
    compiled(*inputs)        # the model's outputs, computed by fuselm's kernels

Kernels come from the kernel cache (`FUSELM_CACHE`), so a second compile of the same
model generates nothing, and a new token count runs on the kernels already built.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .codegen.cache import KernelCache
from .codegen.dump import write_kernel_dump
from .codegen.memory import kernel_ready
from .errors import FuselmError
from .frontend import capture
from .ir.graph import Graph
from .passes import pipeline, run_passes
from .passes.partition import KernelGroup, partition
from .runtime.executor import Executor

TARGETS = ("cpu", "cuda")


@dataclass(frozen=True)
class KernelInfo:
    name: str
    ops: tuple  # the IR ops it fused
    source_path: Optional[str]
    launches: int  # how many groups of the graph run it (identical layers share kernels)


class CompiledModule:
    """Callable like the model; `.graph` is the final IR, `.kernels` what runs it."""

    def __init__(self, graph: Graph, steps: list, launches: list, target: str):
        self.graph = graph
        self.steps = steps
        self.target = target
        self._launches = launches
        kernels = {id(group): kernel for group, kernel in launches}
        self._executor = Executor(graph, steps, lambda group: kernels[id(group)].run)

    def __call__(self, *args):
        with torch.no_grad(), cores_owned_by_kernels(self.target):
            return self._executor(*args)

    @property
    def kernels(self) -> list:
        counts: dict = {}
        for _, kernel in self._launches:
            counts[kernel.name] = counts.get(kernel.name, 0) + 1
        seen, infos = set(), []
        for _, kernel in self._launches:
            if kernel.name not in seen:
                seen.add(kernel.name)
                infos.append(KernelInfo(kernel.name, kernel.ops, kernel.source_path, counts[kernel.name]))
        return infos


@contextlib.contextmanager
def cores_owned_by_kernels(target: str):
    """On cpu, TVM's pool owns the cores while the kernels run: torch's own work between
    them (views, the odd copy) runs on one thread, so its OpenMP workers do not wake and
    fight the pool (measured: 2x slower attention and norms when they do)."""
    if target != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if target == "cuda" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise FuselmError("target='cuda' needs a CUDA GPU (none is visible); use target='cpu', "
                          "or set TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter")


def _progress(items: list, description: str):
    """A progress bar on an interactive terminal (the CLI's first compile); silent otherwise."""
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="kernel", leave=False, disable=None)


def target_device(target: str) -> torch.device:
    """Where a target's tensors live: the GPU for cuda, or the cpu (also for cuda kernels
    run by Triton's interpreter when no GPU is visible)."""
    return torch.device("cuda" if target == "cuda" and torch.cuda.is_available() else "cpu")


def compile(model: torch.nn.Module, example_inputs, target: str = "cpu", dynamic: Optional[dict] = None,
            dump_dir: Optional[str] = None, cache_dir: Optional[str] = None,
            donate_weights: bool = False) -> CompiledModule:
    """Compile `model` for `target`; `dynamic` names symbolic dims as in `frontend.capture`.

    The graph goes through the generic pass pipeline, then the target's own passes (cpu:
    gemm weights prepacked into the layout its kernels read), then partition.
    `donate_weights=True` lets those layouts reuse the module's weight memory, so weights
    exist once even while compiling; the module must not run afterwards."""
    check_target(target)
    dump_dir = dump_dir or os.environ.get("FUSELM_DUMP") or None
    with torch.no_grad():
        graph = run_passes(capture(model.eval(), example_inputs, dynamic), pipeline(target, donate_weights),
                           dump_dir=dump_dir)
    if target == "cpu":  # TVM's kernels read weights with aligned vector loads: copy any that are not
        graph.constants.update({name: kernel_ready(t) for name, t in graph.constants.items()})
    steps = partition(graph)
    cache = KernelCache(target, cache_dir)
    groups = [step for step in steps if isinstance(step, KernelGroup)]
    launches = [(group, cache.kernel(group.graph)) for group in _progress(groups, f"fuselm: {target} kernels")]
    if dump_dir:
        write_kernel_dump(dump_dir, graph, launches)
    return CompiledModule(graph, steps, launches, target)
