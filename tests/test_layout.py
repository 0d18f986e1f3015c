"""The cpu `layout` pass and the kernels over its prepacked (k16) gemm weights.

The pass on small Before graphs (After structure, rewrite counters, the interpreter's
results unchanged, the [N, K] constants gone, shared constants left alone); the IR's
gemm reading a packed weight; the TVM kernels on packed weights against the interpreter
at odd row counts and every epilogue; a compiled tiny Llama against eager.
"""
import pytest
import torch

from fuselm import ir
from fuselm.codegen import tvm as cpu
from fuselm.codegen.kernel import group_key
from fuselm.ir import GraphBuilder, IRTypeError, TensorType, symbol
from fuselm.ir.core_ops import pack_weight, unpack_weight
from fuselm.passes import counters, pipeline
from fuselm.passes.layout import prepack_weights

from tiny_models import gemm_group
from pass_checks import fresh_counters, same_results  # noqa: F401 (fresh_counters: autouse)

T = symbol("T")




def gemms(graph):
    return [n for n in graph.nodes if n.op == "gemm"]


# ----------------------------------------------------------------------------- the layout itself
@pytest.mark.parametrize("n,halves", [(22, 1), (16, 1), (26, 2), (32, 2), (2, 2)])
def test_pack_weight_panels_and_round_trip(n, halves):
    w = torch.randn(n, 5)
    packed = pack_weight(w, halves)
    columns, half = 16 // halves, n // halves
    assert packed.shape == (-(-half // columns), 5, 16) and packed.is_contiguous()
    for h in range(halves):  # panel p holds columns p*c.. of each half, the halves side by side
        for j in range(half):
            assert torch.equal(packed[j // columns, :, h * columns + j % columns], w[h * half + j])
    assert torch.equal(unpack_weight(packed, n, halves), w)
    assert (packed != 0).sum() == w.numel()  # the padding columns are zeros


def test_gemm_type_and_reference_read_a_packed_weight():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 7), "f32"))
    w = torch.randn(26, 7)
    packed = b.constant("w.k16", pack_weight(w, 2))
    y = b.op("gemm", x, packed, epilogue=("gated_silu",), weight_layout="k16", n=26)
    assert str(y.type) == "f32[T,13]"
    graph = b.build([y])
    assert str(ir.parse(str(graph), constants=graph.constants)) == str(graph)
    xs = torch.randn(4, 7)
    gate, up = torch.nn.functional.linear(xs, w).chunk(2, dim=-1)
    torch.testing.assert_close(ir.interpret(graph, xs), torch.nn.functional.silu(gate) * up)
    with pytest.raises(IRTypeError, match="k16 weight of n=40"):
        b.op("gemm", x, packed, epilogue=("gated_silu",), weight_layout="k16", n=40)  # 3 panels, not 2
    with pytest.raises(IRTypeError, match="weight_layout='k32'"):
        b.op("gemm", x, packed, epilogue=("gated_silu",), weight_layout="k32", n=26)


# ----------------------------------------------------------------------------- the pass
def mlp_block():
    """x -> qkv-like gemm, a biased gemm, a gated gemm, a down gemm + residual."""
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 24), "f32"))
    h = b.op("gemm", x, b.constant("attn.w", torch.randn(40, 24)))
    h = b.op("gemm", h, b.constant("proj.w", torch.randn(24, 40)), b.constant("proj.b", torch.randn(24)), epilogue=("bias",))
    g = b.op("gemm", h, b.constant("mlp.gate+up.w", torch.randn(2 * 36, 24)), epilogue=("gated_silu",))
    y = b.op("gemm", g, b.constant("mlp.down.w", torch.randn(24, 36)), x, epilogue=("residual",))
    return b.build([y])


