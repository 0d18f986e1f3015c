"""Local Hugging Face model directory -> (config, state dict, tokenizer).

A directory holds `config.json` (read by `config_from_dict`: llama, gpt2 or bert), the
weights as `model.safetensors` or as shards listed in `model.safetensors.index.json`, and
usually `tokenizer.json` (read by `Tokenizer.from_file`; without it the tokenizer is None,
as for a randomly initialised model saved with `save_pretrained`). Weights are never read
from pickle files. A missing or corrupted file is an error that names the file; a tensor
with a wrong name or shape is found by `loading.build_model`, which names its file
through `file_of_tensor`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .config import config_from_dict
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


def load_hf_dir(directory) -> tuple[Any, dict[str, torch.Tensor], Optional[Tokenizer]]:
    """The config, the state dict (as stored) and the tokenizer of a Hugging Face directory."""
    directory = Path(directory)
    config = config_from_dict(read_json(directory / CONFIG_FILE))
    state_dict = read_safetensors_weights(directory)
    tokenizer = Tokenizer.from_file(directory) if (directory / TOKENIZER_FILE).is_file() else None
    return config, state_dict, tokenizer


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory: one file, or the shards its index lists."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"missing weights in {directory}: expected {WEIGHTS_FILE} "
                                f"or {WEIGHTS_INDEX_FILE}")
    return [single]


def file_of_tensor(directory: Path, name: str) -> Path:
    """The file of a directory that holds a tensor; for a tensor it lacks, where fuselm
    looked for it (`model.safetensors`, or the shard index)."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        shard = read_json(index).get("weight_map", {}).get(name)
        return directory / shard if shard else index
    return directory / WEIGHTS_FILE


def read_safetensors_weights(directory: Path) -> dict[str, torch.Tensor]:
    state_dict = {}
    for path in weight_files(directory):
        state_dict.update(read_safetensors_file(path))
    return state_dict


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{path}: not a valid safetensors file ({type(error).__name__}: {error})") from error
