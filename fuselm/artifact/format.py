"""The layout of an artifact directory (format 1) and the JSON forms of what it records.

    DIR/
      manifest.json            fuselm.integrity manifest: sha256 of every file below, the
                               versions that built them, and the keys listed in MANIFEST_KEYS
      graph.ir                 the compiled graph after all passes (fuselm.ir.text)
      weights.safetensors      its constants, in the kernels' layouts, 64-byte aligned
      kernels/<key>/           one kernel cache entry per distinct kernel (cpu: <name>.so and
                               its .tir/.ll/.s sources; cuda: the Triton module <name>.py),
                               with its group.ir and kernel.json, named by its cache key
      program/                 cpu: the whole graph as one Relax VM program (program.so from
                               export_library, program.json, its Relax script), the program
                               cache's entry; what a forward runs (the kernels/ serve `inspect`
                               and the Python executor)
      tokenizer/               tokenizer.json, tokenizer_config.json (special tokens, chat
                               template), generation_config.json; absent without a tokenizer

Nothing in it is pickled: the model's call signature and the structure of its result
(torch pytree TreeSpecs) are JSON (codec.py), and so is everything else. This module
imports nothing heavy: the command line asks `is_artifact` before torch is imported.
"""
from __future__ import annotations

import os
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
GRAPH = "graph.ir"
WEIGHTS = "weights.safetensors"
KERNELS = "kernels"
TOKENIZER = "tokenizer"
PROGRAM = "program"
# What a manifest holds besides integrity.py's own "format", "versions" and "files":
MANIFEST_KEYS = (
    "artifact_format",  # FORMAT
    "model",            # {"source": what `fuselm build` was given, "model_type", "config": {...}}
    "target",           # "cpu" | "cuda"
    "machine",          # cpu: {"mcpu", "llvm_cpu", "cpu_features"}; cuda: {"gpu_arch"}
    "dtype",            # the weights' torch dtype, e.g. "float32"
    "max_model_len",    # the context length served by default
    "block_size",       # tokens per KV-cache block (a static dim of the LM graph)
    "signature",        # the forward's parameters, argument tree and graph inputs
    "output",           # the result's tree
    "kernels",          # [{"key", "name", "ops", "launches", "source"}]
    "program",          # "program" when the graph runs as one native program (cpu), else null
    "tokenizer",        # true when tokenizer/ is there
)


def is_artifact(path) -> bool:
    """Whether `path` is an artifact directory (it has a manifest.json)."""
    return (Path(path) / MANIFEST).is_file()


def is_onnx_file(path) -> bool:
    """Whether `path` names an ONNX model file (by its suffix): what `fuselm build` and
    `fuselm ir` import as ONNX rather than load as a checkpoint."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() == ".onnx"


def rebuild_command(manifest: dict, directory) -> str:
    """The command that builds this artifact again, for error messages."""
    model, machine = manifest.get("model"), manifest.get("machine")
    command = f"fuselm build {model.get('source', 'MODEL') if isinstance(model, dict) else 'MODEL'} -o {directory}"
    if isinstance(manifest.get("target"), str):
        command += f" --target {manifest['target']}"
    if isinstance(machine, dict) and machine.get("mcpu", "native") != "native":
        command += f" --mcpu {machine['mcpu']}"
    if isinstance(manifest.get("quantize"), str):
        command += f" --quantize {manifest['quantize']}"
    return command