def test_layout_packs_every_gemm_weight_once():
    before = mlp_block()
    after = prepack_weights(before)
    assert [n.op for n in after.nodes] == [n.op for n in before.nodes]
    assert all(g.attrs["weight_layout"] == "k16" for g in gemms(after))
    assert [g.attrs["n"] for g in gemms(after)] == [40, 24, 72, 24]
    assert [g.attrs.get("epilogue", ()) for g in gemms(after)] == [g.attrs.get("epilogue", ()) for g in gemms(before)]
    assert sorted(after.constants) == ["attn.w.k16", "mlp.down.w.k16", "mlp.gate+up.w.k16", "proj.b", "proj.w.k16"]
    assert [tuple(after.constants[g.inputs[1].name].shape) for g in gemms(after)] == [
        (3, 24, 16), (2, 40, 16), (5, 24, 16), (2, 36, 16)]
    assert counters["layout.k16"] == 4 and counters["layout.weights"] == 4
    assert after.nodes[-1].inputs[2] is after.inputs[0]  # the residual still reads x
    same_results(before, after, torch.randn(5, 24))
    assert str(ir.parse(str(after), constants=after.constants)) == str(after)


def test_layout_leaves_a_tied_table_alone():
    """An embedding table that is also the lm_head stays [N, K]: no second copy."""
    b = GraphBuilder()
    ids = b.input("ids", TensorType(("T",), "i64"))
    table = b.constant("embed.w", torch.randn(30, 16))
    h = b.op("gemm", b.op("embedding", table, ids), b.constant("mix.w", torch.randn(16, 16)))
    before = b.build([b.op("gemm", h, table)])
    after = prepack_weights(before)
    lm_head = gemms(after)[-1]
    assert "weight_layout" not in lm_head.attrs and lm_head.inputs[1].name == "embed.w"
    assert sorted(after.constants) == ["embed.w", "mix.w.k16"]
    assert after.constants["embed.w"] is before.constants["embed.w"]
    assert counters["layout.k16"] == 1
    same_results(before, after, torch.tensor([3, 0, 29]))


def test_layout_shares_one_packed_weight_between_gemms_of_one_pairing():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 16), "f32"))
    w = b.constant("w", torch.randn(16, 16))
    before = b.build([b.op("add", b.op("gemm", x, w), b.op("gemm", b.op("neg", x), w, epilogue=("relu",)))])
    after = prepack_weights(before)
    assert {g.inputs[1] for g in gemms(after)} == {after.nodes[0].inputs[1]} and list(after.constants) == ["w.k16"]
    assert counters["layout.k16"] == 2 and counters["layout.weights"] == 1
    same_results(before, after, torch.randn(3, 16))


@pytest.mark.parametrize("case", ["other pairing", "graph output", "weight input", "bf16"])
def test_layout_does_not_fire(case):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 16), "f32"))
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    w = b.input("w", TensorType((16, 16), "f32")) if case == "weight input" else b.constant("w", torch.randn(16, 16, dtype=dtype))
    outputs = [b.op("gemm", b.op("cast", x, dtype="bf16") if case == "bf16" else x, w)]
    if case == "other pairing":
        outputs.append(b.op("gemm", x, w, epilogue=("gated_silu",)))
    if case == "graph output":
        outputs.append(w)
    before = b.build(outputs)
    after = prepack_weights(before)
    assert str(after) == str(before) and counters["layout.k16"] == 0


def test_layout_runs_in_the_cpu_pipeline_only():
    assert [name for name, _ in pipeline("cpu")][-1] == "layout"
    assert "layout" not in [name for name, _ in pipeline("cuda")] + [name for name, _ in pipeline()]


# ----------------------------------------------------------------------------- the kernels
def packed_gemm_group(K, N, steps, packed=True):
    """gemm(x, w, extras), w a group input as in a partitioned group: k16 panels or [N, K]."""
    halves = 2 if "gated_silu" in steps else 1
    if not packed:
        return gemm_group(K, N, steps), halves
    shape = tuple(pack_weight(torch.zeros(N, K), halves).shape)
    return gemm_group(K, N, steps, weight_shape=shape, attrs={"weight_layout": "k16", "n": N}), halves


