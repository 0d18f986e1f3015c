"""`fuselm.compile(model)` as torch.compile: capture at the first call, automatic dynamic
shapes, guarded non-tensor arguments, the recompile limit, the model's own call and
return structure, and the caller's training mode left alone."""
import pytest
import torch
import torch.nn.functional as F

import fuselm
from fuselm import api
from fuselm.codegen import cache as kernel_cache
from fuselm.errors import FuselmError


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, mask=None, scale: float = 2.0, power: int = 1):
        h = F.gelu(self.proj(x)) * scale
        if mask is not None:
            h = h.masked_fill(~mask[..., None], 0.0)
        return {"hidden": h ** power, "pair": (h.sum(-1), x.shape[-1])}


def counts():
    return api.stats["captures"], kernel_cache.stats["codegen_runs"]


def check(compiled, model, *args, **kwargs):
    with torch.no_grad():
        expected = model(*args, **kwargs)
    got = compiled(*args, **kwargs)
    assert set(got) == {"hidden", "pair"} and got["pair"][1] == expected["pair"][1]
    torch.testing.assert_close(got["hidden"], expected["hidden"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["pair"][0], expected["pair"][0], atol=1e-4, rtol=1e-5)


def test_first_call_captures_and_before_it_nothing_is_there(tmp_path):
    model = Scaled().eval()
    compiled = fuselm.compile(model, target="cpu", cache_dir=str(tmp_path))
    for attribute in ("graph", "kernels", "fallbacks"):
        with pytest.raises(FuselmError, match="not been compiled yet"):
            getattr(compiled, attribute)
    captures, _ = counts()
    check(compiled, model, torch.randn(3, 5, 16), mask=torch.rand(3, 5) > 0.3)
    assert counts()[0] == captures + 1 and compiled.fallbacks == {}
    assert [v.name for v in compiled.graph.inputs] == ["x", "mask"]  # the forward's parameter names


def test_new_shape_recompiles_once_with_the_changed_dim_symbolic(tmp_path):
    model = Scaled().eval()
    compiled = fuselm.compile(model, target="cpu", cache_dir=str(tmp_path))
    check(compiled, model, torch.randn(2, 5, 16))
    assert all(isinstance(d, int) for d in compiled.graph.inputs[0].type.shape)  # static at first
    captures, codegen = counts()
    check(compiled, model, torch.randn(2, 9, 16))  # the sequence dim changed: one recompile
    assert counts()[0] == captures + 1
    x_shape = compiled.graph.inputs[0].type.shape
    assert x_shape[0] == 2 and not isinstance(x_shape[1], int) and x_shape[2] == 16
    captures, codegen = counts()
    for length in (4, 13, 31):  # a third and later sizes: no capture, no codegen
        check(compiled, model, torch.randn(2, length, 16))
    assert counts() == (captures, codegen)
    assert len(compiled.entries) == 2


def test_dynamic_true_is_symbolic_from_the_start_and_false_recompiles_per_shape(tmp_path):
    model = Scaled().eval()
    dynamic = fuselm.compile(model, target="cpu", dynamic=True, cache_dir=str(tmp_path))
    check(dynamic, model, torch.randn(2, 5, 16))
    captures = counts()[0]
    check(dynamic, model, torch.randn(3, 7, 16))
    assert counts()[0] == captures and len(dynamic.entries) == 1
    static = fuselm.compile(model, target="cpu", dynamic=False, cache_dir=str(tmp_path))
    for length in (5, 6, 5):
        check(static, model, torch.randn(2, length, 16))
    assert len(static.entries) == 2 and all(isinstance(d, int) for e in static.entries for d in e.graph.inputs[0].type.shape)


def test_non_tensor_arguments_are_guarded(tmp_path):
    model = Scaled().eval()
    compiled = fuselm.compile(model, target="cpu", cache_dir=str(tmp_path))
    x = torch.randn(2, 4, 16)
    check(compiled, model, x, scale=0.5)
    check(compiled, model, x, scale=0.5)
    assert len(compiled.entries) == 1
    check(compiled, model, x, scale=3.0)  # a new value: a new graph, with the new constant
    check(compiled, model, x, scale=3.0, power=2)
    assert len(compiled.entries) == 3
    check(compiled, model, x, scale=0.5)  # the first entry serves its value again
    assert len(compiled.entries) == 3


def test_recompile_limit_names_the_changing_dims(tmp_path):
    model = Scaled().eval()
    compiled = fuselm.compile(model, target="cpu", dynamic=False, recompile_limit=2, cache_dir=str(tmp_path))
    for length in (4, 5, 6):
        check(compiled, model, torch.randn(2, length, 16))
    with pytest.raises(FuselmError, match=r"recompile_limit=2.*x dim 1 took sizes \[4, 5, 6, 7\]"):
        compiled(torch.randn(2, 7, 16))


def test_example_inputs_compile_now_and_training_mode_is_left_alone(tmp_path):
    model = Scaled().train()
    captures = counts()[0]
    compiled = fuselm.compile(model, (torch.randn(2, 3, 16),), target="cpu", cache_dir=str(tmp_path))
    assert counts()[0] == captures + 1 and model.training
    assert compiled.graph.nodes
    model.eval()
    check(compiled, model, torch.randn(2, 3, 16))
    assert not model.training


def test_hugging_face_model_output_keeps_its_structure(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    compiled = fuselm.compile(model, target="cpu", cache_dir=str(tmp_path))
    got = compiled(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-4, rtol=1e-4)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="takes a torch.nn.Module or an ONNX model .*, got function"):
        fuselm.compile(lambda x: x)
    with pytest.raises(TypeError, match="dynamic must be"):
        fuselm.compile(Scaled(), dynamic="yes")


class SlidingWindow(torch.nn.Module):
    """A mask made from arange(T) alone, used twice: its kernel has no tensor input that
    gives T, so partition hands it one for its shape."""

    def forward(self, x):
        i = torch.arange(x.shape[1])
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
        scores = (x @ x.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1) @ x


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_kernels_whose_sizes_no_input_gives_run_at_every_size(target, tmp_path):
    model = SlidingWindow()
    compiled = fuselm.compile(model, target=target, dynamic=True, strict=True, cache_dir=str(tmp_path))
    for length in (5, 9):
        x = torch.randn(2, length, 8)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(compiled.entries) == 1 and compiled.fallbacks == {}


# ----------------------------------------------------------------------------- found by a hostile probe
class Returns(torch.nn.Module):
    def forward(self, x, k=1):
        return {"y": x * k, "none": None, "pair": (x + 1, None)}


def test_none_in_the_result_is_kept(tmp_path):
    """A None output leaf once stood for a tensor's place (StopIteration)."""
    compiled = fuselm.compile(Returns(), target="cpu", cache_dir=str(tmp_path))
    got = compiled(torch.ones(3))
    assert got["none"] is None and got["pair"][1] is None
    torch.testing.assert_close(got["pair"][0], torch.full((3,), 2.0))


def test_constants_are_guarded_with_their_type_and_sign(tmp_path):
    """1, 1.0 and True (and 0.0 and -0.0) once shared a graph: int results for a float k."""
    compiled = fuselm.compile(Returns(), target="cpu", cache_dir=str(tmp_path))
    x = torch.tensor([1, 2])
    assert compiled(x, 1)["y"].dtype == torch.int64
    assert compiled(x, 1.0)["y"].dtype == torch.float32
    assert torch.equal(1 / compiled(torch.ones(2), -0.0)["y"], torch.full((2,), -float("inf")))
    assert len(compiled.entries) == 3


def test_arguments_that_cannot_be_guarded_are_refused(tmp_path):
    """A numpy array was guarded by its (truncated) repr: changes went unseen."""
    import numpy as np

    compiled = fuselm.compile(Returns(), target="cpu", cache_dir=str(tmp_path))
    with pytest.raises(TypeError, match="argument 'k' is a ndarray, which is neither a tensor nor a plain constant"):
        compiled(torch.ones(3), np.zeros(3))


def test_a_size_returned_from_a_symbolic_shape_follows_the_input(tmp_path):
    """x.shape[0] of a symbolic dim was once returned as the capture's sympy symbol."""
    class Size(torch.nn.Module):
        def forward(self, x):
            return x * 2, x.shape[0]

    compiled = fuselm.compile(Size(), target="cpu", dynamic=True, cache_dir=str(tmp_path))
    assert [compiled(torch.ones(n))[1] for n in (3, 5, 7)] == [3, 5, 7] and len(compiled.entries) == 1


def test_a_rank_change_is_another_graph(tmp_path):
    compiled = fuselm.compile(Returns(), target="cpu", cache_dir=str(tmp_path))
    compiled(torch.ones(8))
    torch.testing.assert_close(compiled(torch.ones(2, 8))["y"], torch.ones(2, 8))
    assert len(compiled.entries) == 2


def test_training_mode_is_guarded(tmp_path):
    """Dropout in training mode drops; the eval graph is not reused for it (nor back)."""
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    compiled = fuselm.compile(model, target="cpu", cache_dir=str(tmp_path))
    assert (compiled(torch.ones(2000)) == 0).sum() > 500
    model.eval()
    torch.testing.assert_close(compiled(torch.ones(2000)), torch.ones(2000))
    assert len(compiled.entries) == 2 and not model.training


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="recompile_limit must be an int >= 0"):
        fuselm.compile(Scaled(), recompile_limit=-1)
    with pytest.raises(ValueError, match="recompile_limit must be an int >= 0"):
        fuselm.compile(Scaled(), recompile_limit="8")
    with pytest.raises(TypeError, match="dynamic must be"):
        fuselm.compile(Scaled(), dynamic={"x": [0]})


