"""BERT encoder in the usual padded `[B, S]` form, trace-friendly.

Parameter names match Hugging Face's `BertModel` (without the pooler), so its state
dicts load through `hf_to_fuselm_state_dict`. Attention is one
`F.scaled_dot_product_attention` per layer with a key mask from `attention_mask`; the
`pack_varlen` pass is what later removes the padding. Every token has token type 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fuselm.models.config import BertConfig

DROPPED_PREFIXES = ("pooler.", "cls.")  # the pooler and pretraining heads
DROPPED_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, x: Tensor) -> Tensor:
        """`[B, S, hidden]` -> `[B, heads, S, head_dim]`."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        q, k, v = (self.split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return out.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    """Dense projection, then LayerNorm over the residual sum (used twice per layer)."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x, key_mask)
        return x


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"fuselm's BERT supports hidden_act 'gelu', not {config.hidden_act!r}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """`last_hidden_state [B, S, hidden]`; rows of padding tokens are unspecified."""
        key_mask = attention_mask[:, None, None, :] != 0  # [B, 1, 1, S]: which keys to see
        return self.encoder(self.embeddings(input_ids), key_mask)


def sentence_embeddings(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens, then L2-normalized (sentence-transformers' all-MiniLM-L6-v2)."""
    mask = attention_mask[..., None].to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


def hf_to_fuselm_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face BERT state dict (optionally `bert.`-prefixed) for `BertModel`."""
    converted = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("bert.")
        if name.startswith(DROPPED_PREFIXES) or name in DROPPED_NAMES:
            continue
        converted[name] = tensor
    return converted
