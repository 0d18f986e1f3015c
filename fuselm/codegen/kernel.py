"""What codegen produces: a Kernel per fused group, and the key that identifies it.

A *group* is a small IR graph: its inputs are the kernel's parameters (weights included:
constants are abstracted into typed parameters, so the 30 identical layers of a model
share one kernel), its nodes are the fused ops, and it has one output. An emitter turns
a group into a `Kernel` whose `run(*tensors)` computes what `ir.interpret(group, ...)`
computes, for any value of the group's symbolic dimensions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..ir.graph import Graph


@dataclass(frozen=True)
class Kernel:
    name: str  # says what it computes, e.g. "gemm_k576_n1536_gated_silu"
    target: str  # "cpu" or "cuda"
    source: str  # readable source: Triton Python for cuda, TVMScript for cpu
    source_ext: str  # "py" or "tir"
    run: Callable  # run(*tensors) -> output tensor
    ops: tuple = ()  # the IR ops it fused, for dumps and `inspect`
    extra_sources: dict = field(default_factory=dict)  # e.g. {"ll": LLVM IR, "s": assembly}
    source_path: Optional[str] = None  # where the source was written, when it was


def group_key(group: Graph, target: str, versions: tuple = ()) -> str:
    """Identity of a kernel: the group's text (it has no constants), target, versions."""
    if group.constants:
        raise ValueError("a kernel group takes its weights as inputs; it holds no constants")
    text = f"{target}\n{versions}\n{group}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
