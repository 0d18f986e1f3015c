"""Typed model configurations with Hugging Face field names.

`config_from_dict` builds the right dataclass from a Hugging Face `config.json`
dictionary (keyed by `model_type`); unknown keys are ignored, so any real config loads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union


@dataclass(frozen=True)
class LlamaConfig:
    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list]] = 2

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class GPT2Config:
    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[Union[int, list]] = 50256

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def kv_heads(self) -> int:
        return self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions


@dataclass(frozen=True)
class BertConfig:
    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


CONFIG_CLASSES = {cls.model_type: cls for cls in (LlamaConfig, GPT2Config, BertConfig)}


def config_from_dict(raw: dict[str, Any]):
    """The typed config for a Hugging Face config.json dictionary."""
    if not isinstance(raw, dict):
        raise ValueError(f"config.json must hold a JSON object, got a {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; fuselm supports {sorted(CONFIG_CLASSES)}"
        )
    cls = CONFIG_CLASSES[model_type]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})
