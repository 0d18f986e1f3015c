"""pack_varlen: padded encoders run on their real tokens (fuselm/passes/pack_varlen.py),
`compile(pack=True)`, and the graph it leaves alone. Checked against Hugging Face
transformers at the real positions, for length mixes with length 1, all lengths equal
and the maximum length."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fuselm
from tiny_models import LastHidden
from fuselm.frontend.capture import capture
from fuselm.ir import interpret
from fuselm.passes import counters, pipeline, run_passes
from fuselm.passes.pack_varlen import pack_varlen
from fuselm.runtime.varlen import varlen_inputs

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/zoo.py
from benchmarks.zoo import ARCHS, TINY, build  # noqa: E402

MAX_LENGTH = TINY.positions  # the longest sequence the tiny configs take


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


# ----------------------------------------------------------------------------- found by probing
class Encoder(torch.nn.Module):
    """A hand-written encoder: manual attention with an in-forward mask (`kind`), fused or
    separate q/k/v, an optional second stage reading other positions (`extra`)."""

    def __init__(self, kind: str = "additive", extra=None, fused: bool = False, hidden: int = 16, heads: int = 2):
        super().__init__()
        self.kind, self.extra, self.fused, self.heads = kind, extra, fused, heads
        self.emb, self.pos = torch.nn.Embedding(50, hidden), torch.nn.Embedding(64, hidden)
        self.qkv, self.o = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.conv = torch.nn.Conv1d(hidden, hidden, 3, padding=1)

    def keep(self, mask, length):
        keys = mask[:, None, None, :].bool()
        if self.kind == "window":  # a band of 8 around each query
            i = torch.arange(length)
            keys = keys & ((i[:, None] - i[None, :]).abs() < 8)[None, None]
        return keys

    def forward(self, ids, mask, other=None):
        batch, length = ids.shape
        x = self.emb(ids) + self.pos(torch.arange(length))[None]
        q, k, v = self.qkv(x).chunk(3, -1) if self.fused else (self.qkv(x)[..., i::3] for i in range(3))
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores + (~self.keep(mask, length)).float() * -10000.0
        x = x + self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1))
        if other is not None:  # a second attention over the same hidden states with its own mask
            scores = (x @ x.transpose(-1, -2))[:, None] + (1 - other[:, None, None, :].float()) * -10000.0
            x = x + (scores.softmax(-1) @ x[:, None])[:, 0]
        if self.extra == "conv":
            x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return x


def real_close(model, compiled, *args):
    with torch.no_grad():
        expected = model(*args)
    keep = args[1].bool()
    torch.testing.assert_close(compiled(*args)[keep], expected[keep], atol=1e-4, rtol=1e-4)


def probe_batch(lengths, width):
    ids = torch.randint(1, 50, (len(lengths), width), generator=torch.Generator().manual_seed(3))
    return ids, (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_a_window_wider_than_a_short_sample_is_not_taken_for_padding():
    """A band of 8 looked like plain padding on 7-token samples (symbolic S): wrong rows."""
    model = Encoder("window").eval()
    compiled = fuselm.compile(model, target="cpu", pack=True, dynamic=True)
    real_close(model, compiled, *probe_batch([20, 15], 20))
    assert not any(node.op == "varlen_attention" for node in compiled.graph.nodes)


def test_a_second_mask_or_a_reader_of_other_positions_keeps_the_graph_padded():
    """A second [B, S] mask input was packed by the first mask; a convolution over the
    sequence read the zeros packing leaves at padding: both changed real positions."""
    ids, mask = probe_batch([9, 5, 2], 9)
    other = (torch.arange(9)[None, :] < torch.tensor([3, 9, 7])[:, None]).long()
    two = Encoder().eval()
    real_close(two, fuselm.compile(two, target="cpu", pack=True), ids, mask, other)
    conv = Encoder(extra="conv").eval()
    compiled = fuselm.compile(conv, target="cpu", pack=True)
    real_close(conv, compiled, ids, mask)
    assert counters["pack_varlen.refused"] >= 1


def test_fused_qkv_chunks_pack_and_packed_ids_are_bounds_checked():
    model = Encoder(fused=True).eval()
    compiled = fuselm.compile(model, target="cpu", pack=True, dynamic=True)
    ids, mask = probe_batch([6, 2], 6)
    real_close(model, compiled, ids, mask)
    assert any(node.op == "varlen_attention" for node in compiled.graph.nodes)
    ids[0, 1] = 50  # packed ids reach the embedding through `pack`: still checked
    with pytest.raises(IndexError, match="ids holds 50, and embedding"):
        compiled(ids, mask)


def test_equal_static_batch_and_length_are_not_packed():
    """[B, S] and [S, S] values look alike when B == S (both static)."""
    model = Encoder().eval()
    ids, mask = probe_batch([4, 2, 3, 1], 4)
    compiled = fuselm.compile(model, (ids, mask), target="cpu", pack=True)
    real_close(model, compiled, ids, mask)
    assert not any(node.op == "varlen_attention" for node in compiled.graph.nodes)
