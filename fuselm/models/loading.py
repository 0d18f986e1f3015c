"""`load(name_or_path)`: a ready-to-run fuselm model, its tokenizer and its config.

A name from `hub.NAMED_MODELS` is fetched first; anything else is a path: a Hugging
Face directory (config.json + safetensors) or a `.gguf` file. The model class follows
`config.model_type`; the checkpoint's Hugging Face-named state dict goes through that
model module's `hf_to_fuselm_state_dict` and loads strictly. The model comes back in
eval mode, in `dtype`, with gradients off.

`packed=True` keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 matrices as they are
(quant/packed.py): the model holds float stand-ins of no memory for them, and
`LoadedModel.packed` the parts, which quantize="gguf" compiles into its kernels.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..codegen.memory import kernel_ready
from ..quant.packed import PackedWeights
from . import hub
from .tokenizer import Tokenizer

# model_type -> (module, class) of fuselm's definition
MODEL_CLASSES = {
    "llama": ("fuselm.models.llama", "LlamaForCausalLM"),
    "gpt2": ("fuselm.models.gpt2", "GPT2LMHeadModel"),
    "bert": ("fuselm.models.bert", "BertModel"),
}


@dataclass(frozen=True)
class LoadedModel:
    model: Optional[torch.nn.Module]  # None when an engine serves an artifact's compiled forward
    tokenizer: Optional[Tokenizer]  # None for a Hugging Face directory without tokenizer.json
    config: Any               # LlamaConfig | GPT2Config | BertConfig
    source: Path
    packed: PackedWeights = field(default_factory=PackedWeights)  # with load(..., packed=True)


def load(name_or_path: Union[str, Path], dtype: torch.dtype = torch.float32, packed: bool = False) -> LoadedModel:
    """Load a named model (see `hub.NAMED_MODELS`), a Hugging Face directory or a .gguf file
    (`packed`: its quantized matrices kept as they are; a GGUF file only)."""
    source = resolve_source(name_or_path)
    config, state_dict, tokenizer, weights = read_checkpoint(source, packed, dtype)
    model = build_model(config, state_dict, dtype, source, weights)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=source, packed=weights)


def resolve_source(name_or_path: Union[str, Path]) -> Path:
    if isinstance(name_or_path, str) and name_or_path in hub.NAMED_MODELS:
        return hub.fetch(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ValueError(f"{name_or_path!r} is neither an existing path nor a named model; "
                         f"named models: {sorted(hub.NAMED_MODELS)}")
    return path


def read_checkpoint(source: Path, packed: bool = False, dtype: torch.dtype = torch.float32):
    """(config, Hugging Face-named state dict, tokenizer, packed weights) of a directory or
    a .gguf file."""
    if source.suffix.lower() == ".gguf" and source.is_file():
        from .gguf_loader import load_gguf

        return load_gguf(source, packed, dtype)
    if packed:
        raise ValueError(f"{source}: quantize='gguf' serves the quantized tensors of a .gguf file, and this is not "
                         "one; quantize it with a scheme instead (int8, int4-g32, ...)")
    if source.is_dir():
        from .hf_loader import load_hf_dir

        return (*load_hf_dir(source), PackedWeights())
    raise ValueError(f"{source}: expected a Hugging Face model directory or a .gguf file")


def model_class(model_type: str) -> type:
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"no fuselm model for model_type {model_type!r}; supported: {sorted(MODEL_CLASSES)}")
    module, name = MODEL_CLASSES[model_type]
    return getattr(importlib.import_module(module), name)


def build_model(config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
                source: Optional[Path] = None, packed: Optional[PackedWeights] = None) -> torch.nn.Module:
    """The model of `config` holding the checkpoint's tensors; `source` (the directory or
    file they came from) is what errors about a wrong tensor name. The stand-ins of
    `packed` weights are held as they are (no dtype, no copy)."""
    packed = packed or PackedWeights()
    cls = model_class(config.model_type)
    convert = importlib.import_module(cls.__module__).hf_to_fuselm_state_dict
    with torch.device("meta"):  # no memory for the random init the checkpoint overwrites
        model = cls(config)
    checkpoint = CheckpointTensors(source, state_dict, model, config.model_type)
    try:
        converted = convert(state_dict)
    except KeyError as error:  # a converter reads a tensor it cannot do without (the embedding)
        raise ValueError(checkpoint.missing(error.args[0], [])) from None
    checkpoint.check(converted)
    state_dict.clear()  # the checkpoint's tensors become the model's: held once
    weights, ready = {}, {}  # ready: a checkpoint tensor's storage -> its kernel-ready form (ties stay tied)
    for name in list(converted):
        tensor = converted.pop(name)  # popped, so each original is freed once converted
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in ready:
            ready[key] = tensor if packed.of(tensor) is not None else kernel_ready(tensor.to(dtype))
        weights[name] = ready[key]
    model.load_state_dict(weights, strict=True, assign=True)
    retie_shared_parameters(model)
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise ValueError(f"{name} is not in the checkpoint and has no value")
    return model.eval().requires_grad_(False)


class CheckpointTensors:
    """Compares a converted checkpoint with the tensors the model declares, before any is
    assigned, so a wrong name or shape is a ValueError naming the file, the tensor, and
    what was expected against what was found (load_state_dict would raise a RuntimeError
    naming no file, and a converter a bare KeyError)."""

    def __init__(self, source: Optional[Path], state_dict: dict, model: torch.nn.Module, model_type: str):
        self.source, self.model_type = source, model_type
        # the model is on meta: its state dict is names and shapes, no memory
        self.expected = {name: list(t.shape) for name, t in model.state_dict().items()}
        # converters rename; a tensor they pass through keeps its checkpoint name here
        self.checkpoint_names = {id(t): name for name, t in state_dict.items()}

    def check(self, converted: dict) -> None:
        for name, shape in self.expected.items():
            if name in converted and list(converted[name].shape) != shape:
                raise ValueError(self.wrong_shape(name, converted[name]))
        missing = [name for name in self.expected if name not in converted]
        unused = [self.checkpoint_name(name, t) for name, t in converted.items() if name not in self.expected]
        if missing:
            raise ValueError(self.missing(missing[0], unused, more=len(missing) - 1))
        if unused:
            raise ValueError(f"{self.file_of(unused[0])}: tensor {unused[0]!r} is not part of a "
                             f"{self.model_type} model{self.also(unused[1:], 'unused')}")

    def wrong_shape(self, name: str, tensor: torch.Tensor) -> str:
        checkpoint_name = self.checkpoint_name(name, tensor)
        return (f"{self.file_of(checkpoint_name)}: tensor {checkpoint_name!r} has shape {list(tensor.shape)}, "
                f"but the {self.model_type} model its config describes expects {self.expected[name]}")

    def missing(self, name: str, unused: list, more: int = 0) -> str:
        shape = f" of shape {self.expected[name]}" if name in self.expected else ""
        message = f"{self.file_of(name)}: no tensor {name!r}{shape}, which a {self.model_type} model needs"
        if more:
            message += f" (and {more} more missing)"
        if unused:
            message += f"; it has {unused[0]!r}, which such a model does not use{self.also(unused[1:], 'unused')}"
        return message

    def checkpoint_name(self, name: str, tensor: torch.Tensor) -> str:
        return self.checkpoint_names.get(id(tensor), name)

    def file_of(self, checkpoint_name: str) -> str:
        if self.source is None:
            return "checkpoint"
        if self.source.is_dir():
            from .hf_loader import file_of_tensor

            return str(file_of_tensor(self.source, checkpoint_name))
        return str(self.source)  # a .gguf file holds every tensor

    @staticmethod
    def also(names: list, what: str) -> str:
        return f" (and {len(names)} more {what})" if names else ""


def retie_shared_parameters(model: torch.nn.Module) -> None:
    """Assigning a state dict unties tied weights (lm_head and the embedding become two
    Parameters over one storage); make them one Parameter again, as the model built them."""
    seen: dict = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            key = (param.data_ptr(), tuple(param.shape), param.stride(), param.dtype)
            if key in seen and seen[key] is not param:
                setattr(module, name, seen[key])
            else:
                seen.setdefault(key, param)
