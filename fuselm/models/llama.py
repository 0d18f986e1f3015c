"""Llama as a trace-friendly decoder in fuselm's flattened-token LM contract.

Parameter names match Hugging Face's `LlamaForCausalLM`, so its state dicts load
(through `hf_to_fuselm_state_dict`). Attention goes through the paged-KV custom ops of
`fuselm.models.attention`; everything else is one whole op each (embedding, linear,
`F.rms_norm`, `F.silu`), so a decomposition table that keeps those keeps them whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fuselm.models.attention import PagedKV, attend_paged
from fuselm.models.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """HF Llama's default RoPE: cos/sin per token position, in fp32."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        dim = config.dim_per_head
        # on cpu explicitly: loaders build the model on the meta device, then assign weights
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        self.register_buffer("inv_freq", 1.0 / config.rope_theta**exponents, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the frequencies, and angles at long positions with them.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x [T, heads, D]` by per-token `cos/sin [T, D]`."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.kv_heads = config.num_attention_heads, config.kv_heads
        self.head_dim = config.dim_per_head
        self.scale = self.head_dim**-0.5
        q_dim, kv_dim = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, paged: PagedKV) -> Tensor:
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend_paged(q, k, v, paged, self.layer, self.scale)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gated = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(gated)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, paged: PagedKV) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, paged)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, positions: Tensor, paged: PagedKV) -> Tensor:
        """Hidden states `[T, hidden]` before the final norm."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, paged)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_cache: Tensor,
        slot_mapping: Tensor,
        block_tables: Tensor,
        context_lens: Tensor,
        cu_seqlens_q: Tensor,
        logits_indices: Tensor,
    ) -> Tensor:
        """Logits `[len(logits_indices), vocab]`; see ARCHITECTURE.md for the contract."""
        paged = PagedKV(kv_cache, slot_mapping, block_tables, context_lens, cu_seqlens_q)
        hidden = self.model(input_ids, positions, paged)
        selected = self.model.norm(hidden.index_select(0, logits_indices))
        return self.lm_head(selected)


def hf_to_fuselm_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face Llama state dict renamed for `LlamaForCausalLM.load_state_dict`.

    Drops the rotary `inv_freq` buffers; a tied checkpoint that omits `lm_head.weight`
    gets it from the embedding, because a tied module's state dict lists the shared
    Parameter under both names.
    """
    converted = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    converted.setdefault("lm_head.weight", converted["model.embed_tokens.weight"])
    return converted
