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

With `packed=True` (quantize="gguf"), Q4_0, Q4_1 and Q8_0 matrices are not dequantized:
each becomes a PackedWeight (quant/packed.py) whose parts are the file's blocks re-laid
out, bytes unchanged: a block of 32 weights is an f16 scale d (Q4_1 also an f16 minimum
m) and its codes, and the formats of ir/quant_ops.py take them as they are:

  Q8_0  "int8", group 32: q = the int8 codes, scale = d            w = q * d
  Q4_0  "int4", group 32: q = the 16 code bytes, scale = d, offset = -8 d   w = (q - 8) d
  Q4_1  "int4", group 32: q = the 16 code bytes, scale = d, offset = m      w = q d + m

(GGUF's 4-bit byte j of a block holds element j in its low nibble and j + 16 in its high
one: the int4 chunk layout.) The rotary row order is undone on every part alike.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..codegen.memory import kernel_ready
from ..quant.packed import PackedWeight, PackedWeights
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


def load_gguf(path, packed: bool = False, dtype: torch.dtype = torch.float32
              ) -> tuple[LlamaConfig, dict[str, torch.Tensor], Tokenizer, PackedWeights]:
    """The config, the Hugging Face-named fp32 state dict, the tokenizer of a GGUF file and
    its packed weights (empty unless `packed`: then the state dict holds their stand-ins,
    of `dtype`)."""
    reader = open_gguf(Path(path))
    config = read_config(reader)
    state_dict, weights = read_state_dict(reader, config, packed, dtype)
    return config, state_dict, Tokenizer.from_gguf(reader), weights


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


def read_state_dict(reader, config: LlamaConfig, packed: bool = False, dtype: torch.dtype = torch.float32
                    ) -> tuple[dict[str, torch.Tensor], PackedWeights]:
    state_dict, weights = {}, []
    for tensor in reader.tensors:
        if tensor.name in NOT_WEIGHTS:
            continue
        name = hf_name(tensor.name)
        weight = packed_weight(tensor, name, config, dtype) if packed else None
        if weight is not None:
            weights.append(weight)
            state_dict[name] = weight.standin
        else:
            state_dict[name] = undo_rotary_permutation(name, dequantize(tensor), config)
    return state_dict, PackedWeights(weights)


# GGUF type name -> (format, bytes of the block before its codes: the f16 scale [and minimum])
PACKED_TYPES = {"Q8_0": ("int8", 2), "Q4_0": ("int4", 2), "Q4_1": ("int4", 4)}
BLOCK = 32  # weights per block in all three


def packed_weight(tensor, name: str, config: LlamaConfig, dtype: torch.dtype = torch.float32):
    """The PackedWeight of a Q8_0 / Q4_0 / Q4_1 matrix (see the module docstring), or None
    for any other tensor (those load as fp32)."""
    import numpy as np

    kind = tensor.tensor_type.name
    if kind not in PACKED_TYPES or len(tensor.shape) != 2:
        return None
    fmt, header = PACKED_TYPES[kind]
    k, n = (int(d) for d in tensor.shape)
    blocks = np.asarray(tensor.data).reshape(n, k // BLOCK, -1)

    def part(values, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values).view(dtype).reshape(n, -1))

    scale = part(blocks[:, :, 0:2], np.float16)
    parts = {"q": part(blocks[:, :, header:], np.int8 if fmt == "int8" else np.uint8), "scale": scale}
    if kind == "Q4_0":
        parts["offset"] = scale * -8  # (q - 8) d: exact in f16 (a power of two)
    elif kind == "Q4_1":
        parts["offset"] = part(blocks[:, :, 2:4], np.float16)
    parts = {key: kernel_ready(undo_rotary_permutation(name, t, config)) for key, t in parts.items()}
    return PackedWeight(fmt, BLOCK, parts, (n, k), dtype)


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
