"""The `cuda` target: Triton kernels generated from fused groups.

`emit(group, kernel_dir)` picks the emitter for the group's op, generates a readable
Triton module (kernel, host wrapper `launch`, entry point `run`), writes it to
`kernel_dir/<name>.py`, imports it and returns a `Kernel` whose `run(*tensors)`
computes what `ir.interpret(group, *tensors)` computes; `load(group, kernel_dir)`
imports what emit wrote there again (the kernel cache's second compile). Sizes are
launch arguments, so one kernel serves every value of the group's symbolic dimensions.

Emitters, one file per kind of group:
  gemm.py             gemm with its epilogue (bias, activations, gated_silu, residual)
  qgemm.py            qgemm: gemm over an int8 / int4 / nf4 weight dequantized in registers, or
                      W8A8 int8 dots (LLM.int8's outlier features in float); gemm's epilogue
  matmul.py           matmul: batched, broadcast batch dims, operands read through their strides
  norm.py             rms_norm / layer_norm, optionally with the residual add
  attention.py        attention(q, k, v[, mask]) {causal, scale, gqa}, flash style
  paged_attention.py  paged_attention: causal varlen attention over a paged KV cache
  paged_decode.py     its split-KV (FlashDecoding) kernels, which its host wrapper picks for decode
  kv_cache_write.py   kv_cache_write: scatter new keys/values into the cache in place
  varlen_attention.py varlen_attention: flash attention over packed sequences (no padding)
  elementwise.py      pointwise ops with broadcasting, views, concat, gathers (pack / unpack among
                      them), tril/triu, arange, rope
  reduction.py        groups with reductions (sum, mean, amax, amin, argmax, argmin, var),
                      softmax / log_softmax or cumsum: a kernel per such node (its pointwise
                      prologue inlined) writing an intermediate, then a pointwise kernel

This package is the only part of fuselm that imports triton.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph
from ..kernel import Kernel
from . import (attention, elementwise, gemm, kv_cache_write, matmul, norm, paged_attention, qgemm, reduction,
               varlen_attention)
from .host import plan_group, run_source
from .module import IMPORTS, GeneratedKernel, load_module

EMITTERS = {op: emitter for emitter in (gemm, qgemm, matmul, norm, attention, paged_attention, kv_cache_write,
                                        varlen_attention) for op in emitter.OPS}


def emit(group: Graph, kernel_dir: Path) -> Kernel:
    """Generate, write and import the Triton kernel of `group`; returns its Kernel."""
    if group.constants:
        raise ValueError("a kernel group takes its weights as inputs; it holds no constants")
    if len(group.outputs) != 1:
        raise UnsupportedKernelError(f"a kernel group has one output, this one has {len(group.outputs)}")
    plan = plan_group(group, tuple(EMITTERS))
    generated = _generate(plan)
    run = run_source(group, plan, generated.params)
    name = re.sub(r"\W", "_", generated.name)  # symbolic sizes may bring '*' or '+'
    if not plan.is_plain(group):  # the same op behind other views is another kernel file
        name += "_views" + hashlib.sha256(run.encode()).hexdigest()[:6]
    source = module_source(name, generated, run)
    module, path = load_module(name, source, kernel_dir)
    ops = tuple(node.op for node in group.nodes)
    return Kernel(name, "cuda", source, "py", module.run, ops=ops, source_path=str(path))


def load(group: Graph, kernel_dir: Path) -> Kernel:
    """The kernel `emit(group, kernel_dir)` wrote there, imported again without generating."""
    files = sorted(Path(kernel_dir).glob("*.py"))
    if len(files) != 1:
        raise FileNotFoundError(f"{kernel_dir} should hold one kernel module, it holds {[f.name for f in files]}")
    source = files[0].read_text()
    module, path = load_module(files[0].stem, source, kernel_dir)
    return Kernel(files[0].stem, "cuda", source, "py", module.run, ops=tuple(n.op for n in group.nodes), source_path=str(path))


def _generate(plan) -> GeneratedKernel:
    if len(plan.compute) == 1 and plan.compute[0].op in EMITTERS:
        return EMITTERS[plan.compute[0].op].generate(plan.compute[0])
    if all(node.op in elementwise.OPS for node in plan.compute):
        return elementwise.generate(plan.compute, plan.compute_inputs)
    if all(node.op in elementwise.OPS or node.op in reduction.OPS for node in plan.compute):
        return reduction.generate(plan.compute, plan.compute_inputs)
    ops = ", ".join(node.op for node in plan.compute)
    raise UnsupportedKernelError(f"no Triton emitter for a group of [{ops}]")


def module_source(name: str, generated: GeneratedKernel, run: str) -> str:
    body = generated.body.replace(generated.name, name) if name != generated.name else generated.body
    doc = (f'"""{name}: {generated.summary}.\n\n'
           "Generated by fuselm.codegen.triton. run(*inputs) -> output is the entry point;\n"
           'launch() is the host wrapper that checks, allocates and launches the kernel.\n"""\n')
    return "\n".join([doc + IMPORTS, "", body.rstrip("\n"), "", "", run])
