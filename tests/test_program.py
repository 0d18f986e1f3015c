"""The cpu program (codegen/tvm/program.py): a whole graph as one Relax VM call.

Each model is compiled once; its program runs beside the Python executor (the reference,
kernel by kernel over the same kernels) on batches that take every branch the program
decides in the VM: prefill (gemm, query tiles), several decode rows (gemv, one row per
tile) and one row (gemv1). The VM's instrument counts the calls a forward makes.
"""
import pytest
import torch

import fuselm
from fuselm.api import compile_lm
from fuselm.models import bert, gpt2, llama
from fuselm.models.config import BertConfig, GPT2Config, LlamaConfig
from fuselm.models.contract import pack_prompts
from fuselm.models.loading import LoadedModel

BATCHES = {  # prompt lengths: a prefill over the GEMV row limit, decode-like rows, one row
    "prefill": (7, 13),
    "rows": (1, 1, 1),
    "one": (1,),
}


def _lm(config, model_class):
    torch.manual_seed(0)
    model = model_class(config).eval()
    for p in model.parameters():  # weights away from init values, so every op matters
        p.data.add_(torch.randn_like(p) * 0.02)
    return LoadedModel(model, None, config, None)


MODELS = {
    "llama": lambda: _lm(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                         llama.LlamaForCausalLM),
    "gpt2": lambda: _lm(GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=3), gpt2.GPT2LMHeadModel),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("program_cache"))


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled_lm(request, cache_dir):
    loaded = MODELS[request.param]()
    compiled = compile_lm(loaded, "cpu", 16, torch.float32, cache_dir)
    return loaded.config, compiled, compiled.entries[-1]


