"""`fuselm.compile("model.onnx")`: Hugging Face models exported to ONNX (as
benchmarks/forward.py exports MiniLM) compile through the same passes and kernels as
their torch capture (the same fused kernels) and match ONNX Runtime; inputs by position
or name, torch or numpy."""
import re
import warnings

import pytest
import torch

import fuselm
from tiny_models import LastHidden

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def export(model, path, ids, mask) -> str:
    torch.onnx.export(LastHidden(model).eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                                    "last_hidden_state": {0: "batch", 1: "sequence"}})
    return str(path)


def padded(lengths, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def ort_run(path: str, ids, mask):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)
        return transformers.BertModel(config, add_pooling_layer=False).eval()
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def fused_kernels(compiled) -> list:
    """The heavy kernels' names without their hash suffix (gemm with its epilogue, norms,
    attention): what fusion made of the model."""
    names = [re.sub(r"_[0-9a-f]{6}$", "", k.name) for k in compiled.kernels]
    return sorted(n for n in names if n.startswith(("gemm", "layer_norm", "rms_norm", "attention")))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_an_exported_hugging_face_model_matches_onnx_runtime_with_the_torch_capture_kernels(kind, tmp_path):
    """Exported by torch.onnx (opset 17), compiled through the same passes: ONNX Runtime's
    outputs, one native program (no fallback of any kind), and the fused kernels of the
    torch capture of the same model (GPT-2's exported SDPA, NaN-guarded, is attention;
    BERT's written-out GELU is the gemm's epilogue)."""
    model = tiny(kind)
    path = export(model, tmp_path / f"{kind}.onnx", *padded([5, 3], 64))
    cache = str(tmp_path / "kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fuselm.FallbackWarning)
        compiled = fuselm.compile(path, target="cpu", cache_dir=cache)
        captured = fuselm.compile(LastHidden(model), padded([7, 4], 64), target="cpu", cache_dir=cache,
                                  dynamic={name: {0: ("B", 1, 64), 1: ("S", 1, 64)} for name in ("input_ids", "attention_mask")})
    assert compiled.fallbacks == {} and captured.fallbacks == {}
    assert fused_kernels(compiled) == fused_kernels(captured)
    assert any(name.startswith("attention") for name in fused_kernels(compiled))
    for seed, lengths in enumerate([[7, 4, 7], [12, 2]]):  # two sequence lengths: the dims are symbolic
        ids, mask = padded(lengths, 64, seed)
        expected = ort_run(path, ids, mask)
        (got,) = compiled(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    by_name = compiled(attention_mask=mask.numpy(), input_ids=ids.numpy())  # by name, numpy
    torch.testing.assert_close(by_name[0], got)
    with pytest.raises(TypeError, match="the ONNX model takes"):
        compiled(ids)


def test_bad_calls_and_files(tmp_path):
    with pytest.raises(fuselm.FuselmError, match="nothing.onnx"):
        fuselm.compile(str(tmp_path / "nothing.onnx"), target="cpu")
    with pytest.raises(TypeError, match="example_inputs, dynamic and quantize do not apply"):
        fuselm.compile(str(tmp_path / "nothing.onnx"), (torch.ones(1),), target="cpu")


@pytest.mark.slow
def test_minilm_exported_as_the_benchmark_does_matches_onnx_runtime_with_the_torch_capture_kernels(minilm_dir,
                                                                                                   tmp_path):
    """The real all-MiniLM-L6-v2, exported as benchmarks/forward.py exports it (its own
    instance: exporting leaves a module computing other values)."""
    exported = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    path = export(exported, tmp_path / "minilm.onnx", *padded([9, 5], 30522))
    model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    cache = str(tmp_path / "kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fuselm.FallbackWarning)
        compiled = fuselm.compile(path, target="cpu", cache_dir=cache)
        captured = fuselm.compile(LastHidden(model), padded([7, 4], 30522), target="cpu", cache_dir=cache,
                                  dynamic={name: {0: ("B", 1, 64), 1: ("S", 1, 512)}
                                           for name in ("input_ids", "attention_mask")})
    assert fused_kernels(compiled) == fused_kernels(captured)
    for seed, lengths in enumerate([[17, 6, 17], [40, 3]]):
        ids, mask = padded(lengths, 30522, seed)
        (got,) = compiled(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], ort_run(path, ids, mask)[keep], atol=1e-4, rtol=1e-4)


def test_the_command_line_prints_builds_and_loads_an_onnx_file(tmp_path, capsys):
    """`fuselm ir model.onnx [--target cpu]` and `fuselm build model.onnx -o DIR`; the
    artifact loads (no import, no codegen) and is called as fuselm.compile's result is."""
    from fuselm.cli import main

    path = export(tiny("gpt2"), tmp_path / "gpt2.onnx", *padded([5, 3], 64))
    assert main(["ir", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("graph(%input_ids: i64[batch,sequence], %attention_mask: i64[batch,sequence])")
    assert "attention(" in out and "nodes" in err
    assert main(["ir", path, "--target", "cpu", "--dump-dir", str(tmp_path / "dump")]) == 0
    assert "# kernel attention_tiled" in capsys.readouterr().err
    assert main(["build", path, "-o", str(tmp_path / "art")]) == 0
    capsys.readouterr()
    artifact = fuselm.load(tmp_path / "art")
    ids, mask = padded([6, 2], 64, seed=3)
    (got,) = artifact(ids, mask)
    (by_name,) = artifact(attention_mask=mask.numpy(), input_ids=ids.numpy())
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ort_run(path, ids, mask)[keep], atol=1e-4, rtol=1e-4)
    assert torch.equal(got, by_name) and artifact.fallbacks == {}
    with pytest.raises(TypeError, match="the ONNX model takes \\(input_ids, attention_mask\\)"):
        artifact(ids)
    with pytest.raises(fuselm.ArtifactError, match="holds a onnx model, not a causal language model"):
        fuselm.LLM(model=str(tmp_path / "art"))
    assert main(["build", path, "-o", str(tmp_path / "q"), "--quantize", "int8"]) == 2
    assert "--quantize applies to models fuselm loads, not to ONNX graphs" in capsys.readouterr().err


def test_an_artifact_keeps_a_group_no_kernel_takes_as_a_fallback(tmp_path, monkeypatch):
    """A group no emitter takes runs through the IR reference in the compiled model; the
    artifact lists it as a fallback, holds no code for it, and runs it the same way (in
    its program too)."""
    from onnx import TensorProto, helper

    from fuselm.codegen.tvm import lowering

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    nodes = [helper.make_node("Sin", ["x"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Softmax", ["r"], ["p"], axis=-1), helper.make_node("Add", ["p", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "sin.onnx"
    path.write_bytes(model.SerializeToString())
    monkeypatch.setitem(lowering.LOWER, "sin", None)  # no cpu kernel computes sin now
    monkeypatch.delitem(lowering.LOWER, "sin")
    monkeypatch.setenv("FUSELM_PROGRAM", "1")  # a program even for this small graph
    cache = str(tmp_path / "kernels")
    with pytest.warns(fuselm.FallbackWarning, match="sin"):
        compiled = fuselm.compile(str(path), target="cpu", cache_dir=cache)
    from fuselm.artifact import build

    build(str(path), tmp_path / "art", cache_dir=cache, progress=False)
    artifact = fuselm.load(tmp_path / "art")
    listed = {k["name"]: k for k in artifact.manifest["kernels"]}
    fallback = next(k for name, k in listed.items() if name.startswith("fallback_"))
    assert fallback["fallback"] is True and fallback["source"] is None
    assert not (tmp_path / "art" / "kernels" / fallback["key"]).exists()
    assert artifact.fallbacks == compiled.fallbacks and sum(compiled.fallbacks.values()) == 1
    assert artifact._compiled.program is not None
    t = torch.randn(5, 8)
    expected = torch.softmax(torch.relu(torch.sin(t)), -1) + t
    torch.testing.assert_close(compiled(t)[0], expected)
    torch.testing.assert_close(artifact(t)[0], expected)
