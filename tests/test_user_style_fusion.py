"""Attention and linear layers as users write them by hand get fused.

Each block is a pre-LN transformer block in one user's style: linears as `x @ W.t()`,
heads by reshape/transpose, and attention spelled out with a causal mask built one of
many ways (or SDPA, or a padding mask). Captured with static shapes and with a symbolic
T, the pipeline must leave one `attention` op (causal, or keeping the padding mask),
the linears as gemms with their epilogues and no matmul, and compute what eager torch
computes. Then the mask analysis on its own (causal by value or not), the matmul ->
gemm rules on small graphs, one compiled block, and the causal attention kernels.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fuselm import ir
from fuselm.frontend import capture
from fuselm.ir import GraphBuilder, TensorType
from fuselm.passes import counters, pipeline, run_passes
from fuselm.passes.matmul_to_gemm import matmul_to_gemm

from pass_checks import fresh_counters  # noqa: F401 (autouse: counters reset, seed 0)

D, HEADS, T = 32, 4, 7
FINFO_MIN = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------- the blocks
class Block(torch.nn.Module):
    """h = ln1(x); q, k, v = chunk(h @ Wqkv.t() + b); x += attend(...) @ Wo.t();
    x += gelu(ln2(x) @ W1.t()) @ W2.t(). Subclasses write `attend`."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.Wqkv = torch.nn.Parameter(torch.randn(3 * D, D) * 0.1)
        self.bqkv = torch.nn.Parameter(torch.randn(3 * D) * 0.1)
        self.Wo = torch.nn.Parameter(torch.randn(D, D) * 0.1)
        self.W1 = torch.nn.Parameter(torch.randn(4 * D, D) * 0.1)
        self.W2 = torch.nn.Parameter(torch.randn(D, 4 * D) * 0.1)

    def forward(self, x, *extra):
        B, T, _ = x.shape
        q, k, v = (self.ln1(x) @ self.Wqkv.t() + self.bqkv).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v, T, *extra).transpose(1, 2).reshape(B, T, D)
        x = x + y @ self.Wo.t()
        return x + F.gelu(self.ln2(x) @ self.W1.t(), approximate="tanh") @ self.W2.t()


