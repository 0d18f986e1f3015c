"""`fuselm.compile` end to end: kernels from the cache, dumps, errors.

The cuda target runs its Triton kernels in Triton's interpreter here (tiny models only:
the interpreter is slow); the cpu target's TVM kernels run natively.
"""
import json

import pytest
import torch

import fuselm.api as api
from fuselm.codegen import cache as kernel_cache
from fuselm.errors import FuselmError
from fuselm.target import get_target
from fuselm.models.contract import capture_example, pack_prompts
from tiny_models import tiny_llama

PROMPTS = [[[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[3] * 19, [4, 5]]]


@pytest.fixture(scope="module")
def llama_model():
    return tiny_llama()


def compile_tiny(config, model, target, cache_dir, **kwargs):
    example, dynamic = capture_example(config)
    return api.compile(model, example, target=target, dynamic=dynamic, cache_dir=str(cache_dir), **kwargs)


def assert_runs_like_eager(compiled, config, model, prompts, tolerance=1e-4):
    expected_inputs = pack_prompts(config, prompts, all_logits=True)
    inputs = pack_prompts(config, prompts, all_logits=True)
    with torch.no_grad():
        expected = model(*expected_inputs.as_tuple())
    logits = compiled(*inputs.as_tuple())  # what the model returns; the cache is written in place
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(inputs.kv_cache, expected_inputs.kv_cache, atol=tolerance, rtol=tolerance)


def test_two_layer_llama_on_cuda_interpreter_matches_eager(llama_model, tmp_path):
    config, model = llama_model
    kernel_cache.stats.clear()
    compiled = compile_tiny(config, model, "cuda", tmp_path)
    generated = kernel_cache.stats["codegen_runs"]
    assert generated == len(compiled.kernels) and generated <= 16
    for prompts in PROMPTS:  # two token counts, no new kernels
        assert_runs_like_eager(compiled, config, model, prompts)
    assert kernel_cache.stats["codegen_runs"] == generated
    assert all(k.source_path and k.source_path.endswith(".py") for k in compiled.kernels)


def test_second_compile_generates_nothing(llama_model, tmp_path):
    config, model = llama_model
    compile_tiny(config, model, "cuda", tmp_path)
    kernel_cache.stats.clear()
    again = compile_tiny(config, model, "cuda", tmp_path)
    assert kernel_cache.stats["codegen_runs"] == 0
    assert kernel_cache.stats["disk_hits"] == len(again.kernels)
    assert_runs_like_eager(again, config, model, PROMPTS[0])


def test_dump_dir_writes_ir_kernels_and_index(llama_model, tmp_path):
    config, model = llama_model
    dump = tmp_path / "dump"
    compiled = compile_tiny(config, model, "cuda", tmp_path / "cache", dump_dir=str(dump))
    assert (dump / "00_captured.ir").exists() and any(p.name.endswith("_fuse_epilogue.ir") for p in dump.iterdir())
    index = json.loads((dump / "index.json").read_text())
    assert set(index) == {k.name for k in compiled.kernels}
    for name, entry in index.items():
        assert (dump / entry["source"]).read_text().startswith(('"""', "#", "import"))
        assert entry["launches"] and all(line.startswith("%") for launch in entry["launches"] for line in launch["nodes"])
    gated = [e for e in index.values() if e["ops"] == ["gemm"] and "gated_silu" in e["launches"][0]["nodes"][0]]
    assert len(gated) == 1 and len(gated[0]["launches"]) == 2  # one kernel, both layers


def test_cuda_without_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        get_target("cuda").check_available()  # a GPU is there: accepted
    else:
        with pytest.raises(FuselmError, match="needs a CUDA GPU"):
            get_target("cuda").check_available()


def test_unknown_target_is_refused(llama_model):
    config, model = llama_model
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        compile_tiny(config, model, "tpu", "/nonexistent")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_decoders_compiled_for_cpu_match_eager(model_type, tmp_path):
    from fuselm.models import gpt2
    from fuselm.models.config import GPT2Config

    if model_type == "gpt2":
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        model = gpt2.GPT2LMHeadModel(config).eval()
    else:
        config, model = tiny_llama()
    kernel_cache.stats.clear()
    compiled = compile_tiny(config, model, "cpu", tmp_path)
    generated = kernel_cache.stats["codegen_runs"]
    for prompts in PROMPTS:
        assert_runs_like_eager(compiled, config, model, prompts)
    assert kernel_cache.stats["codegen_runs"] == generated  # new lengths, no new kernels
    assert all(k.source_path.endswith(".tir") for k in compiled.kernels)


class NormGatedBlock(torch.nn.Module):
    """Elementwise, LayerNorm, RMSNorm, a gemm with a residual: one of each cpu kernel kind."""

    def __init__(self):
        super().__init__()
        self.norm, self.rms, self.proj = torch.nn.LayerNorm(32), torch.nn.RMSNorm(32), torch.nn.Linear(32, 32)

    def forward(self, x, y):
        h = self.rms(self.norm(x + y)) * torch.sigmoid(x)
        return self.proj(h) + y


def test_cpu_kernels_take_misaligned_and_strided_inputs(tmp_path):
    """TVM's code assumes 64-byte aligned, compact buffers: views at odd offsets and strided
    views are copied before the call (once they faulted), and the results equal eager."""
    torch.manual_seed(0)
    model = NormGatedBlock().eval()
    example = (torch.randn(4, 32), torch.randn(4, 32))
    compiled = api.compile(model, example, target="cpu", dynamic={"x": {0: "T"}, "y": {0: "T"}},
                           cache_dir=str(tmp_path))
    storage = torch.randn(3 + 6 * 64)
    misaligned = storage[1:1 + 6 * 32].view(6, 32)  # 4 bytes past an aligned address
    strided = storage[3:3 + 6 * 64].view(6, 64)[:, ::2]  # every other column, misaligned too
    assert misaligned.data_ptr() % 64 and not strided.is_contiguous()
    for x, y in ((misaligned, strided), (strided, misaligned), (misaligned.clone(), strided.clone())):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, y), model(x, y), atol=1e-5, rtol=1e-5)


def test_kernel_ready_copies_only_what_it_must():
    from fuselm.codegen.memory import check_kernel_ready, kernel_ready

    aligned = torch.randn(64)
    assert kernel_ready(aligned) is aligned and check_kernel_ready(aligned, "cache") is aligned
    shifted = aligned[1:]
    copy = kernel_ready(shifted)
    assert copy.data_ptr() % 64 == 0 and torch.equal(copy, shifted)
    with pytest.raises(ValueError, match="the KV cache must be contiguous and 64-byte aligned.*offset 4"):
        check_kernel_ready(shifted, "the KV cache")
