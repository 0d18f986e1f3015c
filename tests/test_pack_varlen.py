"""pack_varlen: padded encoders run on their real tokens (fuselm/passes/pack_varlen.py),
`compile(pack=True)`, and the graph it leaves alone. Checked against Hugging Face
transformers at the real positions, for length mixes with length 1, all lengths equal
and the maximum length."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fuselm
from fuselm.frontend.capture import capture
from fuselm.ir import interpret
from fuselm.passes import counters, pipeline, run_passes
from fuselm.passes.pack_varlen import pack_varlen
from fuselm.runtime.varlen import varlen_inputs

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/zoo.py
from benchmarks.zoo import ARCHS, TINY, build  # noqa: E402

MAX_LENGTH = TINY.positions  # the longest sequence the tiny configs take


class LastHidden(torch.nn.Module):
    """A Hugging Face encoder called as users do, returning last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def batch(lengths, vocab: int, seed: int = 0, left: bool = False):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1 if left else 0
        mask[row, :n] = 0 if left else 1
    return ids, mask


LENGTH_MIXES = [[5, 1, MAX_LENGTH, 7], [6, 6, 6], [12], [1, 1], [3, 12, 9, 2, 11]]


def close_at_real_positions(got, expected, mask):
    keep = mask.bool()
    cosine = F.cosine_similarity(got[keep], expected[keep], dim=-1)
    assert cosine.min().item() >= 0.99999
    torch.testing.assert_close(got[keep], expected[keep], atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pack-kernels"))


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_packed_equals_padded_equals_hugging_face(name, kernels):
    model, _ = build(ARCHS[name], TINY)
    wrapped = LastHidden(model).eval()
    packed = fuselm.compile(wrapped, target="cpu", dynamic=True, strict=True, pack=True, cache_dir=kernels)
    padded = fuselm.compile(wrapped, target="cpu", dynamic=True, strict=True, cache_dir=kernels) \
        if name == "bert" else None  # (the padded compile of the others: test_zoo)
    for seed, lengths in enumerate(LENGTH_MIXES if name == "bert" else LENGTH_MIXES[:3]):
        ids, mask = batch(lengths, TINY.vocab, seed)
        with torch.no_grad():
            expected = wrapped(ids, mask)
        got = packed(ids, mask)
        close_at_real_positions(got, expected, mask)
        if padded is not None:
            close_at_real_positions(got, padded(ids, mask), mask)
        assert (got[~mask.bool()] == 0).all()  # padded positions: zeros
    ops = [node.op for node in packed.graph.nodes]
    assert ops.count("varlen_attention") == TINY.layers and "attention" not in ops
    assert "pack" in ops and "unpack" in ops
    assert any(k.name.startswith("varlen_attention") for k in packed.kernels)


def test_left_padding_and_scattered_masks_pack_too(kernels):
    model, _ = build(ARCHS["bert"], TINY)
    wrapped = LastHidden(model).eval()
    packed = fuselm.compile(wrapped, target="cpu", dynamic=True, pack=True, cache_dir=kernels)
    ids, mask = batch([4, 9, 2], TINY.vocab, left=True)
    with torch.no_grad():
        close_at_real_positions(packed(ids, mask), wrapped(ids, mask), mask)


def test_the_pass_in_the_interpreter_and_the_packing_inputs():
    model, _ = build(ARCHS["bert"], TINY)
    wrapped = LastHidden(model).eval()
    ids, mask = batch([3, 8, 5], TINY.vocab)
    graph = capture(wrapped, (ids, mask), {"input_ids": {0: "B", 1: ("S", 2, 32)}, "attention_mask": {0: "B", 1: "S"}})
    counters.clear()
    graph = run_passes(graph, pipeline(None, pack=True))
    assert counters["pack_varlen.varlen_attention"] == TINY.layers
    assert [v.name for v in graph.inputs][-3:] == ["attention_mask__varlen_tokens", "attention_mask__varlen_positions",
                                                   "attention_mask__varlen_cu_seqlens"]
    tokens, positions, cu = varlen_inputs(mask)
    assert cu.tolist() == [0, 3, 11, 16] and tokens.numel() == 16 and positions[0, 3].item() == -1
    with torch.no_grad():
        close_at_real_positions(interpret(graph, ids, mask, tokens, positions, cu), wrapped(ids, mask), mask)


class NoMask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = (t.reshape(x.shape[0], x.shape[1], 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)


class NotAPaddingMask(torch.nn.Module):
    """A [B, S] float input used as an additive bias on the keys: not a padding mask."""

    def forward(self, q, bias):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias[:, None, None, :])


@pytest.mark.parametrize("model, inputs", [
    (NoMask(), (torch.randn(2, 5, 16),)),
    (NotAPaddingMask(), (torch.randn(2, 2, 5, 8), torch.randn(2, 5))),
])
def test_a_graph_without_a_padding_mask_is_left_unchanged(model, inputs):
    graph = run_passes(capture(model, inputs), pipeline(None)[:-1])
    assert pack_varlen(graph) is graph
    compiled = fuselm.compile(model, inputs, target="cpu", pack=True)
    assert not any(node.op in ("pack", "unpack", "varlen_attention") for node in compiled.graph.nodes)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


def test_the_dump_shows_pack_and_unpack(tmp_path, kernels):
    model, _ = build(ARCHS["bert"], TINY)
    wrapped = LastHidden(model).eval()
    ids, mask = batch([3, 8], TINY.vocab)
    fuselm.compile(wrapped, (ids, mask), target="cpu", pack=True, dump_dir=str(tmp_path), cache_dir=kernels)
    dumped = next(tmp_path.glob("*pack_varlen.ir")).read_text()
    assert "= pack(" in dumped and "= unpack(" in dumped and "= varlen_attention(" in dumped


def test_pack_must_be_a_bool():
    with pytest.raises(TypeError, match="pack must be True or False"):
        fuselm.compile(torch.nn.Linear(2, 2), pack="yes")