class MaskedFillBlock(Block):
    """The hand-written block: masked_fill with ~tril(ones), the scale a division."""

    def attend(self, q, k, v, T):
        att = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class WhereFinfoBlock(Block):
    """torch.where(mask, att, finfo.min), the scale a multiplication."""

    def attend(self, q, k, v, T):
        att = (q @ k.transpose(-1, -2)) * (D // HEADS) ** -0.5
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        att = torch.where(mask, att, torch.finfo(att.dtype).min)
        return F.softmax(att, dim=-1) @ v


class AdditiveTriuBlock(Block):
    """An additive mask: full(-inf).triu(1) added to the scores."""

    def attend(self, q, k, v, T):
        att = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        return (att + torch.full((T, T), float("-inf")).triu(1)).softmax(-1) @ v


class ScaledQueryBlock(Block):
    """The scale folded into q; the mask an arange comparison."""

    def attend(self, q, k, v, T):
        q = q * (D // HEADS) ** -0.5
        i = torch.arange(T)
        att = (q @ k.transpose(-1, -2)).masked_fill(i[None, :] > i[:, None], float("-inf"))
        return torch.softmax(att, -1) @ v


class ScaledKeyBlock(Block):
    """The scale on k, and Hugging Face's additive mask: full(finfo.min), zeroed where j < i + 1."""

    def attend(self, q, k, v, T):
        att = q @ (k / math.sqrt(D // HEADS)).transpose(-1, -2)
        positions = torch.arange(T)
        mask = torch.full((T, T), FINFO_MIN).masked_fill(positions < (positions + 1).view(T, 1), 0.0)
        return (att + mask).softmax(-1) @ v


class BufferMaskBlock(Block):
    """nanoGPT's: a registered tril buffer sliced to T, compared with 0."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

    def attend(self, q, k, v, T):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class SdpaCausalBlock(Block):
    def attend(self, q, k, v, T):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaMaskBlock(Block):
    """SDPA with a bool attn_mask that is causal by value."""

    def attend(self, q, k, v, T):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool).tril())


class PaddingMaskBlock(Block):
    """A padding mask (True = a real token): not causal, so it stays the attention's mask."""

    def forward(self, x, keep):
        return super().forward(x, keep)

    def attend(self, q, k, v, T, keep):
        att = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        att = att.masked_fill(~keep[:, None, None, :], float("-inf"))
        return F.softmax(att, dim=-1) @ v


class PaddingFinfoBlock(PaddingMaskBlock):
    def attend(self, q, k, v, T, keep):
        att = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        return F.softmax(torch.where(keep[:, None, None, :], att, FINFO_MIN), dim=-1) @ v


class OnnxSpelledBlock(PaddingMaskBlock):
    """Attention as ONNX exports of SDPA spell it: the scale's square root on q and on kᵀ,
    the bool mask made additive by where(keep, 0, -inf), the probabilities NaN-guarded.
    The second sequence is wholly padded: its rows are fully masked, which the guard
    turns into zeros, as SDPA (and so the attention op) does."""

    hide_all_of_second = True

    def attend(self, q, k, v, T, keep):
        root = (D // HEADS) ** -0.25
        att = (q * root) @ (k.transpose(-1, -2) * root)
        probs = F.softmax(att + torch.where(keep[:, None, None, :], 0.0, float("-inf")), dim=-1)
        return torch.where(torch.isnan(probs), 0.0, probs) @ v


# block -> (causal, the counters that must have fired besides the linear layers')
STYLES = {
    MaskedFillBlock: (True, ("fuse_attention.attention", "fuse_attention.fill_mask", "fuse_attention.causal_mask")),
    WhereFinfoBlock: (True, ("fuse_attention.attention", "fuse_attention.fill_mask", "fuse_attention.causal_mask",
                             "matmul_to_gemm.flattened_rows")),
    AdditiveTriuBlock: (True, ("fuse_attention.attention", "fuse_attention.causal_mask")),
    ScaledQueryBlock: (True, ("fuse_attention.attention", "fuse_attention.scaled_operand", "fuse_attention.causal_mask")),
    ScaledKeyBlock: (True, ("fuse_attention.attention", "fuse_attention.scaled_operand", "fuse_attention.causal_mask")),
    BufferMaskBlock: (True, ("fuse_attention.attention", "fuse_attention.fill_mask", "fuse_attention.causal_mask")),
    SdpaCausalBlock: (True, ()),
    SdpaMaskBlock: (True, ("fuse_attention.causal_mask",)),
    PaddingMaskBlock: (False, ("fuse_attention.attention", "fuse_attention.fill_mask")),
    PaddingFinfoBlock: (False, ("fuse_attention.attention", "fuse_attention.fill_mask")),
    OnnxSpelledBlock: (False, ("fuse_attention.attention", "fuse_attention.scaled_operand",
                               "fuse_attention.nan_guard")),
}
LINEAR_COUNTERS = {"matmul_to_gemm.linear": 4, "fuse_epilogue.bias": 1, "fuse_epilogue.gelu_tanh": 1,
                   "fuse_epilogue.residual": 2}


def block_inputs(style, tokens: int) -> tuple:
    x = torch.randn(2, tokens, D)
    if issubclass(style, PaddingMaskBlock):
        keep = torch.ones(2, tokens, dtype=torch.bool)
        keep[1, tokens // 2 + 1:] = False  # the second sequence is padded
        if getattr(style, "hide_all_of_second", False):
            keep[1] = False
        return x, keep
    return (x,)


def fused_block(style, symbolic: bool):
    model = style().eval()
    dynamic = None
    if symbolic:
        dynamic = {"x": {1: ("T", 1, 16)}} | ({"keep": {1: ("T", 1, 16)}} if issubclass(style, PaddingMaskBlock) else {})
    graph = capture(model, block_inputs(style, T), dynamic)
    return model, run_passes(graph, pipeline("cuda"))


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("style", list(STYLES), ids=lambda s: s.__name__)
def test_user_written_block_is_fused(style, symbolic):
    model, fused = fused_block(style, symbolic)
    causal, fired = STYLES[style]
    ops = [n.op for n in fused.nodes]
    assert "matmul" not in ops and ops.count("attention") == 1 and ops.count("gemm") == 4
    attention = next(n for n in fused.nodes if n.op == "attention")
    assert attention.attrs["causal"] == causal and len(attention.inputs) == (3 if causal else 4)
    assert attention.attrs["scale"] == pytest.approx((D // HEADS) ** -0.5)
    epilogues = sorted(tuple(n.attrs.get("epilogue", ())) for n in fused.nodes if n.op == "gemm")
    assert epilogues == [("bias",), ("gelu_tanh",), ("residual",), ("residual",)]
    assert {name: counters[name] for name in LINEAR_COUNTERS} == LINEAR_COUNTERS
    assert all(counters[name] >= 1 for name in fired), {k: v for k, v in counters.items() if v}
    ir.verify(fused)
    for tokens in ((T, 12) if symbolic else (T,)):
        inputs = block_inputs(style, tokens)
        with torch.no_grad():
            torch.testing.assert_close(ir.interpret(fused, *inputs), model(*inputs), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- masks by value
class ExplicitAttention(torch.nn.Module):
    """softmax(mask(q kᵀ / √d)) v over q, k, v inputs, the mask one of MASKS."""

    def __init__(self, masking):
        super().__init__()
        self.masking = masking

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return self.masking(scores, q.shape[2], k.shape[2]).softmax(-1) @ v


def _keep(rule):
    """A masked_fill hiding what the bool rule(rows i, columns j) does not keep."""
    def masking(scores, s_q, s_k):
        return scores.masked_fill(~rule(torch.arange(s_q)[:, None], torch.arange(s_k)[None, :]), float("-inf"))
    return masking


def _ones(s_q, s_k):
    return torch.ones(s_q, s_k, dtype=torch.bool)


CAUSAL_MASKS = {
    "arange_le": _keep(lambda i, j: j <= i),
    "arange_lt_next_row": _keep(lambda i, j: j < i + 1),
    "arange_offset_scaled": _keep(lambda i, j: (j - i) * 2 <= 1),
    "triu_hides": lambda s, q, k: s.masked_fill(_ones(q, k).triu(1), float("-inf")),
    "not_lower_nor_diagonal": lambda s, q, k: s.masked_fill(~_ones(q, k).tril(-1) & ~torch.eye(q, k, dtype=torch.bool),
                                                             float("-inf")),
    "where_fill_first": lambda s, q, k: torch.where(_ones(q, k).triu(1), FINFO_MIN, s),
    "one_minus_tril_times_min": lambda s, q, k: s + (1.0 - torch.ones(q, k).tril()) * FINFO_MIN,
}
NOT_CAUSAL_MASKS = {
    "tril_plus_1": _keep(lambda i, j: j <= i + 1),
    "sliding_window": _keep(lambda i, j: (j <= i) & (j > i - 3)),
    "additive_triu_2": lambda s, q, k: s + torch.full((q, k), float("-inf")).triu(2),
    "minus_1e9": lambda s, q, k: s + (1.0 - torch.ones(q, k).tril()) * -1e9,  # not -inf nor finfo.min
    "float_0_1": lambda s, q, k: s + torch.ones(q, k).tril(),  # a bias, not a mask
}


def fused_attention(masking, symbolic: bool, s_q: int = T, s_k: int = T):
    q, k, v = torch.randn(2, HEADS, s_q, 8), torch.randn(2, HEADS, s_k, 8), torch.randn(2, HEADS, s_k, 8)
    dynamic = {name: {2: ("T", 2, 16)} for name in "qkv"} if symbolic else None
    module = ExplicitAttention(masking)
    fused = run_passes(capture(module, (q, k, v), dynamic), pipeline("cuda"))
    with torch.no_grad():
        torch.testing.assert_close(ir.interpret(fused, q, k, v), module(q, k, v), atol=1e-5, rtol=1e-5)
    return [n for n in fused.nodes if n.op == "attention"]


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("name", list(CAUSAL_MASKS))
def test_masks_causal_by_value_become_causal(name, symbolic):
    (attention,) = fused_attention(CAUSAL_MASKS[name], symbolic)
    assert attention.attrs["causal"] and len(attention.inputs) == 3
    assert counters["fuse_attention.causal_mask"] == 1


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("name", list(NOT_CAUSAL_MASKS))
def test_masks_not_causal_stay_masks(name, symbolic):
    """Kept as the attention's mask; with a symbolic T, a mask of generators alone stays
    unfused (a kernel with no inputs could not size it), running as before."""
    attention = fused_attention(NOT_CAUSAL_MASKS[name], symbolic)
    assert counters["fuse_attention.causal_mask"] == 0
    if symbolic:
        assert attention == []
    else:
        assert len(attention) == 1 and not attention[0].attrs["causal"] and len(attention[0].inputs) == 4


def test_causal_looking_mask_with_more_keys_than_queries_stays_a_mask():
    """tril of a [S_q, S_k] mask is not is_causal's pattern when S_q != S_k: kept explicit."""
    (attention,) = fused_attention(lambda s, q, k: s.masked_fill(~_ones(q, k).tril(), float("-inf")), False, 5, 7)
    assert not attention.attrs["causal"] and len(attention.inputs) == 4


# ----------------------------------------------------------------------------- matmul -> gemm
def test_matmul_by_constants_becomes_gemm_reading_the_weight_once():
    b = GraphBuilder()
    x = b.input("x", TensorType((2, "T", 8), "f32"))
    w = b.constant("w", torch.randn(6, 8))  # [N, K], read as x @ w.t()
    c = b.constant("c", torch.randn(8, 6))  # [K, N], read as x @ c twice
    linear = b.op("matmul", x, b.op("permute", w, dims=(1, 0)))
    twice = [b.op("matmul", x, c), b.op("matmul", b.op("neg", x), c)]
    before = b.build([b.op("add", linear, b.op("add", *twice))])
    after = matmul_to_gemm(before)
    gemms = [n for n in after.nodes if n.op == "gemm"]
    assert len(gemms) == 3 and "matmul" not in [n.op for n in after.nodes]
    assert gemms[0].inputs[1].name == "w" and gemms[1].inputs[1] is gemms[2].inputs[1]
    assert sorted(after.constants) == ["c.T", "w"]
    assert counters["matmul_to_gemm.linear"] == 1 and counters["matmul_to_gemm.constant_weight"] == 2
    x_value = torch.randn(2, 5, 8)
    torch.testing.assert_close(ir.interpret(after, x_value), ir.interpret(before, x_value))


def test_flattened_linear_reads_its_input_whole():
    """reshape(mm(reshape(x, [M, K]), W), [..., N]) -> gemm(x, W), x re-viewed when its dims differ."""
    b = GraphBuilder()
    heads = b.input("heads", TensorType((2, "T", 4, 8), "f32"))
    rows = b.op("reshape", heads, shape=(2 * ir.symbol("T"), 32))
    flat = b.op("matmul", rows, b.op("permute", b.constant("w", torch.randn(16, 32)), dims=(1, 0)))
    before = b.build([b.op("reshape", flat, shape=(2, ir.symbol("T"), 16))])
    after = matmul_to_gemm(before)
    assert [n.op for n in after.nodes] == ["reshape", "gemm"] and counters["matmul_to_gemm.flattened_rows"] == 1
    assert str(after.nodes[0].type) == "f32[2,T,32]" and str(after.nodes[1].type) == "f32[2,T,16]"
    x_value = torch.randn(2, 5, 4, 8)
    torch.testing.assert_close(ir.interpret(after, x_value), ir.interpret(before, x_value))


def test_reshape_that_also_splits_heads_is_not_taken_for_unflattened_rows():
    """Falcon: (x @ W.T).view(B, T, heads, D) flattens nothing before the matmul; the view
    splits N, so the rows rule must leave it (it built an ill-typed reshape once)."""
    b = GraphBuilder()
    x = b.input("x", TensorType((2, 12, 64), "f32"))
    rows = b.op("reshape", x, shape=(24, 64))
    flat = b.op("matmul", rows, b.op("permute", b.constant("w", torch.randn(96, 64)), dims=(1, 0)))
    before = b.build([b.op("reshape", flat, shape=(2, 12, 6, 16))])
    after = matmul_to_gemm(before)
    assert counters["matmul_to_gemm.flattened_rows"] == 0 and "gemm" in after.op_counts()
    x_value = torch.randn(2, 12, 64)
    torch.testing.assert_close(ir.interpret(after, x_value), ir.interpret(before, x_value))


def test_matmul_of_two_activations_stays():
    b = GraphBuilder()
    x, y = b.input("x", TensorType(("T", 8), "f32")), b.input("y", TensorType((8, 4), "f32"))
    before = b.build([b.op("matmul", x, y)])
    assert [n.op for n in matmul_to_gemm(before).nodes] == ["matmul"]


# ----------------------------------------------------------------------------- compiled, and the kernels
def test_compiled_block_matches_eager_on_cpu(tmp_path):
    pytest.importorskip("tvm")
    import fuselm

    model = MaskedFillBlock().eval()
    compiled = fuselm.compile(model, block_inputs(MaskedFillBlock, T), target="cpu", dynamic={"x": {1: "T"}},
                              cache_dir=str(tmp_path))
    assert [n.attrs["causal"] for n in compiled.graph.nodes if n.op == "attention"] == [True]
    for tokens in (T, 20):
        (x,) = block_inputs(MaskedFillBlock, tokens)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_compiled_fully_masked_rows_are_zeros_as_in_eager(tmp_path):
    """The NaN-guarded spelling fused: rows with every key masked give what eager's guard
    gives (zeros), in the cpu kernels too."""
    pytest.importorskip("tvm")
    import fuselm

    model = OnnxSpelledBlock().eval()
    compiled = fuselm.compile(model, block_inputs(OnnxSpelledBlock, T), target="cpu", strict=True,
                              cache_dir=str(tmp_path))
    assert compiled.graph.op_counts().get("attention") == 1 and "isnan" not in compiled.graph.op_counts()
    inputs = block_inputs(OnnxSpelledBlock, T)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GELU written out
def _erf_half_last(x):
    return x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5  # ONNX exports of F.gelu


def _erf_half_first(x):
    return 0.5 * x * (1.0 + torch.erf(x * (1 / math.sqrt(2.0))))


def _tanh_new_gelu(x):  # GPT-2's NewGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _tanh_half_on_sum(x):
    return x * (0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))))


class WrittenGelu(torch.nn.Module):
    """gelu(x @ W.t() + b), the GELU written out; `conv1d`: GPT-2's Conv1D, addmm on the
    rows viewed flat and viewed back before the activation."""

    def __init__(self, gelu, conv1d: bool):
        super().__init__()
        self.gelu, self.conv1d = gelu, conv1d
        self.W, self.b = torch.nn.Parameter(torch.randn(4 * D, D) * 0.3), torch.nn.Parameter(torch.randn(4 * D))

    def forward(self, x):
        if self.conv1d:
            h = torch.addmm(self.b, x.reshape(-1, D), self.W.t()).view(*x.shape[:-1], 4 * D)
        else:
            h = x @ self.W.t() + self.b
        return self.gelu(h)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("gelu, step", [(_erf_half_last, "gelu"), (_erf_half_first, "gelu"),
                                        (_tanh_new_gelu, "gelu_tanh"), (_tanh_half_on_sum, "gelu_tanh")],
                         ids=["erf_half_last", "erf_half_first", "tanh_new_gelu", "tanh_half_on_sum"])
def test_written_out_gelu_is_the_gemms_epilogue(gelu, step, conv1d):
    model = WrittenGelu(gelu, conv1d).eval()
    x = torch.randn(2, T, D)
    fused = run_passes(capture(model, (x,), {"x": {1: ("T", 1, 16)}}), pipeline("cpu"))
    assert [n.attrs.get("epilogue") for n in fused.nodes if n.op == "gemm"] == [("bias", step)]
    assert not {"erf", "tanh", "pow", "gelu"} & set(fused.op_counts())
    for tokens in (T, 11):
        x = torch.randn(2, tokens, D)
        with torch.no_grad():
            torch.testing.assert_close(ir.interpret(fused, x), model(x), atol=1e-5, rtol=1e-5)


def test_gelu_like_formulas_that_are_not_gelu_stay():
    """A 0.6 for the ½, or erf(x/2): other functions, left as they are."""
    for other in (lambda x: 0.6 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
                  lambda x: 0.5 * x * (1.0 + torch.erf(x / 2.0))):
        model = WrittenGelu(other, conv1d=False).eval()
        fused = run_passes(capture(model, (torch.randn(2, T, D),)), pipeline("cpu"))
        assert "erf" in fused.op_counts() and "gelu" not in fused.op_counts()


def causal_attention_group(heads: int, kv_heads: int, s_k: str = "S"):
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", heads, "S", 16), "f32"))
    k = b.input("k", TensorType(("B", kv_heads, s_k, 16), "f32"))
    v = b.input("v", TensorType(("B", kv_heads, s_k, 16), "f32"))
    return b.build([b.op("attention", q, k, v, causal=True, scale=0.25, gqa=heads != kv_heads)])


def assert_causal_like_torch(kernel, heads, kv_heads, lengths, device="cpu"):
    for s_q, s_k in lengths:
        q = torch.randn(2, heads, s_q, 16)
        k, v = torch.randn(2, kv_heads, s_k, 16), torch.randn(2, kv_heads, s_k, 16)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=heads != kv_heads)
        got = kernel.run(q.to(device), k.to(device), v.to(device)).cpu()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cpu_causal_attention_is_torchs_is_causal(heads, kv_heads):
    """The query-tile kernel, S_q == S_k across tile and chunk edges; and S_q > S_k,
    whose last key chunk is padding no row may see."""
    pytest.importorskip("tvm")
    from fuselm.codegen import tvm as cpu

    same = cpu.emit(causal_attention_group(heads, kv_heads))
    assert_causal_like_torch(same, heads, kv_heads, [(1, 1), (7, 7), (16, 16), (33, 33), (70, 70)])
    other = cpu.emit(causal_attention_group(heads, kv_heads, s_k="SK"))
    assert_causal_like_torch(other, heads, kv_heads, [(20, 5), (40, 33), (5, 20)])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_triton_causal_attention_is_torchs_is_causal(heads, kv_heads, tmp_path):
    from fuselm.codegen import triton as triton_codegen

    kernel = triton_codegen.emit(causal_attention_group(heads, kv_heads), str(tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # else Triton's interpreter (conftest)
    assert_causal_like_torch(kernel, heads, kv_heads, [(7, 7), (33, 33)], device)


def test_sibling_rule_leaves_a_gemm_with_an_epilogue_beside_other_readers():
    """Falcon: a gemm with an activation epilogue whose input another op reads too; the
    sibling rule once looked for the weight of that other op (an IndexError)."""
    from fuselm.passes.fuse_sibling_gemms import fuse_sibling_gemms

    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    act = b.op("gemm", x, b.constant("w", torch.randn(16, 8)), epilogue=("relu",))
    graph = b.build([act, b.op("reshape", x, shape=(ir.symbol("T"), 2, 4))])
    assert fuse_sibling_gemms(graph) is graph


# ----------------------------------------------------------------------------- whole models, strict
class UserGPT(torch.nn.Module):
    """A small GPT in the unusual style, `layers` blocks of width `d`: an embedding, pre-LN
    blocks with `x @ W.t()` linears, chunked qkv and manual attention under a causal mask
    built in forward, a tied head."""

    def __init__(self, d: int, heads: int, layers: int, vocab: int = 50):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Parameter(torch.randn(vocab, d) * 0.2)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.ln1, block.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            block.qkv = torch.nn.Parameter(torch.randn(3 * d, d) * d ** -0.5)
            block.out = torch.nn.Parameter(torch.randn(d, d) * d ** -0.5)
            block.up = torch.nn.Parameter(torch.randn(4 * d, d) * d ** -0.5)
            block.down = torch.nn.Parameter(torch.randn(d, 4 * d) * (4 * d) ** -0.5)
            self.blocks.append(block)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids):
        B, T = ids.shape
        x = self.embed[ids]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for block in self.blocks:
            q, k, v = (block.ln1(x) @ block.qkv.t()).chunk(3, dim=-1)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            x = x + (weights @ v).transpose(1, 2).reshape(B, T, -1) @ block.out.t()
            x = x + F.gelu(block.ln2(x) @ block.up.t()) @ block.down.t()
        return self.norm(x) @ self.embed.t()


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("d, heads, layers", [(32, 4, 1), (48, 6, 2)])
def test_user_written_gpt_compiles_strict_and_fuses_its_attention(d, heads, layers, target, tmp_path):
    import fuselm

    torch.manual_seed(0)
    model = UserGPT(d, heads, layers).eval()
    compiled = fuselm.compile(model, target=target, strict=True, cache_dir=str(tmp_path))
    for tokens in (7, 12):  # the second length recompiles once, with T symbolic
        ids = torch.randint(0, 50, (2, tokens))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids), atol=1e-4, rtol=1e-4)
    attention = [n for n in compiled.graph.nodes if n.op == "attention"]
    assert len(attention) == layers and all(n.attrs["causal"] and len(n.inputs) == 3 for n in attention)
    assert "matmul" not in compiled.graph.op_counts() and compiled.fallbacks == {}
