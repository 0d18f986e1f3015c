"""`fuselm.Encoder` and `fuselm embed`: all-MiniLM-L6-v2's sentence embeddings, packed,
against Hugging Face `BertModel` with sentence-transformers' mean pooling and
normalization, in input order; and the bad inputs of `encode`."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fuselm

pytestmark = pytest.mark.slow

WORDS = ("the compiler fuses kernels of a transformer model into fewer launches while packing real tokens "
         "attention masks padding sequence batch gemm norm residual quantize inference latency throughput").split()


@pytest.fixture(scope="module")
def encoder():
    return fuselm.Encoder("minilm-l6", target="cpu")


def mixed_texts(count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 40]) for _ in range(count)]
    lengths[:2] = [400, 0]  # one past max_seq_length (truncated at 256 tokens) and an empty string
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def reference(texts, hf_minilm, tokenizer, normalize: bool = True) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2: truncate at 256, mean over real tokens, normalize."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # (less padding: faster, same values)
    out = torch.empty(len(texts), 384)
    for start in range(0, len(texts), 64):
        chosen = order[start:start + 64]
        batch = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        with torch.no_grad():
            hidden = hf_minilm(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        out[chosen] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(out, p=2, dim=1) if normalize else out


def test_a_thousand_mixed_texts_equal_hugging_face_in_input_order(encoder, hf_minilm, hf_minilm_tokenizer):
    texts = mixed_texts(1000)
    got = encoder.encode(texts)
    assert got.shape == (1000, 384) and got.dtype == torch.float32
    expected = reference(texts, hf_minilm, hf_minilm_tokenizer)
    assert F.cosine_similarity(got, expected).min().item() >= 0.99999
    graph_ops = [node.op for node in encoder.forward.graph.nodes]
    assert graph_ops.count("varlen_attention") == 6 and "attention" not in graph_ops


@pytest.mark.parametrize("lengths", [[1, 17, 256, 9], [40, 40, 40], [1]])
def test_the_packed_minilm_equals_hugging_face_at_real_positions(encoder, hf_minilm, lengths):
    generator = torch.Generator().manual_seed(len(lengths))
    ids = torch.randint(1000, 30000, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        expected = hf_minilm(input_ids=ids, attention_mask=mask).last_hidden_state
    got = encoder.forward(ids, mask)
    keep = mask.bool()
    assert F.cosine_similarity(got[keep], expected[keep], dim=-1).min().item() >= 0.99999
    torch.testing.assert_close(got[keep], expected[keep], atol=2e-4, rtol=1e-4)
    assert (got[~keep] == 0).all()


def test_one_string_gives_a_vector_and_normalize_follows_the_model(encoder, hf_minilm, hf_minilm_tokenizer):
    assert encoder.sentence.normalize and encoder.max_length == 256
    vector = encoder.encode("a single sentence")
    assert vector.shape == (384,) and abs(vector.norm().item() - 1) < 1e-5
    raw = encoder.encode(["a single sentence"], normalize=False)
    expected = reference(["a single sentence"], hf_minilm, hf_minilm_tokenizer, normalize=False)
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=1e-4)


def test_bad_inputs(encoder, hf_minilm, hf_minilm_tokenizer):
    empty = encoder.encode([])
    assert empty.shape == (0, 384)
    with pytest.raises(TypeError, match="item 1 is a int, not a string"):
        encoder.encode(["fine", 7])
    with pytest.raises(TypeError, match="encode takes a string or a list of strings"):
        encoder.encode(b"bytes")
    too_long = " ".join(["word"] * 300)
    with pytest.raises(ValueError, match=r"text 1 is \d+ tokens long, and this model takes at most 256"):
        encoder.encode(["short", too_long], truncate=False)
    cut = encoder.encode([too_long, ""])  # cut at 256 tokens; the empty string is [CLS] [SEP]
    expected = reference([too_long, ""], hf_minilm, hf_minilm_tokenizer)
    assert F.cosine_similarity(cut, expected).min().item() >= 0.99999
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        encoder.encode(["x"], batch_size=0)
    with pytest.raises(TypeError, match="normalize must be None, True or False"):
        encoder.encode(["x"], normalize="no")


@pytest.mark.parametrize("file, text, message", [
    ("modules.json", "{}", "modules.json: a JSON dict, where sentence-transformers writes a list"),
    ("modules.json", "[1, 2]", "modules.json: not a list of sentence-transformers modules"),
    ("1_Pooling/config.json", "[]", "config.json: a JSON list, where sentence-transformers writes an object"),
    ("sentence_bert_config.json", '{"max_seq_length": -5}', "max_seq_length must be a positive int, got -5"),
    ("sentence_bert_config.json", "{not json", "sentence_bert_config.json: not readable JSON"),
])
def test_damaged_sentence_transformers_files_are_named(minilm_dir, tmp_path, file, text, message):
    """These were AttributeError / OverflowError tracebacks (through `fuselm embed` too)."""
    import shutil

    from fuselm.models.sentence import SentenceConfig

    copy = Path(shutil.copytree(minilm_dir, tmp_path / "minilm", ignore=shutil.ignore_patterns("*.safetensors")))
    (copy / file).write_text(text)
    with pytest.raises(ValueError, match=message):
        SentenceConfig.read(copy)


def test_a_language_model_is_not_an_encoder_and_the_reverse():
    with pytest.raises(ValueError, match="is a llama model, not an encoder"):
        fuselm.Encoder("smollm2-135m", target="cpu")
    with pytest.raises(ValueError, match="is an encoder .*use fuselm.Encoder"):
        fuselm.LLM("minilm-l6", target="cpu")


def test_embed_on_the_command_line(encoder):
    run = subprocess.run([sys.executable, "-m", "fuselm", "embed", "hello world", "a second text", "--json",
                          "--target", "cpu"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed["dimension"] == 384 and len(printed["embeddings"]) == 2
    expected = encoder.encode(["hello world", "a second text"])
    torch.testing.assert_close(torch.tensor(printed["embeddings"]), expected, atol=1e-5, rtol=1e-4)
    refused = subprocess.run([sys.executable, "-m", "fuselm", "generate", "--model", "minilm-l6", "--target", "cpu",
                              "hello"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert "is an encoder" in refused.stderr and "fuselm embed" in refused.stderr and "Traceback" not in refused.stderr
