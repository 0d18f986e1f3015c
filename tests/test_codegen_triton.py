"""The `cuda` emitters, run in Triton's interpreter on CPU against `ir.interpret`.

Shapes are tiny and odd (they do not divide the tiles); each kernel is emitted once
and run at two values of its symbolic dimension.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fuselm import ir  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType  # noqa: E402
from fuselm.ir.types import evaluate_dim  # noqa: E402
from fuselm.errors import UnsupportedKernelError  # noqa: E402

from fuselm.codegen import triton as triton_codegen  # noqa: E402
from tiny_models import gemm_group  # noqa: E402

# masked-off lanes of a tile hold placeholder values (log(0), 0/0) that the interpreter warns about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


def random_inputs(group, sizes: dict, seed=0, **overrides):
    """A tensor per group input, symbols bound by `sizes`; `overrides` by input name."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for value in group.inputs:
        if value.name in overrides:
            out.append(overrides[value.name])
            continue
        shape = [evaluate_dim(d, {ir.symbol(k): v for k, v in sizes.items()}) for d in value.type.shape]
        out.append(torch.randn(shape, generator=gen).to(value.type.torch_dtype))
    return out


def assert_matches(kernel, group, args, atol=1e-4, rtol=1e-4):
    expected = ir.interpret(group, *[a.clone() for a in args])
    got = kernel.run(*args)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)
    return got


# ----------------------------------------------------------------------------- gemm
@pytest.mark.parametrize("steps", [
    (), ("bias",), ("relu",), ("gelu",), ("gelu_tanh",), ("silu",), ("residual",),
    ("bias", "gelu", "residual"), ("gated_silu",), ("bias", "relu", "gated_silu", "residual"),
])
def test_gemm_epilogue_steps_two_token_counts(steps, kernel_dir):
    group = gemm_group(40, 72, steps)
    kernel = triton_codegen.emit(group, kernel_dir)
    assert kernel.name == "_".join(["gemm", "k40", f"n{36 if 'gated_silu' in steps else 72}", *steps, "f32"])
    for tokens in (5, 70):  # the GEMV-like tile and the large one
        assert_matches(kernel, group, random_inputs(group, {"T": tokens}))


def test_gemm_bf16_gated_and_rank3_input(kernel_dir):
    group = gemm_group(48, 80, ("bias", "gated_silu", "residual"), "bf16", lead=("B", "S"))
    kernel = triton_codegen.emit(group, kernel_dir)
    for b, s in ((1, 3), (2, 19)):
        assert_matches(kernel, group, random_inputs(group, {"B": b, "S": s}), atol=0.5, rtol=2e-2)


def test_gemm_reads_a_strided_input(kernel_dir):
    group = gemm_group(24, 40, ("bias",))
    kernel = triton_codegen.emit(group, kernel_dir)
    x, w, bias = random_inputs(group, {"T": 9})
    wide = torch.randn(9, 3 * 24)
    x = wide[:, 24:48]  # a column slice, row stride 72
    torch.testing.assert_close(kernel.run(x, w, bias), torch.nn.functional.linear(x, w, bias), atol=1e-4, rtol=1e-4)


def test_identical_groups_give_identical_source(kernel_dir):
    first = triton_codegen.emit(gemm_group(40, 72, ("bias", "gelu")), kernel_dir)
    again = triton_codegen.emit(gemm_group(40, 72, ("bias", "gelu")), kernel_dir)
    other = triton_codegen.emit(gemm_group(40, 72, ("bias", "gelu_tanh")), kernel_dir)
    assert first.source == again.source and first.name == again.name
    assert other.source != first.source and other.name != first.name
    assert first.target == "cuda" and first.source_ext == "py" and first.ops == ("gemm",)
    assert open(first.source_path).read() == first.source
    assert "def launch(x, w, bias)" in first.source and "@triton.jit" in first.source


# ----------------------------------------------------------------------------- norms
def norm_group(op, n, n_params, residual, dtype="f32", eps=1e-5):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", n), dtype))
    params = [b.input(f"p{i}", TensorType((n,), dtype)) for i in range(n_params)]
    extra = [b.input("residual", TensorType(("T", n), dtype))] if residual else []
    return b.build([b.op(op, x, *params, *extra, eps=eps, residual=residual)])


