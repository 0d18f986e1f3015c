"""Inputs of the flattened-token LM contract, and a helper that runs prompts through it.

`pack_prompts` builds the eight forward inputs for a prefill of whole prompts into a
fresh paged cache: prompts packed back to back, each given its own contiguous run of
blocks. `prompt_logits` runs a model on them; tests and the CLI use it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn


def make_kv_cache(config, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu") -> Tensor:
    """A zeroed paged cache `[L, 2, NB, BS, Hkv, D]` for a Llama or GPT-2 config."""
    heads, head_dim = config.kv_heads, config.dim_per_head
    return torch.zeros(config.num_hidden_layers, 2, num_blocks, block_size, heads, head_dim, dtype=dtype,
                       device=device)


@dataclass(frozen=True)
class LMInputs:
    """The contract's forward inputs, in forward order."""

    input_ids: Tensor  # i64 [T]
    positions: Tensor  # i64 [T]
    kv_cache: Tensor  # [L, 2, NB, BS, Hkv, D]
    slot_mapping: Tensor  # i64 [T]
    block_tables: Tensor  # i32 [N, MB]
    context_lens: Tensor  # i32 [N]
    cu_seqlens_q: Tensor  # i32 [N + 1]
    logits_indices: Tensor  # i64 [N'], rows of the T tokens whose logits are wanted

    def as_tuple(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device) -> LMInputs:
        return LMInputs(*(t.to(device) for t in self.as_tuple()))


def pack_prompts(
    config,
    prompts: list[list[int]],
    block_size: int = 16,
    all_logits: bool = False,
    dtype=torch.float32,
) -> LMInputs:
    """Prefill inputs for whole prompts in a fresh cache, sequences packed back to back.

    Logits are asked for at the last token of each prompt, or at every token when
    `all_logits`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pack_prompts needs at least one prompt and no empty prompt")
    lens = torch.tensor([len(p) for p in prompts])
    blocks_per_seq = (lens + block_size - 1) // block_size
    first_blocks = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    cu_seqlens_q = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0))
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])
    # Blocks are contiguous per sequence, so a token's slot is its first slot + position.
    slot_mapping = torch.repeat_interleave(first_blocks * block_size, lens) + positions
    total = int(lens.sum())
    return LMInputs(
        input_ids=torch.tensor([t for p in prompts for t in p], dtype=torch.int64),
        positions=positions,
        kv_cache=make_kv_cache(config, int(blocks_per_seq.sum()), block_size, dtype),
        slot_mapping=slot_mapping,
        block_tables=block_tables_for(first_blocks, blocks_per_seq),
        context_lens=lens.to(torch.int32),
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        logits_indices=torch.arange(total) if all_logits else cu_seqlens_q[1:] - 1,
    )


def block_tables_for(first_blocks: Tensor, blocks_per_seq: Tensor) -> Tensor:
    """i32 `[N, max blocks]`: contiguous runs of block ids, padded with 0."""
    width = torch.arange(int(blocks_per_seq.max()))
    tables = first_blocks[:, None] + width[None, :]
    return torch.where(width[None, :] < blocks_per_seq[:, None], tables, 0).to(torch.int32)


def prompt_logits(
    model: nn.Module, config, prompts: list[list[int]], all_logits: bool = True
) -> list[Tensor]:
    """Run prompts as one packed prefill; element i is prompt i's logits.

    With `all_logits` each element is `[len(prompts[i]), vocab]` (row j predicts the
    token after position j); otherwise it is `[vocab]`, the logits after the last token.
    """
    weight = next(model.parameters())
    inputs = pack_prompts(config, prompts, all_logits=all_logits, dtype=weight.dtype)
    inputs = inputs.to(weight.device)
    with torch.no_grad():
        logits = model(*inputs.as_tuple())
    if not all_logits:
        return list(logits.unbind(0))
    return list(logits.split([len(p) for p in prompts]))


# Symbolic dimensions of the LM contract, keyed by forward parameter name: one captured
# graph serves any token count, sequence count, cache size and block-table width.
LM_DYNAMIC = {
    "input_ids": {0: "T"},
    "positions": {0: "T"},
    "kv_cache": {2: "NB"},
    "slot_mapping": {0: "T"},
    "block_tables": {0: "N", 1: "MB"},
    "context_lens": {0: "N"},
    "cu_seqlens_q": {0: "N+1"},
    "logits_indices": {0: "R"},
}
ENCODER_DYNAMIC = {"input_ids": {0: "B", 1: "S"}, "attention_mask": {0: "B", 1: "S"}}


def capture_example(config, block_size: int = 16, dtype=torch.float32) -> tuple[tuple, dict]:
    """Example inputs and the dynamic spec to capture a model of this config.

    Sizes avoid 0 and 1 on every symbolic dimension (torch.export specializes those):
    two prompts, one longer than a block, so T, N, NB, MB and R all exceed 1.
    """
    generator = torch.Generator().manual_seed(0)
    if config.model_type == "bert":
        input_ids = torch.randint(0, config.vocab_size, (2, 8), generator=generator)
        attention_mask = torch.ones(2, 8, dtype=torch.int64)
        attention_mask[1, 5:] = 0
        return (input_ids, attention_mask), ENCODER_DYNAMIC
    lengths = (block_size + 3, 5)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    return pack_prompts(config, prompts, block_size=block_size, dtype=dtype).as_tuple(), LM_DYNAMIC
