"""`fuselm.compile("model.onnx")`: Hugging Face models exported to ONNX (as
benchmarks/forward.py exports MiniLM) compile through the same passes and kernels as
their torch capture and match ONNX Runtime; inputs by position or name, torch or numpy."""
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


def test_an_exported_hugging_face_bert_matches_onnx_runtime(tmp_path):
    """(GPT-2's export is checked through the importer in test_onnx_frontend.py.)"""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    path = export(model, tmp_path / "bert.onnx", *padded([5, 3], 64))
    compiled = fuselm.compile(path, target="cpu", cache_dir=str(tmp_path / "kernels"))
    for seed, lengths in enumerate([[7, 4, 7], [12, 2]]):  # two sequence lengths: the dims are symbolic
        ids, mask = padded(lengths, 64, seed)
        expected = ort_run(path, ids, mask)
        (got,) = compiled(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    by_name = compiled(attention_mask=mask.numpy(), input_ids=ids.numpy())  # by name, numpy
    torch.testing.assert_close(by_name[0], got)
    assert compiled.fallbacks == {}
    with pytest.raises(TypeError, match="the ONNX model takes"):
        compiled(ids)


def test_bad_calls_and_files(tmp_path):
    with pytest.raises(fuselm.FuselmError, match="nothing.onnx"):
        fuselm.compile(str(tmp_path / "nothing.onnx"), target="cpu")
    with pytest.raises(TypeError, match="example_inputs, dynamic and quantize do not apply"):
        fuselm.compile(str(tmp_path / "nothing.onnx"), (torch.ones(1),), target="cpu")
