"""quantize="gguf": a GGUF file's own Q4_0 / Q4_1 / Q8_0 tensors served as they are.

A tiny tied Llama is written the way llama.cpp writes one, its matrices in a mix of the
three types (the tied embedding Q8_0, as in SmolLM2's file). Loaded with packed=True its
model holds stand-ins of no memory and the parts hold the file's blocks; compiled, every
gemm is a qgemm and the embedding a qembedding over those parts, and the logits equal
those of the same file dequantized to fp32.
"""
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GGML

import fuselm
from fuselm.api import compile_lm
from fuselm.errors import FuselmError
from fuselm.ir.quant_ops import dequantize_weight
from fuselm.models import load
from fuselm.models.contract import pack_prompts
from fuselm.quant import QuantizeConfig
from fuselm.quant.packed import PackedWeight, PackedWeights
from fuselm.quant.weights import quantize_int8
from test_loaders import tiny_hf_llama, write_tiny_llama_gguf

TYPES = (GGML.Q4_0, GGML.Q4_1, GGML.Q8_0)


def mixed_types(name: str):
    """Q8_0 for the (tied) embedding; the layers' matrices cycle through the three types,
    so some siblings share a type (and fuse) and some do not."""
    if name == "token_embd.weight":
        return GGML.Q8_0
    return TYPES[sum(map(ord, name)) % 3]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    hf_model, config = tiny_hf_llama(tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    write_tiny_llama_gguf(path, hf_model, config, quantized=mixed_types)
    return path


@pytest.fixture(scope="module")
def loaded_pair(tiny_gguf):
    """(the file dequantized to fp32, the file with its packed weights)"""
    return load(tiny_gguf), load(tiny_gguf, packed=True)


def _stand_ins(loaded):
    return {name: loaded.packed.of(p) for name, p in loaded.model.state_dict().items() if loaded.packed.of(p)}


def test_packed_weights_are_the_files_blocks_and_dequantize_to_its_weights(loaded_pair):
    fp32, packed = loaded_pair
    stand_ins = _stand_ins(packed)
    layers = fp32.config.num_hidden_layers
    assert packed.config.tie_word_embeddings and len(packed.packed) == 1 + 7 * layers  # embedding + 7 per layer
    formats = {w.format for w in packed.packed.values()}
    assert formats == {"int8", "int4"}
    for name, weight in stand_ins.items():
        reference = fp32.model.state_dict()[name]
        values = dequantize_weight(**weight.parts, format=weight.format, group_size=weight.group_size,
                                   n=weight.shape[0], k=weight.shape[1])
        assert torch.equal(values, reference), name  # the rotary rows undone on every part alike
        parameter = packed.model.state_dict()[name]
        assert parameter.stride() == (0, 0) and parameter.untyped_storage().nbytes() == 4
    float_bytes = sum(w.shape[0] * w.shape[1] * 4 for w in packed.packed.values())
    assert packed.packed.nbytes <= 0.27 * float_bytes  # Q8_0 34 and Q4_1 20 bytes per 32 weights


def test_the_packed_model_run_eagerly_is_nan_not_plausible(loaded_pair):
    """Its weights exist only as parts: eager torch must not quietly compute with zeros."""
    _, packed = loaded_pair
    embedding = packed.model.model.embed_tokens(torch.tensor([1, 2]))
    assert embedding.isnan().all()


def _logits(compiled, config, prompts):
    inputs = pack_prompts(config, prompts, block_size=16, all_logits=True)
    return compiled(*(t.clone() for t in inputs.as_tuple()))[0]


@pytest.mark.parametrize("target", ["cpu", "cuda"])  # cuda: the Triton kernels under TRITON_INTERPRET
def test_compiled_gguf_logits_equal_the_file_dequantized_to_fp32(loaded_pair, target, tmp_path_factory):
    fp32, packed = loaded_pair
    cache = str(tmp_path_factory.getbasetemp() / f"gguf-kernels-{target}")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 7, 7], [30]]
    served = compile_lm(packed, target, 16, torch.float32, cache, quantize="gguf")
    reference = compile_lm(fp32, target, 16, torch.float32, cache)
    ours, expected = _logits(served, packed.config, prompts), _logits(reference, fp32.config, prompts)
    assert ((ours - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    graph = served.entries[-1].graph
    counts = graph.op_counts()
    assert "gemm" not in counts and counts["qembedding"] == 1 and "embedding" not in counts
    assert counts["qgemm"] >= 1 + 4 * fp32.config.num_hidden_layers  # q/k/v fused only where types agree
    matrices = sum(t.numel() * t.element_size() for t in graph.constants.values() if t.dim() == 2 and t.shape[0] > 1)
    assert matrices <= packed.packed.nbytes  # no float copy of a packed weight anywhere
    head = [n for n in graph.nodes if n.op == "qgemm" and n.attrs["n"] == fp32.config.vocab_size]
    embedding = next(n for n in graph.nodes if n.op == "qembedding")
    assert head and head[0].inputs[1] is embedding.inputs[1]  # the tied Q8_0 table, held once


def test_llm_serves_the_gguf_quantization(tiny_gguf):
    params = fuselm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    served = fuselm.LLM(str(tiny_gguf), target="cpu", quantize="gguf", max_model_len=64)
    reference = fuselm.LLM(str(tiny_gguf), target="cpu", max_model_len=64)
    ours, = served.generate(["abc"], params)
    expected, = reference.generate(["abc"], params)
    assert len(ours.token_ids) == 6 and ours.token_ids == expected.token_ids


def test_gguf_on_a_model_that_is_not_a_gguf_file_is_refused(tmp_path):
    hf_model, _ = tiny_hf_llama()
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantize='gguf' serves the quantized tensors of a .gguf file"):
        load(tmp_path, packed=True)


def test_gguf_takes_no_quantization_options():
    with pytest.raises(ValueError, match="group_size, skip and calibration do not apply"):
        QuantizeConfig("gguf", group_size=32)


def test_compile_with_gguf_but_no_packed_weights_says_how():
    model = torch.nn.Linear(64, 8)
    with pytest.raises(FuselmError, match="fuselm.LLM\\(model=FILE.gguf, quantize='gguf'\\)"):
        fuselm.compile(model, (torch.randn(2, 64),), target="cpu", quantize="gguf")


class ReadsItsWeightTwice(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight) * self.weight.mean()


def test_a_packed_weight_read_by_an_op_without_a_quantized_form_is_named():
    parts = quantize_int8(torch.randn(8, 64), 32)
    weight = PackedWeight("int8", 32, parts, (8, 64))
    model = ReadsItsWeightTwice(weight.standin)
    config = QuantizeConfig("gguf", packed=PackedWeights([weight]))
    with pytest.raises(FuselmError, match=r"packed .* weight weight is read by aten.mean.default at .*test_gguf_packed.py"):
        fuselm.compile(model, (torch.randn(2, 64),), target="cpu", quantize=config)


def test_llm_refuses_a_bad_scheme_before_loading(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before quantize= was checked")

    monkeypatch.setattr(fuselm.models, "load", no_loading)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        fuselm.LLM("smollm2-135m", target="cpu", quantize="int3")


def test_an_artifact_built_with_gguf_holds_the_blocks_and_serves_the_same_tokens(tiny_gguf, tmp_path):
    from fuselm.artifact import build
    directory = tmp_path / "tiny-gguf.fuselm"
    build(tiny_gguf, directory, quantize="gguf", cache_dir=str(tmp_path / "kernels"), progress=False)
    params = fuselm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    served, = fuselm.LLM(model=str(directory)).generate(["abc"], params)
    expected, = fuselm.LLM(str(tiny_gguf), target="cpu", max_model_len=64).generate(["abc"], params)
    assert served.token_ids == expected.token_ids
    weights = sum(f.stat().st_size for f in directory.rglob("*.safetensors"))
    float_weights = sum(w.shape[0] * w.shape[1] * 4 for w in load(tiny_gguf, packed=True).packed.values())
    assert weights < 0.5 * float_weights  # the file's blocks, not floats made of them
