"""Tiny random-weight models shared by the tests, and their captured graphs."""
import torch

from fuselm.frontend import capture
from fuselm.ir import GraphBuilder, TensorType
from fuselm.models import llama
from fuselm.models.config import LlamaConfig
from fuselm.models.contract import capture_example

VOCAB = 97


def tiny_llama(num_layers: int = 2, seed: int = 0):
    """A grouped-query Llama (4 heads, 2 kv heads) with tied embeddings, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=True)
    return config, llama.LlamaForCausalLM(config).eval()


def captured(config, model):
    """The model captured in the LM contract with its default symbolic dims."""
    example, dynamic = capture_example(config)
    return capture(model, example, dynamic)


def gemm_group(k: int, n: int, steps: tuple, dtype: str = "f32", lead: tuple = ("T",),
               weight_shape: tuple = None, attrs: dict = None):
    """A graph of one gemm(x[*lead, k], w, *extras) with the epilogue `steps`: a `bias<i>`
    or `residual<i>` input per such step, in order (a gated_silu halves the width after it).
    w is [n, k] unless `weight_shape` (a packed layout, described by `attrs`) is given."""
    b = GraphBuilder()
    x = b.input("x", TensorType((*lead, k), dtype))
    w = b.input("w", TensorType(tuple(weight_shape or (n, k)), dtype))
    extras, width = [], n
    for step in steps:
        if step == "gated_silu":
            width //= 2
        elif step == "bias":
            extras.append(b.input(f"bias{len(extras)}", TensorType((width,), dtype)))
        elif step == "residual":
            extras.append(b.input(f"residual{len(extras)}", TensorType((*lead, width), dtype)))
    return b.build([b.op("gemm", x, w, *extras, epilogue=tuple(steps), **(attrs or {}))])


class LastHidden(torch.nn.Module):
    """A Hugging Face encoder called as users do: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
