"""The cpu (TVM) emitters against the reference interpreter.

Every kernel is built once and run at two or more values of each symbolic dimension
(odd sizes, never multiples of the tile sizes); `build_count` proves nothing was
rebuilt. Shapes are small so the file runs in well under a minute.
"""
import math
import random

import pytest
import torch

from fuselm import ir  # noqa: E402
from fuselm.codegen import tvm as cpu  # noqa: E402
from fuselm.codegen.tvm import elementwise, norm, paged  # noqa: E402
from fuselm.codegen.tvm.build import SERIAL_MAX  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType, symbol  # noqa: E402
from tiny_models import gemm_group  # noqa: E402

T, B, S = symbol("T"), symbol("B"), symbol("S")


def check(group, make_args, sizes, rtol=1e-4, atol=1e-5):
    """Build `group` once; compare with the interpreter at each size, running both the
    serial twin (small sizes pick it) and the parallel form; return the kernel."""
    kernel = cpu.emit(group)
    builds = cpu.build_count()
    for size in sizes:
        args = make_args(size)
        expected = ir.interpret(group, *[a.clone() for a in args])
        for serial_max in (SERIAL_MAX, 0):  # 0: every kernel takes its parallel form
            with pytest.MonkeyPatch.context() as patch:
                for module in (elementwise, norm, paged):
                    patch.setattr(module, "SERIAL_MAX", serial_max)
                out = kernel.run(*[a.clone() for a in args])
            assert out.shape == expected.shape and out.dtype == expected.dtype
            torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    assert cpu.build_count() == builds, "a new size rebuilt the kernel"
    assert kernel.target == "cpu" and kernel.source_ext == "tir" and "T.prim_func" in kernel.source
    assert set(kernel.extra_sources) == {"ll", "s"}
    return kernel


# ----------------------------------------------------------------------------- gemm
def random_inputs(group, bindings):
    """Random tensors for a group's inputs, symbols bound from `bindings`."""
    return [torch.randn([d if isinstance(d, int) else int(d.subs(bindings)) for d in v.type.shape])
            for v in group.inputs]


@pytest.mark.parametrize("K,N,steps", [
    (37, 22, ("bias", "relu")),
    (29, 50, ("gelu",)),
    (40, 46, ("bias", "gelu_tanh")),
    (24, 30, ("silu", "residual")),
    (37, 26, ("bias", "gated_silu", "residual")),
])
def test_gemm_epilogues_one_build_all_row_counts(K, N, steps):
    group = gemm_group(K, N, steps)
    # 1 row -> gemv1, 7 -> gemv (2x4 tiles), 37 -> packed gemm (6-row tiles, a tail)
    kernel = check(group, lambda m: random_inputs(group, {T: m}), [1, 7, 37])
    assert kernel.ops == ("gemm",) and kernel.name.startswith(f"gemm_k{K}_")


def test_gemm_flattens_leading_dims_and_takes_strided_inputs():
    group = gemm_group(16, 24, ("residual",), lead=("B", "S"))
    kernel = check(group, lambda bs: random_inputs(group, {B: bs[0], S: bs[1]}), [(2, 3), (3, 11)])
    x = torch.randn(3, 5, 32)[..., ::2]  # strided: the kernel takes a compact copy
    w, residual = torch.randn(24, 16), torch.randn(3, 5, 24)
    torch.testing.assert_close(kernel.run(x, w, residual), ir.interpret(group, x, w, residual), rtol=1e-4, atol=1e-5)


def test_gemm_with_views_around_it():
    b = GraphBuilder()
    x = b.input("x", TensorType(("B", "S", 8), "f32"))
    w = b.input("w", TensorType((12, 8), "f32"))
    y = b.op("gemm", b.op("permute", x, dims=(1, 0, 2)), w, epilogue=("relu",))
    group = b.build([b.op("select", b.op("reshape", y, shape=(S, B, 3, 4)), dim=2, index=1)])
    kernel = check(group, lambda bs: random_inputs(group, {B: bs[0], S: bs[1]}), [(2, 3), (1, 5)])
    assert kernel.ops == ("permute", "gemm", "reshape", "select")


