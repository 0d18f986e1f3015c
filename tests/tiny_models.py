"""Tiny random-weight models shared by the tests, and their captured graphs."""
import torch

from fuselm.frontend import capture
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