def _inputs(config, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    return pack_prompts(config, prompts).as_tuple()


def _called_functions(program, run):
    """The functions the VM calls while `run()` runs, by name, in order."""
    names = []

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            names.append(str(name))
        return 0

    program.set_instrument(instrument)
    try:
        run()
    finally:
        program.set_instrument(lambda *args: 0)
    return names


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_program_equals_the_python_executor(compiled_lm, batch):
    config, compiled, entry = compiled_lm
    assert entry.program is not None
    inputs = _inputs(config, BATCHES[batch])
    reference_inputs = tuple(t.clone() for t in inputs)
    calls = entry.program.calls
    logits = compiled(*inputs)
    assert entry.program.calls == calls + 1  # the whole forward is one VM call
    reference = entry._executor(*reference_inputs)
    torch.testing.assert_close(logits, reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs[2], reference_inputs[2], rtol=1e-5, atol=1e-5)  # the KV cache


def test_kv_cache_is_written_in_place_in_the_callers_tensor(compiled_lm):
    config, compiled, entry = compiled_lm
    inputs = _inputs(config, BATCHES["prefill"])
    cache = inputs[2]
    address, before = cache.data_ptr(), cache.clone()
    called = _called_functions(entry.program, lambda: compiled(*inputs))
    assert cache.data_ptr() == address and not torch.equal(cache, before)
    assert not any("copy" in name.lower() and "cache" in name.lower() for name in called)


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_one_call_tir_per_kernel_launch_and_nothing_from_python(compiled_lm, batch):
    config, compiled, entry = compiled_lm
    inputs = _inputs(config, BATCHES[batch])
    called = _called_functions(entry.program, lambda: compiled(*inputs))
    kernels = [name for name in called if "__" in name]  # our kernels' functions are <kernel>__<form>
    assert len(kernels) == entry.program.launches
    # everything else the VM calls is its own builtins or a kernel Relax legalized (views)
    others = {name for name in called if "__" not in name}
    assert all(name.startswith("vm.builtin.") or not name.startswith(("fuselm", "python")) for name in others), others


def test_encoder_program_equals_the_executor_at_two_shapes(cache_dir):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=90, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=80, max_position_embeddings=64)
    model = bert.BertModel(config).eval()
    ids = torch.randint(0, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.int64)
    compiled = fuselm.compile(model, (ids, mask), target="cpu", dynamic=True, cache_dir=cache_dir)
    entry = compiled.entries[-1]
    assert entry.program is not None
    for batch, seq in ((2, 9), (3, 37)):
        ids = torch.randint(0, 90, (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq // 2 :] = 0  # padding: the mask reaches attention
        got = compiled(ids, mask)
        reference = entry._executor(ids, mask)
        torch.testing.assert_close(got, reference if isinstance(reference, torch.Tensor) else reference[0],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], model(ids, mask)[1], rtol=1e-4, atol=1e-4)
    assert len(compiled.entries) == 1  # the second shape reused the program


def test_second_compile_builds_no_program(compiled_lm, cache_dir):
    from fuselm.codegen.cache import program_stats, stats

    config, compiled, entry = compiled_lm
    runs, builds = stats["codegen_runs"], program_stats["codegen_runs"]
    loaded = MODELS["llama" if isinstance(config, LlamaConfig) else "gpt2"]()
    again = compile_lm(loaded, "cpu", 16, torch.float32, cache_dir)
    assert again.entries[-1].program is not None
    assert stats["codegen_runs"] == runs and program_stats["codegen_runs"] == builds


def test_program_off_runs_the_executor(monkeypatch, cache_dir):
    monkeypatch.setenv("FUSELM_PROGRAM", "0")
    compiled = compile_lm(MODELS["llama"](), "cpu", 16, torch.float32, cache_dir)
    assert compiled.entries[-1].program is None


def test_a_graph_of_few_launches_runs_kernel_by_kernel_unless_asked(monkeypatch, cache_dir):
    from fuselm.api import PROGRAM_MIN_LAUNCHES

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval(), torch.randn(3, 8)
    compiled = fuselm.compile(model, (x,), target="cpu", cache_dir=cache_dir)
    assert sum(k.launches for k in compiled.kernels) < PROGRAM_MIN_LAUNCHES and compiled.entries[-1].program is None
    monkeypatch.setenv("FUSELM_PROGRAM", "1")
    compiled = fuselm.compile(model, (x,), target="cpu", cache_dir=cache_dir)
    assert compiled.entries[-1].program is not None
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_two_threads_share_one_program(compiled_lm):
    import threading

    config, compiled, entry = compiled_lm
    batches = [_inputs(config, BATCHES["prefill"], seed=s) for s in range(4)]
    alone = [compiled(*tuple(t.clone() for t in b)) for b in batches]
    results = [None] * len(batches)

    def run(i):
        for _ in range(3):
            results[i] = compiled(*tuple(t.clone() for t in batches[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, alone):
        assert torch.equal(got, expected)


def test_unaligned_and_strided_inputs_are_read_correctly(compiled_lm):
    config, compiled, entry = compiled_lm
    inputs = list(_inputs(config, BATCHES["prefill"]))
    expected = compiled(*tuple(t.clone() for t in inputs))
    ids = inputs[0]
    padded = torch.zeros(ids.numel() + 1, dtype=ids.dtype)
    padded[1:] = ids
    inputs[0] = padded[1:]  # 8 bytes past an aligned start
    inputs[1] = torch.stack([inputs[1], inputs[1]], dim=1)[:, 0]  # strided
    inputs[2] = inputs[2].clone().zero_()
    torch.testing.assert_close(compiled(*inputs), expected, rtol=0, atol=0)


class ConvThenLinear(torch.nn.Module):
    """A convolution (an ATen fallback: no IR op) between generated kernels."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.linear = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.linear(torch.relu(self.conv(x)).transpose(1, 2))


def test_a_fallback_op_runs_inside_the_program_through_a_registered_function(cache_dir, monkeypatch):
    monkeypatch.setenv("FUSELM_PROGRAM", "1")  # a program for its 4 launches too
    torch.manual_seed(0)
    model = ConvThenLinear().eval()
    x = torch.randn(2, 4, 9)
    with pytest.warns(fuselm.FallbackWarning, match="convolution"):
        compiled = fuselm.compile(model, (x,), target="cpu", cache_dir=cache_dir)
    entry = compiled.entries[-1]
    assert entry.program is not None and entry.program.fallbacks
    called = _called_functions(entry.program, lambda: compiled(x))
    assert [name for name in called if name.startswith("fuselm.fallback.")] == entry.program.fallbacks
    assert len([name for name in called if "__" in name]) == entry.program.launches  # the kernels: call_tir each
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), entry._executor(x), rtol=0, atol=0)


def test_complex_values_run_on_the_executor(cache_dir, monkeypatch):
    monkeypatch.setenv("FUSELM_PROGRAM", "1")
    class Spectrum(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real + 1

    x = torch.randn(4, 8)
    with pytest.warns(fuselm.FallbackWarning):
        compiled = fuselm.compile(Spectrum(), (x,), target="cpu", cache_dir=cache_dir)
    assert compiled.entries[-1].program is None
    torch.testing.assert_close(compiled(x), torch.fft.fft(x).real + 1)


def test_a_forward_frees_each_kernel_result_after_its_last_use(monkeypatch, cache_dir):
    """Every kernel call sits in a choice of forms (serial or parallel, gemv or gemm) made in
    the VM. Emitted as an `If` in `main`, each result stayed alive until the forward
    returned (a 2,048-token SmolLM2 prefill held 1.5 GB); outlined into functions, a
    result's memory is free for the next kernel after its last use, so 24 layers write
    their outputs to a few buffers (malloc's choice), not 24."""
    monkeypatch.setenv("FUSELM_PROGRAM", "1")
    torch.manual_seed(0)
    layers = 24
    model = torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(32, 32), torch.nn.GELU())]).eval()
    x = torch.randn(300, 32)
    compiled = fuselm.compile(model, (x,), target="cpu", dynamic=True, cache_dir=cache_dir)
    program = compiled.entries[-1].program
    assert program is not None and program.launches == layers
    outputs = []

    def instrument(func, name, before_run, ret_value, *args):
        if before_run and "__" in str(name):  # one of our kernels: its result is its last argument
            outputs.append(torch.from_dlpack(args[-1]).data_ptr())
        return 0

    program.set_instrument(instrument)
    try:
        result = compiled(x)
    finally:
        program.set_instrument(lambda *args: 0)
    torch.testing.assert_close(result, model(x), rtol=1e-4, atol=1e-4)
    assert len(outputs) == layers
    assert len(set(outputs)) <= layers // 3, f"{len(set(outputs))} distinct result buffers for {layers} kernels"


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_memory_does_not_grow_with_each_new_size(monkeypatch, cache_dir):
    """A server runs a new token count at almost every step. The VM's pooled allocator kept
    each freed buffer for a later request of the same size and never returned it, so
    every new size left its buffers behind (here ~10 MB a size); the program's memory
    must be reused across sizes."""
    monkeypatch.setenv("FUSELM_PROGRAM", "1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(1024, 1024), torch.nn.GELU())]).eval()
    compiled = fuselm.compile(model, (torch.randn(8, 1024),), target="cpu", dynamic=True, cache_dir=cache_dir)
    assert compiled.entries[-1].program is not None
    inputs = [torch.randn(rows, 1024) for rows in range(600, 640)]  # 2.4 MB an activation
    compiled(inputs[0])
    before = _resident_mib()
    for x in inputs:
        compiled(x)
    grown = _resident_mib() - before
    assert grown < 100, f"resident memory grew {grown:.0f} MiB over {len(inputs)} sizes"
    torch.testing.assert_close(compiled(inputs[-1]), model(inputs[-1]), rtol=1e-4, atol=1e-4)
