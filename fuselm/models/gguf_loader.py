"""GGUF file -> (LlamaConfig, Hugging Face-named fp32 state dict, Tokenizer).

Read with the `gguf` package: the config comes from the `llama.*` metadata, each tensor
is dequantized to fp32 by `gguf.quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0/1,
k-quants, ...) and renamed to its Hugging Face name. GGUF lists dimensions innermost
first, so a torch shape is the GGUF shape reversed.

llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each head
(its rotary layout interleaves the two halves of a head); this loader undoes it exactly
as transformers does (`_reverse_permute_weights`), so the state dict matches the original
Hugging Face checkpoint. The tied output layer is left out, as in a Hugging Face
checkpoint of a model with `tie_word_embeddings`.

Only the `llama` architecture is supported.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .config import LlamaConfig
from .tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face name ("{n}" is the layer number)
GGUF_TO_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{n}.attn_q.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "blk.{n}.attn_k.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "blk.{n}.attn_v.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "blk.{n}.attn_output.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "blk.{n}.ffn_gate.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.up_proj.weight",
    "blk.{n}.ffn_down.weight": "model.layers.{n}.mlp.down_proj.weight",
    "blk.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
}
LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
NOT_WEIGHTS = ("rope_freqs.weight",)  # llama.cpp's precomputed rope scaling factors


def load_gguf(path) -> tuple[LlamaConfig, dict[str, torch.Tensor], Tokenizer]:
    """The config, the Hugging Face-named fp32 state dict and the tokenizer of a GGUF file."""
    reader = open_gguf(Path(path))
    config = read_config(reader)
    return config, read_state_dict(reader, config), Tokenizer.from_gguf(reader)


def open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:
        raise ValueError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error


def metadata(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> LlamaConfig:
    architecture = metadata(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {architecture!r} is not supported: fuselm loads "
                         f"{list(SUPPORTED_ARCHITECTURES)} from GGUF (GPT-2 and BERT from a "
                         "Hugging Face directory)")
    check_no_rope_scaling(reader, architecture)

    def arch(key: str, default: Any = None) -> Any:
        return metadata(reader, f"{architecture}.{key}", default)

    tokens = metadata(reader, "tokenizer.ggml.tokens")
    tensor_names = {tensor.name for tensor in reader.tensors}
    num_heads = arch("attention.head_count")
    return LlamaConfig(
        vocab_size=len(tokens) if tokens is not None else arch("vocab_size"),
        hidden_size=arch("embedding_length"),
        intermediate_size=arch("feed_forward_length"),
        num_hidden_layers=arch("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=arch("attention.head_count_kv", num_heads),
        head_dim=arch("attention.key_length"),
        max_position_embeddings=arch("context_length", 2048),
        rms_norm_eps=arch("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=arch("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
    )


def check_no_rope_scaling(reader, architecture: str) -> None:
    scaling = metadata(reader, f"{architecture}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by fuselm's Llama")


def read_state_dict(reader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    state_dict = {}
    for tensor in reader.tensors:
        if tensor.name in NOT_WEIGHTS:
            continue
        name = hf_name(tensor.name)
        state_dict[name] = undo_rotary_permutation(name, dequantize(tensor), config)
    return state_dict


def hf_name(gguf_name: str) -> str:
    layer = LAYER_NAME.match(gguf_name)
    pattern = f"blk.{{n}}.{layer.group(2)}" if layer else gguf_name
    if pattern not in GGUF_TO_HF_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return GGUF_TO_HF_NAMES[pattern].format(n=layer.group(1) if layer else "")


def dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as an fp32 torch tensor in torch's dimension order."""
    import gguf
    import numpy as np

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(f"GGUF tensor {tensor.name!r}: {error}") from error
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # F32 tensors come back as views of the read-only file mapping: copy those
    values = np.require(values, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(values.reshape(shape))


def undo_rotary_permutation(name: str, weight: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """Restore Hugging Face's row order in q_proj/k_proj (see the module docstring)."""
    if name.endswith("self_attn.q_proj.weight"):
        return unpermute_rows(weight, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return unpermute_rows(weight, config.kv_heads)
    return weight


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp reordered each head's rows from (2 halves, d/2) to (d/2, 2), interleaving
    # the halves; view them as (d/2, 2) and swap back.
    half_head = weight.shape[0] // num_heads // 2
    rows = weight.reshape(num_heads, half_head, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape).contiguous()
