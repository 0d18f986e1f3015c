"""`fuselm build MODEL -o DIR`: capture and compile a model once, write it as an artifact.

    build("smollm2-135m", "smollm2.fuselm", target="cpu")          # returns the compiled model

MODEL is anything `fuselm.models.load` takes (a named model, a Hugging Face directory, a
.gguf file), or an .onnx file (compiled as `fuselm.compile` compiles it; the artifact is
called as that result is: inputs by position or ONNX name, a tuple of outputs). It is compiled as `fuselm.api.compile_lm` compiles it: a causal LM in the
LM contract with symbolic token, sequence and block counts; an encoder (BERT) on
(input_ids, attention_mask) with symbolic batch and sequence lengths
(`models.contract.capture_example` gives both). The phases are: load, compile (capture,
passes, kernels, from the kernel cache), copy the kernels, write the weights, write the
graph, tokenizer and manifest; a progress bar shows them on a terminal.

Fallbacks (ATen ops the IR has no mapping for, groups no kernel takes) are kept: the
graph holds their `aten` nodes, the manifest lists them, and loading runs them through
the IR reference (torch), as the compiled model did.

A cuda artifact can be built on a machine without a GPU: building generates the Triton
sources and runs none of them. `mcpu="generic"` builds cpu kernels for any x86-64 with
AVX2 instead of this machine's CPU. `quantize=` (a scheme of quant/config.py) quantizes
the gemm weights as `fuselm.compile` does; the manifest records the scheme.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional, Union

from ..codegen.cache import KernelCache
from ..errors import ArtifactError, FuselmError
from ..models.sentence import SentenceConfig
from ..quant.config import loads_packed, quantize_config
from ..target import Target, get_target
from .format import is_onnx_file
from .machine import check_mcpu, code_settings, requirements
from .verify import running_versions
from .writer import (check_destination, describe, staged, write_artifact_manifest, write_code, write_constants,
                     write_graph, write_tokenizer)

PHASES = ("load", "capture+passes+kernels", "copy kernels", "write weights", "manifest")


def build(model: Union[str, Path], output: Union[str, Path], *, target: Union[str, Target] = "cpu",
          max_model_len: Optional[int] = None, mcpu: str = "native", quantize: str = "none",
          cache_dir: Optional[str] = None, progress: bool = True):
    """Build the artifact of `model` at `output` (replacing an artifact there; refusing
    anything else) and return the compiled model it holds (as `fuselm.compile` returns).
    `max_model_len`: the context length served by default (None: the model's, at most
    2048). Raises ArtifactError (or the loader's errors) with nothing written at `output`."""
    from ..api import compile as compile_any, compile_lm  # the compiler sits above the artifact format
    from ..models import load
    from ..runtime.engine import DEFAULT_BLOCK_SIZE, check_max_model_len

    target = get_target(target)
    output = Path(output).absolute()
    check_options(output, target, mcpu, quantize)  # refused before minutes of work, not after
    onnx = is_onnx_file(model)
    if onnx and quantize != "none":
        raise ArtifactError(f"{model}: --quantize applies to models fuselm loads, not to ONNX graphs")
    with _phases(progress) as phase, staged(output) as staging, code_settings(target, mcpu):
        phase("load")
        emitting = _without_running(target)
        if onnx:  # an ONNX graph as fuselm.compile takes it: imported, inputs and outputs by name
            phase("capture+passes+kernels")
            compiled = compile_any(str(Path(model).absolute()), target=emitting, cache_dir=cache_dir,
                                   donate_weights=True)
            graph, config, tokenizer, causal, max_model_len = compiled.compiled_graph, compiled.config, None, False, None
        else:
            loaded = load(model, dtype=target.default_dtype, packed=loads_packed(quantize))
            max_model_len = check_max_model_len(max_model_len, loaded.config)
            phase("capture+passes+kernels")
            causal = loaded.config.model_type != "bert"  # as models.contract.capture_example tells them apart
            compiled = compile_lm(loaded, emitting, DEFAULT_BLOCK_SIZE, target.default_dtype, cache_dir,
                                  donate_weights=True, quantize=quantize, pack=not causal)  # encoders: packed
            graph, config, tokenizer = compiled.entries[-1], loaded.config, loaded.tokenizer
        source = model if isinstance(model, str) and not Path(model).exists() else str(Path(model).absolute())
        description = describe(graph, source=source, config=config, machine=requirements(target, mcpu),
                               dtype=target.default_dtype, max_model_len=max_model_len,
                               block_size=DEFAULT_BLOCK_SIZE if causal else None)
        description["quantize"] = None if quantize == "none" else quantize_config(quantize).name
        if not causal and not onnx:  # how fuselm.Encoder pools, normalizes and truncates for this model
            description["sentence"] = (SentenceConfig.read(loaded.source) if loaded.source.is_dir()
                                       else SentenceConfig()).as_dict()
        phase("copy kernels")
        description.update(write_code(graph, KernelCache(emitting, cache_dir), staging))
        phase("write weights")
        write_constants(graph, staging)
        phase("manifest")
        write_graph(graph, staging)
        description["tokenizer"] = write_tokenizer(tokenizer, staging)
        write_artifact_manifest(staging, running_versions(target), description)
    return compiled


def check_options(output: Path, target: Union[str, Target], mcpu: str, quantize: str) -> bool:
    """ArtifactError for options `build` refuses; whether an artifact at `output` will be replaced."""
    try:
        quantize_config(quantize)
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"--quantize {quantize}: {error}") from None
    check_mcpu(get_target(target), mcpu)
    return check_destination(Path(output).absolute())


class _EmitOnly(Target):
    """A target whose kernels are generated here and run elsewhere (cuda on a machine
    without a GPU): nothing runs while building, so it is never refused as unavailable."""

    def check_available(self, spelling: str = "target={!r}") -> None:
        return None


def _without_running(target: Target) -> Target:
    """`target` if this machine can run it, else the same target only generated for."""
    try:
        target.check_available()
        return target
    except FuselmError:
        return _EmitOnly(**{field.name: getattr(target, field.name) for field in dataclasses.fields(target)})


@contextlib.contextmanager
def _phases(progress: bool):
    """`phase(name)` marks the start of each of PHASES; a bar over them on a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=len(PHASES), desc="fuselm build", unit="phase", leave=False, smoothing=0,
               disable=None if progress else True, bar_format="{desc} [{n}/{total} phases done, {elapsed}]")
    started = []

    def phase(name: str) -> None:
        if started:
            bar.update()
        started.append(name)
        bar.set_description_str(f"fuselm build: {name}")

    try:
        yield phase
        bar.update()
    finally:
        bar.close()