def test_donated_weights_refuse_a_recompile(tmp_path):
    """The first graph owns donated weights (the module's are scrambled): a later capture
    would read garbage, so it is refused with a message saying why."""
    model = Scaled().eval()
    compiled = fuselm.compile(model, (torch.randn(2, 3, 16),), target="cpu", dynamic={"x": {1: "S"}},
                              donate_weights=True, cache_dir=str(tmp_path))
    compiled(torch.randn(2, 7, 16))  # the symbolic dim serves it
    with pytest.raises(FuselmError, match="donate_weights=True gave the model's weights to the first one"):
        compiled(torch.randn(3, 7, 16))


@pytest.mark.parametrize("dynamic, error, message", [
    ({"input": {5: "T"}}, ValueError, r"dynamic\['input'\]: dim 5 is not a dim of a rank-2 tensor"),
    ({"input": {0: 3}}, TypeError, r"dynamic\['input'\]\[0\] must be a symbol"),
    ({"input": ["T"]}, TypeError, r"dynamic must be None, True, False or a dict"),
])
def test_a_dynamic_spec_naming_no_dim_is_refused_with_the_parameter(dynamic, error, message):
    """These were an IndexError and "'int' object is not iterable" from deep in capture."""
    with pytest.raises(error, match=message):
        fuselm.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), target="cpu", dynamic=dynamic)
