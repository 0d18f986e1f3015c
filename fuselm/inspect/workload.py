"""What a profile runs the graph on: sizes for its symbolic dims and tensors to match.

`--tokens` is the new tokens of each sequence and `--batch` the sequences, so the
flattened-token LM contract gets T = tokens x batch tokens, N = R = batch sequences
(a logit row each), and a paged cache of `--context` tokens per sequence (default: the
new tokens alone, a prefill into an empty cache). An encoder's [B, S] gets B = batch,
S = tokens. Any other symbol needs `--dim NAME=SIZE`.

Values only have to be safe and realistic in cost, not meaningful: the LM contract's
integer inputs are a real packed batch (contiguous blocks per sequence, positions
ending at the context length), so paged attention reads `context` tokens per sequence;
other integer inputs are zeros (a valid index into anything), masks ones (attend
everywhere), floats random. Weights missing from a dump are random too: a gemm costs
the same whatever its weights hold.
"""
from __future__ import annotations

import math

import sympy
import torch

from ..ir.types import TensorType, evaluate_dim
from ..models.contract import LM_DYNAMIC
from .source import InspectError

WEIGHT_SCALE = 0.02  # random weights as a model's initializer draws them: activations stay finite
DEFAULT_BLOCK_SIZE = 16


def symbol_sizes(inputs: list, tokens: int, batch: int, context: int | None = None, dims: dict | None = None) -> dict:
    """{symbol: size} for every symbol in the graph inputs' types."""
    context = tokens if context is None else context
    if min(tokens, batch) < 1 or context < tokens:
        raise InspectError(f"need tokens >= 1, batch >= 1 and context >= tokens; got tokens={tokens}, "
                           f"batch={batch}, context={context}")
    blocks = math.ceil(context / _block_size(inputs))
    given = {"T": tokens * batch, "N": batch, "R": batch, "B": batch, "S": tokens, "MB": blocks, "NB": batch * blocks}
    wanted = sorted({str(s) for value in inputs for s in value.type.symbols})
    sizes = {}
    for name, size in (dims or {}).items():
        if name in given:
            raise InspectError(f"--dim {name}=... : {name} is set by --tokens/--batch/--context")
        sizes[name] = size
    missing = [name for name in wanted if name not in given and name not in sizes]
    if missing:
        raise InspectError(f"no size for the symbolic dims {', '.join(missing)}: pass --dim "
                           + " --dim ".join(f"{name}=SIZE" for name in missing))
    return {sympy.Symbol(name, integer=True, positive=True): given.get(name, sizes.get(name)) for name in wanted}


def _block_size(inputs: list) -> int:
    cache = next((v for v in inputs if v.name == "kv_cache"), None)
    size = cache.type.shape[3] if cache is not None and cache.type.rank == 6 else DEFAULT_BLOCK_SIZE
    return size if isinstance(size, int) else DEFAULT_BLOCK_SIZE


def graph_inputs(inputs: list, sizes: dict, tokens: int, batch: int, context: int | None, device) -> tuple:
    """A tensor per graph input, shaped by `sizes`."""
    context = tokens if context is None else context
    named = {}
    if set(LM_DYNAMIC) <= {v.name for v in inputs}:
        named = lm_contract_values(tokens, batch, context, _block_size(inputs))
    tensors = []
    for value in inputs:
        shape = tuple(evaluate_dim(d, sizes) for d in value.type.shape)
        if value.name in named:
            tensors.append(named[value.name].to(device=device, dtype=value.type.torch_dtype).reshape(shape))
        else:
            tensors.append(filler(value.name, TensorType(shape, value.type.dtype), device, scale=1.0))
    return tuple(tensors)


def lm_contract_values(tokens: int, batch: int, context: int, block_size: int) -> dict:
    """The LM contract's index inputs for `batch` sequences, each adding `tokens` tokens
    to a context of `context` (cache blocks contiguous per sequence)."""
    blocks = math.ceil(context / block_size)
    first_blocks = torch.arange(batch) * blocks
    positions = torch.arange(context - tokens, context).repeat(batch)
    cu_seqlens_q = torch.arange(batch + 1) * tokens
    return {
        "input_ids": torch.zeros(batch * tokens),
        "positions": positions,
        "slot_mapping": first_blocks.repeat_interleave(tokens) * block_size + positions,
        "block_tables": first_blocks[:, None] + torch.arange(blocks)[None, :],
        "context_lens": torch.full((batch,), context),
        "cu_seqlens_q": cu_seqlens_q,
        "logits_indices": cu_seqlens_q[1:] - 1,
    }


def filler(name: str, type: TensorType, device, scale: float = WEIGHT_SCALE) -> torch.Tensor:
    """A tensor of `type` that every kernel can read: see the module docstring."""
    shape = tuple(type.shape)
    if type.is_float or type.is_complex:
        return torch.randn(shape, dtype=type.torch_dtype, device=device) * scale
    if type.dtype == "bool" or "mask" in name:
        return torch.ones(shape, dtype=type.torch_dtype, device=device)
    return torch.zeros(shape, dtype=type.torch_dtype, device=device)


# The gathers over a table: (position of the ids, position of the table or its q part).
EMBEDDINGS = {"embedding": (1, 0), "qembedding": (0, 1)}


def check_embedding_indices(graph, tensors: tuple) -> None:
    """Kernels do not bounds-check: an id past an embedding table (a position past
    GPT-2's 1024) would read outside it. Refuse such sizes instead."""
    by_input = dict(zip(graph.inputs, tensors))
    for node in graph.nodes:
        if node.op not in EMBEDDINGS:
            continue
        ids_at, table_at = EMBEDDINGS[node.op]
        if node.inputs[ids_at] in by_input:
            ids, rows = by_input[node.inputs[ids_at]], node.inputs[table_at].type.shape[0]
            if ids.numel() and isinstance(rows, int) and int(ids.max()) >= rows:
                raise InspectError(f"%{node.inputs[ids_at].name} reaches {int(ids.max())}, past the {rows} rows of "
                                   f"the embedding it indexes: use a smaller --context or --tokens")