@pytest.mark.parametrize("K,N,steps", [
    (37, 22, ("bias", "relu")),
    (29, 50, ("gelu",)),
    (40, 46, ("bias", "gelu_tanh")),
    (24, 30, ("silu", "residual")),
    (33, 19, ()),
    (37, 26, ("bias", "gated_silu", "residual")),
    (20, 2 * 21, ("gated_silu",)),
])
def test_kernels_on_packed_weights_match_the_interpreter(K, N, steps):
    group, halves = packed_gemm_group(K, N, steps)
    kernel = cpu.emit(group)
    builds = cpu.build_count()
    packed = pack_weight(torch.randn(N, K), halves)
    for rows in (1, 3, 16, 17, 130):  # gemv1, gemv (a tail tile), gemv, gemm (tails), gemm
        args = [torch.randn(rows, K), packed] + [
            torch.randn(*[rows if d == T else d for d in v.type.shape]) for v in group.inputs[2:]]
        torch.testing.assert_close(kernel.run(*args), ir.interpret(group, *args), rtol=1e-4, atol=1e-4)
    assert cpu.build_count() == builds, "a new row count rebuilt the kernel"
    assert kernel.name.endswith("_wk16")


def test_packed_kernel_reads_panels_without_packing():
    (group, _), (plain_group, _) = (packed_gemm_group(64, 96, ("bias", "gelu"), packed) for packed in (True, False))
    kernel, plain = cpu.emit(group), cpu.emit(plain_group)
    assert "w_packed" in plain.source and "w_packed" not in kernel.source  # no per-call packing
    assert kernel.source.count("T.parallel") >= 3 and "T.vectorized" in kernel.source
    assert "vfmadd" in kernel.extra_sources["s"]
    assert group_key(group, "cpu") != group_key(plain_group, "cpu")  # the cache tells them apart


# ----------------------------------------------------------------------------- end to end
def test_tiny_llama_compiled_for_cpu_packs_all_but_the_tied_head(tmp_path):
    from fuselm import api
    from fuselm.models.contract import capture_example, pack_prompts
    from tiny_models import tiny_llama

    config, model = tiny_llama()
    example, dynamic = capture_example(config)
    compiled = api.compile(model, example, target="cpu", dynamic=dynamic, cache_dir=str(tmp_path))
    packed = [g for g in gemms(compiled.graph) if g.attrs.get("weight_layout") == "k16"]
    assert len(packed) == len(gemms(compiled.graph)) - 1 == 4 * config.num_hidden_layers
    (head,) = [g for g in gemms(compiled.graph) if "weight_layout" not in g.attrs]
    assert head.inputs[1].name == "lm_head.weight"  # tied to the embedding: left [N, K]
    assert all(name.endswith(".k16") for name, t in compiled.graph.constants.items() if t.dim() == 3)
    assert not any(name.endswith("proj.weight") for name in compiled.graph.constants)
    for prompts in ([[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[3] * 19, [4, 5]], [[7]]):
        expected_inputs, inputs = (pack_prompts(config, prompts, all_logits=True) for _ in range(2))
        with torch.no_grad():
            expected = model(*expected_inputs.as_tuple())
        logits = compiled(*inputs.as_tuple())
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(inputs.kv_cache, expected_inputs.kv_cache, rtol=1e-4, atol=1e-4)


def test_donated_weights_are_packed_in_their_own_memory(tmp_path):
    from fuselm import api
    from fuselm.models.contract import capture_example, pack_prompts
    from tiny_models import tiny_llama

    config, model = tiny_llama()
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    with torch.no_grad():
        expected = model(*pack_prompts(config, prompts, all_logits=True).as_tuple())
    down = model.model.layers[0].mlp.down_proj.weight
    down_memory, down_copy = down.data_ptr(), down.clone()
    example, dynamic = capture_example(config)
    compiled = api.compile(model, example, target="cpu", dynamic=dynamic, cache_dir=str(tmp_path),
                           donate_weights=True)
    packed = {t.data_ptr(): t for name, t in compiled.graph.constants.items() if name.endswith(".k16")}
    assert down_memory in packed, "the down projection was packed into new memory"
    torch.testing.assert_close(unpack_weight(packed[down_memory], down_copy.shape[0], 1), down_copy)
    logits = compiled(*pack_prompts(config, prompts, all_logits=True).as_tuple())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