def test_gemm_schedule_is_tiled_vectorized_parallel():
    kernel = cpu.emit(gemm_group(64, 96, ("bias", "gelu")))
    assert kernel.source.count("T.parallel") >= 3 and "T.vectorized" in kernel.source
    assert "vfmadd" in kernel.extra_sources["s"] and "erff" not in kernel.extra_sources["s"]


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("op,params", [("rms_norm", 1), ("rms_norm", 0), ("layer_norm", 2), ("layer_norm", 1)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("D", [37, 48])
def test_norms(op, params, residual, D):
    b = GraphBuilder()
    x = b.input("x", TensorType(("B", "S", D), "f32"))
    inputs = [b.input(n, TensorType((D,), "f32")) for n in ("w", "b")[:params]]
    if residual:
        inputs.append(b.input("r", TensorType(("B", "S", D), "f32")))
    group = b.build([b.op(op, x, *inputs, eps=1e-6, residual=residual)])

    def make(bs):
        args = random_inputs(group, {B: bs[0], S: bs[1]})
        args[0] = args[0] * 3 + 1  # a mean and a scale far from 0 and 1
        return args

    kernel = check(group, make, [(1, 1), (2, 7), (3, 19)])
    assert kernel.name == f"{op}_d{D}" + ("_residual" if residual else "")


def test_rms_norm_default_eps():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 40), "f32"))
    group = b.build([b.op("rms_norm", x, b.input("w", TensorType((40,), "f32")))])
    check(group, lambda t: random_inputs(group, {T: t}), [1, 6])


# ----------------------------------------------------------------------------- elementwise
def test_llama_rope_chain():
    """positions -> inv_freq outer product -> concat -> cos/sin -> rope of q [T, H, D]."""
    half, heads = 8, 3
    b = GraphBuilder()
    positions = b.input("positions", TensorType(("T",), "i64"))
    inv_freq = b.input("inv_freq", TensorType((half,), "f32"))
    q = b.input("q", TensorType(("T", heads * 2 * half), "f32"))
    angles = b.op("mul", b.op("reshape", b.op("cast", positions, dtype="f32"), shape=(T, 1)),
                  b.op("reshape", inv_freq, shape=(1, half)))
    emb = b.op("concat", angles, angles, dim=-1)
    q3 = b.op("reshape", q, shape=(T, heads, 2 * half))
    out = b.op("rope", q3, b.op("cos", emb), b.op("sin", emb))
    group = b.build([out])

    def make(t):
        return [torch.randint(0, 2048, (t,)), 1.0 / 10000 ** (torch.arange(half) / half), torch.randn(t, heads * 2 * half)]

    check(group, make, [1, 13], rtol=1e-4, atol=1e-4)


def test_bert_mask_building():
    """(1 - mask[B, S]) * finfo.min, as [B, 1, 1, S], and the bool form with where."""
    b = GraphBuilder()
    mask = b.input("attention_mask", TensorType(("B", "S"), "i64"))
    m4 = b.op("reshape", b.op("cast", mask, dtype="f32"), shape=(B, 1, 1, S))
    additive = b.op("mul", b.op("sub", m4, scalar=1.0, reverse=True), scalar=torch.finfo(torch.float32).min)
    group = b.build([additive])
    check(group, lambda bs: [torch.randint(0, 2, bs)], [(1, 3), (4, 9)])
    b = GraphBuilder()
    mask = b.input("attention_mask", TensorType(("B", "S"), "i64"))
    keep = b.op("expand", b.op("reshape", b.op("ne", mask, scalar=0), shape=(B, 1, 1, S)), shape=(B, 1, S, S))
    zero = b.op("full", shape=(), value=0.0, dtype="f32")
    group = b.build([b.op("where", keep, zero, b.op("full", shape=(), value=-math.inf, dtype="f32"))])
    check(group, lambda bs: [torch.randint(0, 2, bs)], [(1, 3), (2, 5)])