@pytest.mark.parametrize("op, n_params, residual, dtype", [
    ("rms_norm", 1, False, "f32"), ("rms_norm", 1, True, "f32"), ("rms_norm", 0, False, "f32"),
    ("layer_norm", 2, False, "f32"), ("layer_norm", 2, True, "f32"), ("layer_norm", 1, False, "f32"),
    ("rms_norm", 1, True, "bf16"),
])
def test_norms(op, n_params, residual, dtype, kernel_dir):
    group = norm_group(op, 45, n_params, residual, dtype)
    kernel = triton_codegen.emit(group, kernel_dir)
    tol = 2e-2 if dtype == "bf16" else 1e-4
    for tokens in (1, 6):
        out = assert_matches(kernel, group, random_inputs(group, {"T": tokens}), atol=tol, rtol=tol)
        assert out.shape == ((2, tokens, 45) if residual else (tokens, 45))


def test_rms_norm_default_eps_is_the_dtypes():
    group = norm_group("rms_norm", 16, 1, False, eps=None)
    assert "EPS = 1.1920928955078125e-07" in triton_codegen.norm.generate(group.nodes[0]).body


# ----------------------------------------------------------------------------- attention
def attention_group(heads, kv_heads, d, causal=False, mask=None, dtype="f32", scale=None, s_k="S"):
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", heads, "S", d), dtype))
    k = b.input("k", TensorType(("B", kv_heads, s_k, d), dtype))
    v = b.input("v", TensorType(("B", kv_heads, s_k, d), dtype))
    extra = [b.input("mask", TensorType(mask[0], mask[1]))] if mask else []
    node = b.op("attention", q, k, v, *extra, causal=causal, scale=scale, gqa=heads != kv_heads)
    return b.build([node])


@pytest.mark.parametrize("seqs", [(7,), (70,)])
def test_causal_attention_gqa(seqs, kernel_dir):
    group = attention_group(4, 2, 16, causal=True)
    kernel = triton_codegen.emit(group, kernel_dir)
    assert kernel.name == "attention_h4_kv2_d16_causal_f32"
    for s in seqs:
        assert_matches(kernel, group, random_inputs(group, {"B": 2, "S": s}))


