"""Targets: one object per place fuselm runs, asked by every layer instead of a name.

A `Target` owns what differs between cpu and cuda (TVM's `Target` and Inductor's device
interface are the models): the device tensors live on, the codegen backend and the
compiler whose version keys the kernel cache, the passes the target's kernels want of
the graph, how weights are prepared for the kernels, the thread policy while kernels run,
whether decode steps can replay CUDA graphs, and whether Triton may be imported at all.

    target = get_target("cpu")          # or "cuda", or a Target; "auto" picks the best
    target.device, target.passes(), target.running()

Nothing else in fuselm branches on a target's name: add a target by adding a Target.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import FuselmError
from .threads import one_torch_thread


@dataclass(frozen=True)
class Target:
    name: str  # what users pass: target="cpu"
    backend: str  # the codegen package that emits its kernels
    compiler: str  # the distribution whose version keys the kernel cache
    default_dtype: torch.dtype  # what an LLM on this target computes in by default
    aligned_weights: bool  # kernels read weights with aligned vector loads: align them at compile
    owns_cores: bool  # the kernels' thread pool owns the cores: torch runs on one thread meanwhile
    cuda_graphs: bool  # decode steps can replay CUDA graphs
    hides_triton: bool  # never import Triton in this process (it costs memory and start-up)
    programs: bool = False  # a graph runs as one native program (the backend's PROGRAMS), not kernel by kernel

    def __str__(self) -> str:
        return self.name

    @property
    def device(self) -> torch.device:
        """Where tensors live: the GPU for cuda, or the cpu (also for cuda kernels run by
        Triton's interpreter when no GPU is visible)."""
        return torch.device("cuda" if self.name == "cuda" and torch.cuda.is_available() else "cpu")

    def check_available(self, spelling: str = "target={!r}") -> None:
        """Raise a FuselmError naming the problem if this machine cannot run the target.
        `spelling` writes a target name as the caller's user types it: the Python API's
        `target='cpu'` by default, `--target {}` on the command line."""
        if self.name == "cuda" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise FuselmError(f"{spelling.format('cuda')} needs a CUDA GPU (none is visible); use "
                              f"{spelling.format('cpu')}, or set TRITON_INTERPRET=1 to run the Triton kernels "
                              "in Triton's interpreter")

    def passes(self, donate_weights: bool = False, quantize: Optional[list] = None, packed_weights=None,
               pack: bool = False) -> list:
        """The pass pipeline for this target: the generic passes (with the quantization,
        packed-weight and packing passes, if any), then its own."""
        from .passes import pipeline

        return pipeline(self.name, donate_weights, quantize, packed_weights, pack)

    def prepare_weights(self, constants: dict) -> dict:
        """The graph's constants as this target's kernels read them."""
        if not self.aligned_weights:
            return constants
        from .codegen.memory import kernel_ready

        return {name: kernel_ready(t) for name, t in constants.items()}

    @contextlib.contextmanager
    def running(self):
        """While kernels run. On cpu, TVM's pool owns the cores: torch's own work between
        them (views, the odd copy) runs on one thread, so its OpenMP workers do not wake
        and fight the pool (measured: 2x slower attention and norms when they do)."""
        if not self.owns_cores:
            yield
            return
        with one_torch_thread():
            yield

    def importing(self):
        """While capturing or loading for this target: Triton stays out of a cpu process."""
        if not self.hides_triton:
            return contextlib.nullcontext()
        from .frontend.without_triton import without_triton

        return without_triton()


CPU = Target("cpu", backend="fuselm.codegen.tvm", compiler="apache-tvm", default_dtype=torch.float32,
             aligned_weights=True, owns_cores=True, cuda_graphs=False, hides_triton=True, programs=True)
CUDA = Target("cuda", backend="fuselm.codegen.triton", compiler="triton", default_dtype=torch.bfloat16,
              aligned_weights=False, owns_cores=False, cuda_graphs=True, hides_triton=False)
TARGETS = {t.name: t for t in (CPU, CUDA)}


def get_target(target: Union[str, Target]) -> Target:
    """The Target for a name ("cpu", "cuda", or "auto": cuda when a GPU is visible)."""
    if isinstance(target, Target):
        return target
    if target == "auto":
        return CUDA if torch.cuda.is_available() else CPU
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {['auto', *TARGETS]}")
    return TARGETS[target]