@pytest.mark.parametrize("op,attrs", [
    ("softmax", {"dim": -1}), ("softmax", {"dim": 1}), ("log_softmax", {"dim": -1}),
    ("sum", {"dims": (1,)}), ("mean", {"dims": (-1,), "keepdim": True}), ("amax", {"dims": (0, 2)}),
    ("amin", {"dims": (2,), "keepdim": True}),
])
@pytest.mark.parametrize("last", [19, 48])  # 48: the vector-lane (rfactor) form of a row reduction
def test_reductions(op, attrs, last):
    b = GraphBuilder()
    group = b.build([b.op(op, b.input("x", TensorType(("T", 3, last), "f32")), **attrs)])
    check(group, lambda t: random_inputs(group, {T: t}), [1, 6])


def test_pointwise_and_view_ops():
    """Every pointwise op, broadcasting, scalars both ways, views and a gather in one group."""
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 6), "f32"))
    y = b.input("y", TensorType((1, 6), "f32"))
    ids = b.input("ids", TensorType(("N",), "i32"))
    v = b.op("add", x, y)
    for op in ("neg", "exp", "sin", "cos", "tanh", "erf", "sigmoid", "relu", "silu", "abs"):
        v = b.op("add", v, b.op(op, b.op("mul", x, scalar=0.3)))
    v = b.op("mul", v, b.op("rsqrt", b.op("add", b.op("pow", x, scalar=2.0), scalar=1.0)))
    v = b.op("sub", v, b.op("log", b.op("sqrt", b.op("add", b.op("abs", x), scalar=0.5))))
    v = b.op("div", v, b.op("maximum", b.op("abs", y), scalar=0.5))
    v = b.op("sub", v, scalar=2.0, reverse=True)
    v = b.op("where", b.op("gt", x, y), v, b.op("minimum", x, y))
    v = b.op("masked_fill", v, b.op("le", x, scalar=-1.5), value=-7.0)
    v = b.op("add", v, b.op("gelu", x, approximate="tanh"))
    v = b.op("add", v, b.op("gelu", x))
    v = b.op("permute", b.op("reshape", v, shape=(T, 2, 3)), dims=(2, 0, 1))
    v = b.op("slice", v, dim=0, start=1, end=3, step=1)
    v = b.op("index_select", v, ids, dim=1)
    group = b.build([b.op("cast", v, dtype="f32")])
    check(group, lambda tn: [torch.randn(tn[0], 6), torch.randn(1, 6), torch.randint(0, tn[0], (tn[1],), dtype=torch.int32)],
          [(3, 2), (7, 5)])


def test_symbol_seen_only_inside_an_expression():
    """cu_seqlens [N+1] -> lengths [N]: N is solved from the input's size.

    (ir.interpret cannot bind such a symbol, so torch is the reference here.)
    """
    b = GraphBuilder()
    cu = b.input("cu_seqlens", TensorType(("N+1",), "i32"))
    lengths = b.op("sub", b.op("slice", cu, dim=0, start=1), b.op("slice", cu, dim=0, start=0, end=symbol("N")))
    kernel = cpu.emit(b.build([lengths]))
    for n in (1, 6):
        cu_seqlens = torch.randint(0, 9, (n + 1,), dtype=torch.int32).cumsum(0).to(torch.int32)
        torch.testing.assert_close(kernel.run(cu_seqlens), cu_seqlens[1:] - cu_seqlens[:-1])


