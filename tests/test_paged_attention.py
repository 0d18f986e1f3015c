"""paged_attention and kv_cache_write on both targets against a dense torch reference.

The reference here is written from the math, not taken from ir/attention_reference.py:
each sequence's keys and values are gathered through its block table into contiguous
tensors, the query heads of a group share their kv head, and query i of a sequence with
q_len new tokens sees context positions 0 .. context_len - q_len + i. Block layouts are
random: shuffled block ids, and table columns past a sequence's blocks hold garbage
(ids of other sequences' blocks, and ids outside the cache) that no kernel may read.

`cuda` runs the Triton kernels in the interpreter, so shapes are tiny (D = 16); the
split-KV decode kernel gets small partitions (PARTITION_SIZE, a module constant of the
generated kernel) so that a context of a few hundred positions spans several of them.
"""
import functools
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from fuselm.codegen import triton as triton_codegen  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType  # noqa: E402

# masked-off lanes of a tile hold placeholder values (log(0), 0/0) that the interpreter warns about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

HEAD_DIM, LAYERS, LAYER, SCALE = 16, 2, 1, 0.3
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# (query lengths, context lengths) per sequence
DECODE = ([1, 1, 1, 1, 1], [1, 17, 300, 64, 129])  # contexts over several partitions
PREFILL_CACHED = ([5, 9], [12, 40])  # new tokens after cached context
FRESH = ([6, 3], [6, 3])  # plain prompts
CHUNKED_MIXED = ([1, 7, 1, 1], [33, 20, 1, 150])  # a prefill chunk among decodes
EMPTY_BESIDE_LONG = ([3, 0, 0, 1], [40, 5, 0, 7])  # T <= N, yet one sequence has 3 rows
CASES = [DECODE, PREFILL_CACHED, FRESH, CHUNKED_MIXED, EMPTY_BESIDE_LONG]
# (block size, query heads, kv heads, rope): each block size with GQA and MHA, rope on and off
LAYOUTS = [(1, 4, 2, True), (16, 4, 2, False), (1, 2, 2, False), (16, 2, 2, True)]
LAYOUT_IDS = ["bs1-gqa-rope", "bs16-gqa", "bs1-mha", "bs16-mha-rope"]


# ----------------------------------------------------------------------------- the dense reference
def rotate_half_rope(x, cos, sin):
    """x [T, H, D] rotated pairwise: (x_d, x_{d+D/2}) by the angle whose cos/sin are at d."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([first * cos[..., :half] - second * sin[..., :half],
                      second * cos[..., half:] + first * sin[..., half:]], dim=-1)


def dense_paged_attention(query, kv_cache, block_tables, context_lens, cu_seqlens_q, cos=None, sin=None):
    """Gather each sequence's K/V into [C, Hkv, D], then causal softmax attention (GQA), in fp64."""
    heads, kv_heads, block_size = query.shape[1], kv_cache.shape[4], kv_cache.shape[3]
    q = query.double()
    if cos is not None:
        q = rotate_half_rope(q, cos.double(), sin.double())
    out = torch.zeros(query.shape, dtype=torch.float64)
    for n, context in enumerate(context_lens.tolist()):
        start, end = int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1])
        positions = torch.arange(context)
        blocks, offsets = block_tables[n, positions // block_size].long(), positions % block_size
        keys = kv_cache[LAYER, 0, blocks, offsets].double().repeat_interleave(heads // kv_heads, dim=1)
        values = kv_cache[LAYER, 1, blocks, offsets].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end], keys) * SCALE
        query_positions = context - (end - start) + torch.arange(end - start)
        hidden = positions[None, :] > query_positions[:, None]
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