def test_attention_bool_padding_mask(kernel_dir):
    group = attention_group(2, 2, 24, mask=(("B", 1, 1, "S"), "bool"), scale=0.3)
    kernel = triton_codegen.emit(group, kernel_dir)
    for s in (5, 37):
        q, k, v, _ = random_inputs(group, {"B": 2, "S": s})
        lengths = torch.tensor([s, s // 2 + 1])
        mask = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
        assert_matches(kernel, group, [q, k, v, mask])


def test_attention_additive_mask_gqa_bf16(kernel_dir):
    group = attention_group(6, 2, 32, mask=(("B", 6, "S", "S"), "f32"), dtype="bf16")
    kernel = triton_codegen.emit(group, kernel_dir)
    q, k, v, mask = random_inputs(group, {"B": 1, "S": 21})
    mask[..., 3] = -math.inf
    assert_matches(kernel, group, [q, k, v, mask], atol=3e-2, rtol=3e-2)


def test_attention_causal_and_mask_with_fully_masked_rows_f16(kernel_dir):
    group = attention_group(2, 1, 16, causal=True, mask=(("B", 1, "S", "S"), "bool"), dtype="f16")
    kernel = triton_codegen.emit(group, kernel_dir)
    q, k, v, _ = random_inputs(group, {"B": 2, "S": 9})
    mask = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[:, :, :, 0] = False  # row 0 sees only key 0 (causal), which is masked: output 0
    assert_matches(kernel, group, [q, k, v, mask], atol=2e-3, rtol=2e-3)


def test_attention_on_permuted_views_of_projections(kernel_dir):
    """BERT's layout: [B, S, H*D] projections viewed as heads; no copies on the way in or out."""
    B_, S_ = ir.symbol("B"), ir.symbol("S")
    b = GraphBuilder()
    qkv = [b.input(n, TensorType(("B", "S", 32), "f32")) for n in ("q", "k", "v")]
    heads = [b.op("permute", b.op("reshape", t, shape=(B_, S_, 2, 16)), dims=(0, 2, 1, 3)) for t in qkv]
    out = b.op("attention", *heads, causal=False, scale=0.25, gqa=False)
    group = b.build([b.op("reshape", b.op("permute", out, dims=(0, 2, 1, 3)), shape=(B_, S_, 32))])
    kernel = triton_codegen.emit(group, kernel_dir)
    assert ".permute(0, 2, 1, 3)" in kernel.source
    for s in (4, 19):
        assert_matches(kernel, group, random_inputs(group, {"B": 2, "S": s}))


def test_attention_more_keys_than_queries(kernel_dir):
    group = attention_group(2, 1, 16, s_k="S_K")
    kernel = triton_codegen.emit(group, kernel_dir)
    assert_matches(kernel, group, random_inputs(group, {"B": 1, "S": 3, "S_K": 50}))


# ----------------------------------------------------------------------------- paged KV cache
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2


def paged_layout(q_lens, context_lens, block_size, num_blocks, seed=0):
    """Random block tables, and the slot of each new token (the last q_len of its context)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-c // block_size) for c in context_lens]
    max_blocks = max(blocks_needed)
    order = torch.randperm(num_blocks, generator=gen)
    tables, slots, used = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32), [], 0
    for n, (q_len, ctx) in enumerate(zip(q_lens, context_lens)):
        tables[n, : blocks_needed[n]] = order[used : used + blocks_needed[n]].to(torch.int32)
        used += blocks_needed[n]
        for pos in range(ctx - q_len, ctx):
            slots.append(int(tables[n, pos // block_size]) * block_size + pos % block_size)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return tables, torch.tensor(context_lens, dtype=torch.int32), cu, torch.tensor(slots, dtype=torch.int64)


def rope_tables(tokens, d, seed=1):
    angles = torch.rand(tokens, d // 2, generator=torch.Generator().manual_seed(seed)) * 6
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def paged_attention_group(dtype="f32", rope=False, scale=0.25, layer=1):
    b = GraphBuilder()
    q = b.input("query", TensorType(("T", HEADS, HEAD_DIM), dtype))
    cache = b.input("kv_cache", TensorType((LAYERS, 2, "NB", "BS", KV_HEADS, HEAD_DIM), dtype))
    tables = b.input("block_tables", TensorType(("N", "MB"), "i32"))
    lens = b.input("context_lens", TensorType(("N",), "i32"))
    cu = b.input("cu_seqlens_q", TensorType(("N+1",), "i32"))
    extra = [b.input("cos", TensorType(("T", HEAD_DIM), dtype)), b.input("sin", TensorType(("T", HEAD_DIM), dtype))] if rope else []
    return b.build([b.op("paged_attention", q, cache, tables, lens, cu, *extra, layer=layer, scale=scale, rope=rope)])


@pytest.mark.parametrize("block_size", [1, 16])
def test_paged_attention_with_cached_context(block_size, kernel_dir):
    group = paged_attention_group()
    kernel = triton_codegen.emit(group, kernel_dir)
    # (new tokens, context) per sequence: cached context, a fresh prompt, a decode step, an empty one
    for q_lens, ctx in (([5, 9, 1, 0], [12, 9, 30, 4]), ([3, 1], [3, 40])):
        num_blocks = sum(-(-c // block_size) for c in ctx) + 3
        tables, lens, cu, _ = paged_layout(q_lens, ctx, block_size, num_blocks)
        cache = torch.randn(LAYERS, 2, num_blocks, block_size, KV_HEADS, HEAD_DIM)
        query = torch.randn(sum(q_lens), HEADS, HEAD_DIM)
        assert_matches(kernel, group, [query, cache, tables, lens, cu])


def test_paged_attention_rope_bf16(kernel_dir):
    group = paged_attention_group("bf16", rope=True, layer=0)
    kernel = triton_codegen.emit(group, kernel_dir)
    q_lens, ctx, block_size = [7, 2], [7, 20], 4
    tables, lens, cu, _ = paged_layout(q_lens, ctx, block_size, 12, seed=3)
    cache = torch.randn(LAYERS, 2, 12, block_size, KV_HEADS, HEAD_DIM).bfloat16()
    query = torch.randn(9, HEADS, HEAD_DIM).bfloat16()
    cos, sin = rope_tables(9, HEAD_DIM)
    assert_matches(kernel, group, [query, cache, tables, lens, cu, cos.bfloat16(), sin.bfloat16()], atol=3e-2, rtol=3e-2)


def kv_cache_write_group(rope=False, layer=1):
    b = GraphBuilder()
    cache = b.input("kv_cache", TensorType((LAYERS, 2, "NB", "BS", KV_HEADS, HEAD_DIM), "f32"))
    k = b.input("key", TensorType(("T", KV_HEADS, HEAD_DIM), "f32"))
    v = b.input("value", TensorType(("T", KV_HEADS, HEAD_DIM), "f32"))
    slots = b.input("slot_mapping", TensorType(("T",), "i64"))
    extra = [b.input("cos", TensorType(("T", HEAD_DIM), "f32")), b.input("sin", TensorType(("T", HEAD_DIM), "f32"))] if rope else []
    return b.build([b.op("kv_cache_write", cache, k, v, slots, *extra, layer=layer, rope=rope)])


@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_write_in_place_from_strided_views(rope, kernel_dir):
    group = kv_cache_write_group(rope)
    kernel = triton_codegen.emit(group, kernel_dir)
    tokens = 6
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)  # one fused projection
    split = [HEADS * HEAD_DIM, (HEADS + KV_HEADS) * HEAD_DIM]
    key = qkv[:, split[0] : split[1]].reshape(tokens, KV_HEADS, HEAD_DIM)
    value = qkv[:, split[1] :].reshape(tokens, KV_HEADS, HEAD_DIM)
    assert not key.is_contiguous()
    slots = torch.tensor([5, 0, -1, 17, 9, 30])  # -1: a padding token
    cache = torch.randn(LAYERS, 2, 8, 4, KV_HEADS, HEAD_DIM)
    extra = list(rope_tables(tokens, HEAD_DIM)) if rope else []
    expected = ir.interpret(group, cache.clone(), key, value, slots, *extra)
    result = kernel.run(cache, key, value, slots, *extra)
    assert result is cache  # written in place
    torch.testing.assert_close(cache, expected, atol=1e-5, rtol=1e-5)


def test_write_then_attend_through_qkv_views(kernel_dir):
    """A group with views of one fused qkv output: the runtime passes qkv, not copies."""
    b = GraphBuilder()
    qkv = b.input("qkv", TensorType(("T", (HEADS + 2 * KV_HEADS) * HEAD_DIM), "f32"))
    cache = b.input("kv_cache", TensorType((LAYERS, 2, "NB", "BS", KV_HEADS, HEAD_DIM), "f32"))
    names = ("block_tables", "context_lens", "cu_seqlens_q")
    tables, lens, cu = (b.input(n, TensorType(s, "i32")) for n, s in zip(names, [("N", "MB"), ("N",), ("N+1",)]))
    cos, sin = (b.input(n, TensorType(("T", HEAD_DIM), "f32")) for n in ("cos", "sin"))
    q = b.op("slice", qkv, dim=1, start=0, end=HEADS * HEAD_DIM)
    q = b.op("reshape", q, shape=(ir.symbol("T"), HEADS, HEAD_DIM))
    attend = b.build([b.op("reshape", b.op("paged_attention", q, cache, tables, lens, cu, cos, sin, layer=0, scale=0.25, rope=True),
                           shape=(ir.symbol("T"), HEADS * HEAD_DIM))])
    kernel = triton_codegen.emit(attend, kernel_dir)
    assert "view0 = in0[:, 0:64]" in kernel.source and kernel.ops == ("slice", "reshape", "paged_attention", "reshape")
    q_lens, ctx = [4, 3], [4, 10]
    tables_t, lens_t, cu_t, _ = paged_layout(q_lens, ctx, 2, 9)
    cos_t, sin_t = rope_tables(7, HEAD_DIM)
    args = [torch.randn(7, (HEADS + 2 * KV_HEADS) * HEAD_DIM), torch.randn(LAYERS, 2, 9, 2, KV_HEADS, HEAD_DIM),
            tables_t, lens_t, cu_t, cos_t, sin_t]
    assert_matches(kernel, attend, args)


# ----------------------------------------------------------------------------- pointwise
def test_pointwise_group_with_broadcast_scalars_and_where(kernel_dir):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 12), "f32"))
    y = b.input("y", TensorType((12,), "bf16"))
    z = b.input("z", TensorType(("T", 1), "f32"))
    h = b.op("mul", b.op("add", x, y), scalar=0.5)
    h = b.op("sub", h, scalar=2.0, reverse=True)
    h = b.op("where", b.op("gt", h, z), b.op("gelu", h, approximate="tanh"), b.op("exp", z))
    h = b.op("masked_fill", b.op("silu", h), b.op("lt", x, scalar=-1.0), value=-math.inf)
    group = b.build([b.op("cast", b.op("exp", h), dtype="bf16")])
    kernel = triton_codegen.emit(group, kernel_dir)
    for tokens in (3, 100):
        assert_matches(kernel, group, random_inputs(group, {"T": tokens}), atol=2e-2, rtol=2e-2)


UNARY = ["neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "erf", "sigmoid", "relu", "silu"]


def test_every_pointwise_op(kernel_dir):
    """One kernel per op; positive inputs where the op needs them."""
    positive = torch.rand(3, 5) + 0.5
    signed = torch.randn(3, 5) * 3
    for op in UNARY:
        b = GraphBuilder()
        x = b.input("x", TensorType(("T", 5), "f32"))
        group = b.build([b.op(op, x)])
        kernel = triton_codegen.emit(group, kernel_dir)
        assert_matches(kernel, group, [positive if op in ("log", "sqrt", "rsqrt") else signed])
    for op in ("add", "sub", "mul", "div", "maximum", "minimum", "eq", "lt", "ge", "logical_and", "pow"):
        b = GraphBuilder()
        x, y = b.input("x", TensorType(("T", 5), "f32")), b.input("y", TensorType((5,), "i32"))
        with_scalar = b.op(op, x, scalar=2) if op != "logical_and" else x  # the reference takes no scalar there
        group = b.build([b.op(op, with_scalar, y) if op != "pow" else with_scalar])
        kernel = triton_codegen.emit(group, kernel_dir)
        y_values = torch.tensor([4, 1, -2, 3, 2], dtype=torch.int32)
        assert_matches(kernel, group, [signed.round(), y_values])


def test_pointwise_integer_and_bool_values(kernel_dir):
    b = GraphBuilder()
    ids = b.input("ids", TensorType(("T",), "i64"))
    keep = b.input("keep", TensorType(("T",), "bool"))
    shifted = b.op("add", b.op("mul", ids, scalar=3), scalar=-4)
    group = b.build([b.op("logical_or", b.op("logical_not", keep), b.op("gt", shifted, scalar=5))])
    kernel = triton_codegen.emit(group, kernel_dir)
    out = assert_matches(kernel, group, [torch.arange(7), torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)])
    assert out.dtype == torch.bool
    b = GraphBuilder()
    x = b.input("x", TensorType(("T",), "f32"))
    group = b.build([b.op("cast", b.op("mul", x, scalar=2.5), dtype="i32")])
    assert_matches(triton_codegen.emit(group, kernel_dir), group, [torch.randn(9) * 4])


def test_pointwise_moves_elements_through_views_concat_gathers_and_rope(kernel_dir):
    T_ = ir.symbol("T")
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4, 6), "f32"))
    table = b.input("table", TensorType((10, 6), "f32"))
    ids = b.input("ids", TensorType(("T",), "i32"))
    cos, sin = b.input("cos", TensorType(("T", 6), "f32")), b.input("sin", TensorType(("T", 6), "f32"))
    roped = b.op("rope", b.op("exp", x), cos, sin)  # [T, 4, 6]
    heads = b.op("slice", b.op("permute", roped, dims=(1, 0, 2)), dim=0, start=1, end=4, step=2)  # [2, T, 6]
    rows = b.op("expand", b.op("reshape", b.op("embedding", table, ids), shape=(1, T_, 6)), shape=(2, T_, 6))
    both = b.op("concat", heads, b.op("mul", rows, scalar=-1.0), dim=2)  # [2, T, 12]
    group = b.build([b.op("add", b.op("select", both, dim=0, index=-1), b.op("full", shape=(12,), value=0.5, dtype="f32"))])
    kernel = triton_codegen.emit(group, kernel_dir)
    for tokens in (3, 7):
        args = random_inputs(group, {"T": tokens}, ids=torch.randint(0, 10, (tokens,), dtype=torch.int32))
        assert_matches(kernel, group, args)


def test_unsupported_group_is_a_clear_error(kernel_dir):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    w = b.input("w", TensorType((8, 8), "f32"))
    group = b.build([b.op("exp", b.op("matmul", x, w))])  # partition never fuses into a matmul
    with pytest.raises(UnsupportedKernelError, match="no Triton emitter"):
        triton_codegen.emit(group, kernel_dir)


# ----------------------------------------------------------------------------- whole models
def run_on_triton(graph, kernel_dir, *inputs):
    """The partitioned graph, every kernel generated by this backend."""
    from fuselm.passes.partition import partition
    from fuselm.runtime.executor import Executor

    steps = partition(graph)
    return Executor(graph, steps, lambda step: triton_codegen.emit(step.graph, kernel_dir).run)(*inputs)


def test_tiny_llama_runs_on_triton_kernels(kernel_dir):
    from fuselm.models.contract import pack_prompts
    from fuselm.passes import run_passes
    from tiny_models import captured, tiny_llama

    config, model = tiny_llama(num_layers=2)
    graph = run_passes(captured(config, model))
    prompts = [[5, 9, 2], [7, 1, 1, 4, 3, 8, 2], [11]]
    expected_logits, expected_cache = ir.interpret(graph, *pack_prompts(config, prompts, all_logits=True).as_tuple())
    inputs = pack_prompts(config, prompts, all_logits=True)
    logits, cache = run_on_triton(graph, kernel_dir, *inputs.as_tuple())
    assert cache is inputs.kv_cache  # each layer's kv_cache_write wrote its [1, ...] view in place
    torch.testing.assert_close(cache, expected_cache, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_tiny_bert_runs_on_triton_kernels(kernel_dir):
    from fuselm.frontend import capture
    from fuselm.models import bert
    from fuselm.models.config import BertConfig
    from fuselm.models.contract import capture_example
    from fuselm.passes import run_passes

    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    example, dynamic = capture_example(config)
    graph = run_passes(capture(bert.BertModel(config).eval(), example, dynamic))
    ids, mask = torch.randint(0, 97, (3, 9)), torch.ones(3, 9, dtype=torch.int64)
    mask[2, 4:] = 0
    torch.testing.assert_close(run_on_triton(graph, kernel_dir, ids, mask), ir.interpret(graph, ids, mask), atol=1e-4, rtol=1e-4)


def test_load_reimports_what_emit_wrote(tmp_path):
    group = gemm_group(16, 24, ("bias", "silu"))
    emitted = triton_codegen.emit(group, tmp_path / "staging")
    (tmp_path / "staging").rename(tmp_path / "entry")  # what the kernel cache does
    loaded = triton_codegen.load(group, tmp_path / "entry")
    assert loaded.name == emitted.name and loaded.source == emitted.source
    assert loaded.source_path == str(tmp_path / "entry" / f"{emitted.name}.py")
    args = random_inputs(group, {"T": 3})
    torch.testing.assert_close(loaded.run(*args), ir.interpret(group, *args))