def test_embedding_arange_and_comparisons():
    b = GraphBuilder()
    table = b.input("table", TensorType((50, 12), "f32"))
    ids = b.input("input_ids", TensorType(("T",), "i64"))
    rows = b.op("embedding", table, ids)
    position = b.op("cast", b.op("arange", end=T, dtype="i64"), dtype="f32")
    causal = b.op("le", b.op("reshape", position, shape=(1, T)), b.op("reshape", position, shape=(T, 1)))
    weights = b.op("softmax", b.op("masked_fill", b.op("full", shape=(T, T), value=0.5, dtype="f32"),
                                   b.op("logical_not", causal), value=-math.inf), dim=-1)
    group = b.build([b.op("add", rows, b.op("sum", b.op("mul", weights, scalar=1.0), dims=(1,), keepdim=True))])
    check(group, lambda t: [torch.randn(50, 12), torch.randint(0, 50, (t,))], [1, 9])


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("mask,attrs,heads,kv_heads", [
    (None, {}, 3, 3),
    ("bool", {}, 3, 3),
    ("f32", {"scale": 0.3}, 2, 2),
    (None, {"causal": True}, 3, 3),
    (None, {"causal": True, "gqa": True}, 4, 2),
])
def test_attention(mask, attrs, heads, kv_heads):
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", heads, "S", 16), "f32"))
    k = b.input("k", TensorType(("B", kv_heads, "S", 16), "f32"))
    v = b.input("v", TensorType(("B", kv_heads, "S", 24), "f32"))
    inputs = [q, k, v] + ([b.input("mask", TensorType(("B", 1, 1, "S"), mask))] if mask else [])
    group = b.build([b.op("attention", *inputs, **attrs)])

    def make(bs):
        args = random_inputs(group, {B: bs[0], S: bs[1]})[:3]
        if mask == "bool":
            keep = torch.ones(bs[0], 1, 1, bs[1], dtype=torch.bool)
            keep[0, ..., bs[1] // 2 + 1:] = False  # padding in the first sequence
            args.append(keep)
        elif mask == "f32":
            args.append(torch.where(torch.rand(bs[0], 1, 1, bs[1]) > 0.3, 0.0, -10000.0))
        return args

    check(group, make, [(1, 1), (2, 5), (3, 19)])


# ----------------------------------------------------------------------------- paged cache
L_, NB_, BS_, HKV_, H_, D_ = 2, 16, 4, 2, 6, 16


def cache_group(op, rope):
    b = GraphBuilder()
    cache_type = TensorType((L_, 2, NB_, BS_, HKV_, D_), "f32")
    if op == "kv_cache_write":
        inputs = [b.input("kv_cache", cache_type), b.input("k", TensorType(("T", HKV_, D_), "f32")),
                  b.input("v", TensorType(("T", HKV_, D_), "f32")), b.input("slot_mapping", TensorType(("T",), "i64"))]
        attrs = {}
    else:
        inputs = [b.input("q", TensorType(("T", H_, D_), "f32")), b.input("kv_cache", cache_type),
                  b.input("block_tables", TensorType(("N", "MB"), "i32")),
                  b.input("context_lens", TensorType(("N",), "i32")), b.input("cu_seqlens_q", TensorType(("N+1",), "i32"))]
        attrs = {"scale": 0.25}
    if rope:
        inputs += [b.input("cos", TensorType(("T", D_), "f32")), b.input("sin", TensorType(("T", D_), "f32"))]
    return b.build([b.op(op, *inputs, layer=1, rope=rope, **attrs)])


@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_write_in_place(rope):
    group = cache_group("kv_cache_write", rope)
    kernel = cpu.emit(group)
    builds = cpu.build_count()
    for tokens in (1, 6):
        cache = torch.randn(L_, 2, NB_, BS_, HKV_, D_)
        slots = torch.tensor(random.Random(tokens).sample(range(NB_ * BS_), tokens))
        slots[0] = -1  # a padding token: skipped
        args = [cache, torch.randn(tokens, HKV_, D_), torch.randn(tokens, HKV_, D_), slots]
        args += [torch.randn(tokens, D_), torch.randn(tokens, D_)] if rope else []
        original = cache.clone()
        expected = ir.interpret(group, original.clone(), *args[1:])
        for serial_max in (SERIAL_MAX, 0):  # the serial twin (few tokens), then the parallel form
            cache.copy_(original)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(paged, "SERIAL_MAX", serial_max)
                pointer = cache.data_ptr()
                out = kernel.run(cache, *args[1:])
            assert out is cache and out.data_ptr() == pointer  # written through DLPack, no copy
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert cpu.build_count() == builds


def random_layout(q_lens, context_lens, width, seed):
    """Block tables scattering each sequence's context over a shuffled pool of blocks."""
    pool = torch.randperm(NB_, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    tables, used = torch.zeros(len(q_lens), width, dtype=torch.int32), 0
    for n, context in enumerate(context_lens):
        blocks = -(-context // BS_)
        tables[n, :blocks] = pool[used:used + blocks]
        used += blocks
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return tables, torch.tensor(context_lens, dtype=torch.int32), cu


@pytest.mark.parametrize("rope", [False, True])
def test_paged_attention_random_layouts(rope):
    group = cache_group("paged_attention", rope)
    cases = [  # (query lengths, context lengths, table width): prefill, cached context, decode
        ([1], [1], 1),
        ([3, 1, 0, 5], [3, 9, 4, 13], 4),
        ([1, 2], [7, 17], 5),
    ]

    def make(case):
        q_lens, context_lens, width = case
        tokens = sum(q_lens)
        args = [torch.randn(tokens, H_, D_), torch.randn(L_, 2, NB_, BS_, HKV_, D_),
                *random_layout(q_lens, context_lens, width, seed=tokens)]
        return args + ([torch.randn(tokens, D_), torch.randn(tokens, D_)] if rope else [])

    check(group, make, cases)


# ----------------------------------------------------------------------------- the cache contract
def test_emit_into_a_directory_then_load_without_building(tmp_path):
    group = gemm_group(24, 40, ("bias", "gated_silu"))
    emitted = cpu.emit(group, tmp_path)
    assert emitted.source_path == str(tmp_path / f"{emitted.name}.tir")
    assert {p.suffix for p in tmp_path.iterdir()} == {".so", ".tir", ".ll", ".s"}
    builds = cpu.build_count()
    loaded = cpu.load(group, tmp_path)
    assert cpu.build_count() == builds
    assert (loaded.name, loaded.source, loaded.ops) == (emitted.name, emitted.source, emitted.ops)
    args = random_inputs(group, {T: 21})
    torch.testing.assert_close(loaded.run(*args), ir.interpret(group, *args), rtol=1e-4, atol=1e-5)


def test_tiny_llama_compiles_for_cpu_and_matches_eager(tmp_path):
    """fuselm.compile(target="cpu"): every partitioned group of a 2-layer Llama has a kernel."""
    from fuselm import api
    from fuselm.models.contract import capture_example, pack_prompts
    from tiny_models import tiny_llama

    config, model = tiny_llama()
    example, dynamic = capture_example(config)
    compiled = api.compile(model, example, target="cpu", dynamic=dynamic, cache_dir=str(tmp_path))
    assert {"gemm", "rms_norm", "kv_cache_write", "paged_attention"} <= {op for k in compiled.kernels for op in k.ops}
    builds = cpu.build_count()
    for prompts in ([[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[3] * 19, [4, 5]]):  # two token counts
        expected_inputs, inputs = (pack_prompts(config, prompts, all_logits=True) for _ in range(2))
        with torch.no_grad():
            expected = model(*expected_inputs.as_tuple())
        cache = inputs.kv_cache
        logits = compiled(*inputs.as_tuple())
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert inputs.kv_cache is cache  # written in place
        torch.testing.assert_close(cache, expected_inputs.kv_cache, rtol=1e-4, atol=1e-4)
    assert cpu.build_count() == builds


def test_tiny_bert_compiles_for_cpu_and_matches_eager(tmp_path):
    """Padded BERT: mask building, layer norms, gelu epilogues and dense attention."""
    from fuselm import api
    from fuselm.models import bert
    from fuselm.models.config import BertConfig
    from fuselm.models.contract import capture_example

    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = bert.BertModel(config).eval()
    example, dynamic = capture_example(config)
    compiled = api.compile(model, example, target="cpu", dynamic=dynamic, cache_dir=str(tmp_path))
    assert any(k.ops == ("attention",) for k in compiled.kernels)
    for batch, length in ((3, 9), (2, 17)):
        ids = torch.randint(0, 97, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[-1, length // 2:] = 0  # a padded sequence
        with torch.no_grad():
            expected = model(ids, mask)
        torch.testing.assert_close(compiled(ids, mask), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- paged attention, query tiles
def paged_group(block_size, blocks, heads, kv_heads, head_dim, rope):
    b = GraphBuilder()
    inputs = [b.input("q", TensorType(("T", heads, head_dim), "f32")),
              b.input("kv_cache", TensorType((2, 2, blocks, block_size, kv_heads, head_dim), "f32")),
              b.input("block_tables", TensorType(("N", "MB"), "i32")),
              b.input("context_lens", TensorType(("N",), "i32")), b.input("cu_seqlens_q", TensorType(("N+1",), "i32"))]
    if rope:
        inputs += [b.input("cos", TensorType(("T", head_dim), "f32")), b.input("sin", TensorType(("T", head_dim), "f32"))]
    return b.build([b.op("paged_attention", *inputs, layer=1, rope=rope, scale=head_dim ** -0.5)])


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim,rope", [
    (16, 9, 3, 64, False),  # SmolLM2's attention shape
    (1, 6, 2, 16, True),  # a block per position, rope
    (16, 4, 4, 24, True),  # no grouping; a head dim that is not a multiple of 16
    (5, 8, 1, 16, False),  # one kv head for all; a block size that divides nothing
])
def test_paged_attention_query_tiles(block_size, heads, kv_heads, head_dim, rope):
    """Sequences longer than one query tile (odd lengths), fresh and cached context,
    mixed with q_len 1 and 0 in one batch; the tiled form runs whenever a q_len > 1."""
    blocks = 160 // block_size + 8
    group = paged_group(block_size, blocks, heads, kv_heads, head_dim, rope)
    cases = [  # (query lengths, context lengths)
        ([37], [37]),  # prefill, fresh context
        ([13, 1, 0, 21], [50, 17, 3, 21]),  # cached context, decode rows, an empty sequence
        ([2, 9], [33, 9]),
    ]

    def make(case):
        q_lens, context_lens = case
        tokens = sum(q_lens)
        generator = torch.Generator().manual_seed(tokens)
        width = max(-(-c // block_size) for c in context_lens) + 1
        pool = torch.randperm(blocks, generator=generator).to(torch.int32)
        tables, used = torch.zeros(len(q_lens), width, dtype=torch.int32), 0
        for n, context in enumerate(context_lens):
            count = -(-context // block_size)
            tables[n, :count] = pool[used:used + count]
            used += count
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        args = [torch.randn(tokens, heads, head_dim, generator=generator),
                torch.randn(2, 2, blocks, block_size, kv_heads, head_dim, generator=generator),
                tables, torch.tensor(context_lens, dtype=torch.int32), cu]
        return args + ([torch.randn(tokens, head_dim, generator=generator),
                        torch.randn(tokens, head_dim, generator=generator)] if rope else [])

    check(group, make, cases)


def test_paged_attention_large_scores_and_ties():
    """Scores far from 0 (the online softmax's running max) and decode beside prefill."""
    group = paged_group(16, 12, 9, 3, 64, False)
    for scale in (30.0, 1e-3):
        tables = torch.arange(12, dtype=torch.int32).reshape(2, 6)
        args = [torch.randn(41, 9, 64) * scale, torch.randn(2, 2, 12, 16, 3, 64),
                tables, torch.tensor([40, 90], dtype=torch.int32), torch.tensor([0, 40, 41], dtype=torch.int32)]
        expected = ir.interpret(group, *[a.clone() for a in args])
        torch.testing.assert_close(cpu.emit(group).run(*args), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- attention, query tiles
@pytest.mark.parametrize("mask,attrs,heads,kv_heads,head_dim,value_dim", [
    (None, {}, 3, 3, 32, 32),
    ("bool", {}, 2, 2, 16, 24),
    ("f32", {"scale": 0.3, "gqa": True}, 4, 2, 32, 16),  # gqa with a float mask
    ("bool_ss", {"gqa": True}, 2, 1, 12, 20),  # a [S, S] mask broadcast over batch and heads; D, Dv not multiples of 8
    (None, {"causal": True}, 3, 3, 12, 8),
    (None, {"causal": True, "gqa": True}, 6, 2, 64, 64),
])
def test_attention_query_tiles(mask, attrs, heads, kv_heads, head_dim, value_dim):
    """The lone attention op takes the TVMScript query-tile kernel; sizes straddle the
    tiles (16 rows) and the key chunks (64 keys), one row may be all padding but key 0."""
    from fuselm.codegen.tvm import attention
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", heads, "S", head_dim), "f32"))
    k = b.input("k", TensorType(("B", kv_heads, "S", head_dim), "f32"))
    v = b.input("v", TensorType(("B", kv_heads, "S", value_dim), "f32"))
    inputs = [q, k, v]
    if mask == "bool_ss":
        inputs.append(b.input("mask", TensorType(("S", "S"), "bool")))
    elif mask:
        inputs.append(b.input("mask", TensorType(("B", 1, 1, "S"), mask)))
    group = b.build([b.op("attention", *inputs, **attrs)])
    assert attention.tiled_supported(group)

    def make(bs):
        args = random_inputs(group, {B: bs[0], S: bs[1]})[:3]
        if mask == "bool_ss":
            keep = torch.rand(bs[1], bs[1]) > 0.4
            keep[:, 0] = True
            args.append(keep)
        elif mask == "bool":
            keep = torch.ones(bs[0], 1, 1, bs[1], dtype=torch.bool)
            keep[0, ..., bs[1] // 2 + 1:] = False
            args.append(keep)
        elif mask == "f32":
            m = torch.where(torch.rand(bs[0], 1, 1, bs[1]) > 0.3, 0.0, torch.finfo(torch.float32).min)
            m[..., 0] = 0.0
            args.append(m)
        return args

    kernel = check(group, make, [(1, 1), (2, 17), (3, 70), (1, 131)], rtol=1e-4, atol=2e-5)
    assert kernel.name.startswith("attention_tiled")


def test_attention_with_views_keeps_te_path():
    """attention with a view inlined into its reads is not a lone op: the TE lowering."""
    from fuselm.codegen.tvm import attention
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", "S", 2, 16), "f32"))
    k = b.input("k", TensorType(("B", 2, "S", 16), "f32"))
    v = b.input("v", TensorType(("B", 2, "S", 16), "f32"))
    group = b.build([b.op("attention", b.op("permute", q, dims=(0, 2, 1, 3)), k, v)])
    assert not attention.tiled_supported(group)
    kernel = check(group, lambda bs: random_inputs(group, {B: bs[0], S: bs[1]}), [(1, 3), (2, 9)])
    assert not kernel.name.startswith("attention_tiled")


@pytest.mark.parametrize("mask_dtype", ["bool", "f32"])
@pytest.mark.parametrize("viewed", [False, True], ids=["tiled", "te"])
def test_attention_rows_with_every_key_hidden_are_zeros(mask_dtype, viewed):
    """A query row whose keys are all masked (a bool False or an added -inf everywhere)
    gives 0, as SDPA (the op's reference) does, not 0/0: both kernel forms."""
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", "S", 2, 16), "f32") if viewed else TensorType(("B", 2, "S", 16), "f32"))
    k = b.input("k", TensorType(("B", 2, "S", 16), "f32"))
    v = b.input("v", TensorType(("B", 2, "S", 16), "f32"))
    mask = b.input("mask", TensorType(("B", 1, "S", "S"), mask_dtype))
    group = b.build([b.op("attention", b.op("permute", q, dims=(0, 2, 1, 3)) if viewed else q, k, v, mask)])

    def make(bs):
        args = random_inputs(group, {B: bs[0], S: bs[1]})[:3]
        keep = torch.rand(bs[0], 1, bs[1], bs[1]) > 0.5
        keep[0, :, 0] = False  # the first query row of the first sequence sees no key
        keep[-1] = False  # nor does any row of the last sequence
        args.append(keep if mask_dtype == "bool" else torch.where(keep, 0.0, -math.inf))
        return args

    kernel = check(group, make, [(2, 5), (3, 19)], rtol=1e-4, atol=2e-5)
    assert kernel.name.startswith("attention_tiled") != viewed
    args = make((2, 5))
    assert torch.equal(kernel.run(*args)[-1], torch.zeros(2, 5, 16))