def dense_cache_write(kv_cache, key, value, slot_mapping, cos=None, sin=None):
    expected = kv_cache.clone()
    block_size = kv_cache.shape[3]
    if cos is not None:
        key = rotate_half_rope(key.double(), cos.double(), sin.double())
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            expected[LAYER, 0, slot // block_size, slot % block_size] = key[t].to(kv_cache.dtype)
            expected[LAYER, 1, slot // block_size, slot % block_size] = value[t].to(kv_cache.dtype)
    return expected


# ----------------------------------------------------------------------------- inputs
def random_layout(q_lens, context_lens, block_size, seed):
    """Block tables over a shuffled pool, garbage past each sequence's blocks; new tokens' slots."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    pool = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    width = max(needed) + 2
    tables = torch.randint(-num_blocks, 2 * num_blocks, (len(q_lens), width), generator=gen, dtype=torch.int32)
    slots, used = [], 0
    for n, (q_len, context) in enumerate(zip(q_lens, context_lens)):
        tables[n, : needed[n]] = pool[used : used + needed[n]]
        used += needed[n]
        slots += [int(tables[n, p // block_size]) * block_size + p % block_size for p in range(context - q_len, context)]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return tables, torch.tensor(context_lens, dtype=torch.int32), cu, torch.tensor(slots, dtype=torch.int64), num_blocks


def attention_inputs(case, block_size, heads, kv_heads, dtype, rope, seed=0):
    q_lens, context_lens = case
    tables, lens, cu, _, num_blocks = random_layout(q_lens, context_lens, block_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = sum(q_lens)
    query = torch.randn(tokens, heads, HEAD_DIM, generator=gen).to(TORCH_DTYPES[dtype])
    cache = torch.randn(LAYERS, 2, num_blocks, block_size, kv_heads, HEAD_DIM, generator=gen).to(TORCH_DTYPES[dtype])
    args = [query, cache, tables, lens, cu]
    if rope:
        angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen) * 6
        angles = torch.cat([angles, angles], dim=-1)
        args += [angles.cos().to(query.dtype), angles.sin().to(query.dtype)]
    return args


def paged_attention_group(heads, kv_heads, dtype, rope, block_size="BS"):
    b = GraphBuilder()
    inputs = [b.input("query", TensorType(("T", heads, HEAD_DIM), dtype)),
              b.input("kv_cache", TensorType((LAYERS, 2, "NB", block_size, kv_heads, HEAD_DIM), dtype)),
              b.input("block_tables", TensorType(("N", "MB"), "i32")),
              b.input("context_lens", TensorType(("N",), "i32")),
              b.input("cu_seqlens_q", TensorType(("N+1",), "i32"))]
    if rope:
        inputs += [b.input(name, TensorType(("T", HEAD_DIM), dtype)) for name in ("cos", "sin")]
    return b.build([b.op("paged_attention", *inputs, layer=LAYER, scale=SCALE, rope=rope)])


def kv_cache_write_group(kv_heads, rope, block_size="BS", num_blocks="NB"):
    b = GraphBuilder()
    inputs = [b.input("kv_cache", TensorType((LAYERS, 2, num_blocks, block_size, kv_heads, HEAD_DIM), "f32")),
              b.input("key", TensorType(("T", kv_heads, HEAD_DIM), "f32")),
              b.input("value", TensorType(("T", kv_heads, HEAD_DIM), "f32")),
              b.input("slot_mapping", TensorType(("T",), "i64"))]
    if rope:
        inputs += [b.input(name, TensorType(("T", HEAD_DIM), "f32")) for name in ("cos", "sin")]
    return b.build([b.op("kv_cache_write", *inputs, layer=LAYER, rope=rope)])


def assert_close_to_dense(got, args, tolerance):
    expected = dense_paged_attention(*args)
    assert got.shape == args[0].shape and got.dtype == args[0].dtype
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)


# ----------------------------------------------------------------------------- cuda (Triton interpreter)
@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


class LaunchSpy:
    """Stands in for a @triton.jit kernel in its module and records each launch grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def spy_on_kernels(kernel, monkeypatch, partition):
    """{'prefill' | 'split' | 'merge': LaunchSpy} in the generated module; its partition size set."""
    module = kernel.run.__globals__
    monkeypatch.setitem(module, "PARTITION_SIZE", partition)
    names = {"prefill": f"{kernel.name}_kernel", "split": f"{kernel.name}_split_kernel", "merge": f"{kernel.name}_merge_kernel"}
    spies = {role: LaunchSpy(module[name]) for role, name in names.items()}
    for role, name in names.items():
        monkeypatch.setitem(module, name, spies[role])
    return spies


@pytest.mark.parametrize("block_size,heads,kv_heads,rope", LAYOUTS, ids=LAYOUT_IDS)
def test_triton_paged_attention_matches_dense(block_size, heads, kv_heads, rope, kernel_dir, monkeypatch):
    kernel = triton_codegen.emit(paged_attention_group(heads, kv_heads, "f32", rope), kernel_dir)
    spies = spy_on_kernels(kernel, monkeypatch, partition=32)
    for seed, case in enumerate(CASES):
        launches = {role: len(spy.grids) for role, spy in spies.items()}
        args = attention_inputs(case, block_size, heads, kv_heads, "f32", rope, seed)
        assert_close_to_dense(kernel.run(*args), args, 1e-4)
        decode = len(case[0]) >= sum(case[0])  # T <= N
        assert len(spies["split"].grids) == launches["split"] + decode
        assert len(spies["prefill"].grids) == launches["prefill"] + (not decode)
    assert spies["split"].grids[0] == (5, kv_heads, -(-(302 if block_size == 1 else 336) // 32))  # table width x BS
    assert len(spies["merge"].grids) == 2  # DECODE and EMPTY_BESIDE_LONG each took several partitions


@pytest.mark.parametrize("dtype,block_size", [("f16", 5), ("bf16", 1)])  # 5: a block size that divides nothing
def test_triton_decode_half_precision_gqa_rope(dtype, block_size, kernel_dir, monkeypatch):
    kernel = triton_codegen.emit(paged_attention_group(4, 2, dtype, True), kernel_dir)
    spies = spy_on_kernels(kernel, monkeypatch, partition=16)
    for seed, case in enumerate([DECODE, CHUNKED_MIXED]):
        args = attention_inputs(case, block_size, 4, 2, dtype, True, seed)
        assert_close_to_dense(kernel.run(*args), args, 2e-2)
        if case is DECODE:
            table_positions = args[2].shape[1] * block_size
    assert spies["split"].grids == [(5, 2, -(-table_positions // 16))]


def test_triton_decode_picks_its_partition_itself(kernel_dir, monkeypatch):
    """Without an override: one partition here (no GPU to fill), the output written directly."""
    kernel = triton_codegen.emit(paged_attention_group(4, 2, "f32", False), kernel_dir)
    spies = spy_on_kernels(kernel, monkeypatch, partition=None)
    args = attention_inputs(DECODE, 16, 4, 2, "f32", False)
    assert_close_to_dense(kernel.run(*args), args, 1e-4)
    assert spies["split"].grids == [(5, 2, 1)] and spies["merge"].grids == []
    decode_partition = kernel.run.__globals__["decode_partition"]
    assert decode_partition(4096, 4, torch.device("cpu")) == 512  # bounded above
    assert decode_partition(40, 64, torch.device("cpu")) == 64  # and below


@pytest.mark.parametrize("block_size,rope", [(1, True), (16, False)])
def test_triton_write_then_decode(block_size, rope, kernel_dir, monkeypatch):
    """A decode step: kv_cache_write at the new tokens' slots (and padding slots -1), then attend."""
    write = triton_codegen.emit(kv_cache_write_group(2, rope), kernel_dir)
    attend = triton_codegen.emit(paged_attention_group(4, 2, "f32", rope), kernel_dir)
    spy_on_kernels(attend, monkeypatch, partition=32)
    check_write_then_attend(write, attend, block_size, rope, 1e-4)


# ----------------------------------------------------------------------------- cpu (TVM)
@functools.cache
def tvm_kernel(op, *layout):
    """A cpu kernel, built once per layout for the whole file."""
    pytest.importorskip("tvm")  # the GPU machines have no TVM
    from fuselm.codegen import tvm as cpu

    if op == "paged_attention":
        block_size, heads, kv_heads, rope = layout
        return cpu.emit(paged_attention_group(heads, kv_heads, "f32", rope, block_size))
    block_size, kv_heads, rope = layout
    return cpu.emit(kv_cache_write_group(kv_heads, rope, block_size))


@pytest.mark.parametrize("block_size,heads,kv_heads,rope", LAYOUTS, ids=LAYOUT_IDS)
def test_tvm_paged_attention_matches_dense(block_size, heads, kv_heads, rope):
    kernel = tvm_kernel("paged_attention", block_size, heads, kv_heads, rope)
    for seed, case in enumerate(CASES):
        args = attention_inputs(case, block_size, heads, kv_heads, "f32", rope, seed)
        assert_close_to_dense(kernel.run(*args), args, 1e-4)


@pytest.mark.parametrize("block_size,rope", [(1, True), (16, False)])
def test_tvm_write_then_decode(block_size, rope):
    write = tvm_kernel("kv_cache_write", block_size, 2, rope)
    attend = tvm_kernel("paged_attention", block_size, 4, 2, rope)
    check_write_then_attend(write, attend, block_size, rope, 1e-4)


def check_write_then_attend(write, attend, block_size, rope, tolerance):
    q_lens, context_lens = DECODE
    tables, lens, cu, slots, num_blocks = random_layout(q_lens, context_lens, block_size, seed=7)
    gen = torch.Generator().manual_seed(8)
    tokens = len(q_lens) + 2  # two padding tokens (slot -1) among the new ones
    slots = torch.cat([slots[:2], torch.tensor([-1]), slots[2:], torch.tensor([-1])])
    cache = torch.randn(LAYERS, 2, num_blocks, block_size, 2, HEAD_DIM, generator=gen)
    key, value = (torch.randn(tokens, 2, HEAD_DIM, generator=gen) for _ in range(2))
    angles = torch.rand(tokens, HEAD_DIM // 2, generator=gen).repeat(1, 2) * 6
    rope_args = [angles.cos(), angles.sin()] if rope else []
    expected_cache = dense_cache_write(cache, key, value, slots, *rope_args)
    assert write.run(cache, key, value, slots, *rope_args) is cache  # in place
    torch.testing.assert_close(cache, expected_cache, atol=1e-5, rtol=1e-5)

    real = slots >= 0  # the attention batch: the real tokens only
    query = torch.randn(len(q_lens), 4, HEAD_DIM, generator=gen)
    args = [query, cache, tables, lens, cu, *[r[real] for r in rope_args]]
    assert_close_to_dense(attend.run(*args), args, tolerance)


@pytest.mark.parametrize("rope", [False, True])
def test_tvm_kv_cache_write_random_slots(rope):
    """Random distinct slots over a shuffled cache, some -1 (skipped), against the dense write."""
    kernel = tvm_kernel("kv_cache_write", 4, 2, rope)
    gen = torch.Generator().manual_seed(3)
    for tokens in (1, 9):
        cache = torch.randn(LAYERS, 2, 8, 4, 2, HEAD_DIM, generator=gen)
        slots = torch.randperm(32, generator=gen)[:tokens]
        slots[torch.rand(tokens, generator=gen) < 0.3] = -1
        key, value = (torch.randn(tokens, 2, HEAD_DIM, generator=gen) for _ in range(2))
        rope_args = [torch.randn(tokens, HEAD_DIM, generator=gen) for _ in range(2)] if rope else []
        expected = dense_cache_write(cache, key, value, slots, *rope_args)
        assert kernel.run(cache, key, value, slots, *rope_args) is cache
        torch.testing.assert_close(cache, expected, atol=1e-5, rtol=1e-5)
