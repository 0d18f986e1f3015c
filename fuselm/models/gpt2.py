"""GPT-2 as a trace-friendly decoder in fuselm's flattened-token LM contract.

Parameter names match Hugging Face's `GPT2LMHeadModel`, but the projections are
`nn.Linear` (weight `[out, in]`) where HF uses `Conv1D` (`[in, out]`):
`hf_to_fuselm_state_dict` transposes them. Attention goes through the paged-KV custom
ops of `fuselm.models.attention` (as many kv heads as query heads).
"""
from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from fuselm.models.attention import PagedKV, attend_paged
from fuselm.models.config import GPT2Config

ACTIVATIONS = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

# HF Conv1D layers, stored [in, out]; ours are nn.Linear, [out, in].
CONV1D_SUFFIXES = (
    "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
)
# HF's causal-mask buffers, which older checkpoints also store.
DROPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = config.n_head, config.dim_per_head
        self.scale = self.head_dim**-0.5
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, paged: PagedKV) -> Tensor:
        qkv = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        out = attend_paged(q, k, v, paged, self.layer, self.scale)
        return self.c_proj(out.flatten(1))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, paged: PagedKV) -> Tensor:
        x = x + self.attn(self.ln_1(x), paged)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: Tensor, positions: Tensor, paged: PagedKV) -> Tensor:
        """Hidden states `[T, n_embd]` before the final norm."""
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, paged)
        return x


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

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
        hidden = self.transformer(input_ids, positions, paged)
        selected = self.transformer.ln_f(hidden.index_select(0, logits_indices))
        return self.lm_head(selected)


def hf_to_fuselm_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face GPT-2 state dict (with or without the `transformer.` prefix)
    renamed and transposed for `GPT2LMHeadModel.load_state_dict`."""
    converted = {}
    for name, tensor in state_dict.items():
        if name.endswith(DROPPED_SUFFIXES):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()
        converted[name] = tensor
    # The lm_head is tied to wte; the tied module lists the Parameter under both names.
    converted.setdefault("lm_head.weight", converted["transformer.wte.weight"])
    return converted
