"""Forward-pass benchmark: fuselm against its peers, measured in one run.

    python benchmarks/forward.py [--quick]                               # cpu, real weights
    PYTHONPATH=. python benchmarks/forward.py --target cuda [--quick]    # GPU, random weights

Rows:
- SmolLM2-135M-Instruct prefill of one prompt at 128 and 512 tokens (logits of the last
  token): Hugging Face transformers eager, torch.compile of it, fuselm compiled for cpu.
- all-MiniLM-L6-v2 on 64 sequences with lengths uniform in 8..128 (padded batch):
  transformers eager, torch.compile, ONNX Runtime (2 threads), fuselm compiled for cpu.
- fuselm's cold and cached compile times for SmolLM2 (targets: < 60 s and < 10 s).

`--target cuda` (a lent H100/H200: no gguf, no TVM, no real weights there) runs the same
rows on random weights of the same shapes, on the GPU:
- SmolLM2-135M shape (fuselm's LlamaConfig with SmolLM2's sizes), bf16 (`--lm-dtype fp16`
  for fp16), prefill of one prompt at 128 and 512 tokens through the LM contract with a
  fresh paged cache: fuselm compiled for cuda against the same fuselm model eager and
  under `torch.compile` (its paged-attention custom op runs as one opaque call of its
  torch reference there), and, when transformers is importable, its LlamaForCausalLM
  with the same config and weights, eager and under `torch.compile`.
- all-MiniLM-L6-v2 shape, fp16, padded batches of 64 and 1,024 sequences (lengths
  uniform in 8..128, same generator as on cpu): transformers' BertModel eager and under
  `torch.compile`, ONNX Runtime's CUDA provider when the GPU machine's onnxruntime has
  one, and fuselm compiled for cuda (on the same weights).
Every fuselm kernel is compiled by a first call, and its output checked against the
eager model (max abs diff printed), before anything is timed; times are taken with
torch.cuda.synchronize() around each run.

Each time is the median of several runs after warm-up; ratios are peer time / fuselm
time (> 1 means fuselm is faster). Speed is never asserted in tests: this script is
where it is measured.
"""
from __future__ import annotations

import argparse
import os

# torch's OpenMP workers otherwise spin for 200 ms after each torch op and take the
# cores from TVM's thread pool when both run in one process (set before torch loads).
os.environ.setdefault("KMP_BLOCKTIME", "0")
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fuselm  # noqa: E402
from fuselm.models import fetch, load  # noqa: E402
from fuselm.models.contract import capture_example, pack_prompts  # noqa: E402

torch.set_num_threads(2)


def median_ms(fn, warmup: int = 2, runs: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def print_table(title: str, rows: list, digits: int = 1) -> None:
    base = next(ms for name, ms in rows if name.startswith("fuselm"))
    print(f"\n{title}")
    print(f"  {'system':<34}{'ms':>10}{'peer / fuselm':>16}")
    for name, ms in rows:
        print(f"  {name:<34}{ms:>10.{digits}f}{ms / base:>15.2f}x")


# ----------------------------------------------------------------------------- SmolLM2
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    path = fetch("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def compile_smollm2(loaded, cache_dir: str):
    example, dynamic = capture_example(loaded.config)
    start = time.perf_counter()
    compiled = fuselm.compile(loaded.model, example, target="cpu", dynamic=dynamic, cache_dir=cache_dir)
    return compiled, time.perf_counter() - start


def bench_smollm2(lengths: list, runs: int) -> None:
    loaded = load("smollm2-135m")
    with tempfile.TemporaryDirectory() as cache_dir:
        compiled, cold = compile_smollm2(loaded, cache_dir)
        _, cached = compile_smollm2(loaded, cache_dir)
    print(f"\nSmolLM2-135M compile for cpu: cold {cold:.1f} s (target < 60 s), cached {cached:.1f} s (target < 10 s)")
    hf = hf_smollm2()
    hf_compiled = torch.compile(hf)
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, loaded.config.vocab_size, (length,), generator=generator)
        inputs = pack_prompts(loaded.config, [ids.tolist()])

        def run_hf(model=hf):
            with torch.no_grad():
                return model(ids[None], logits_to_keep=1).logits

        def run_fuselm():
            return compiled(*inputs.as_tuple())

        rows = [
            ("transformers eager", median_ms(run_hf, runs=runs)),
            ("torch.compile (transformers)", median_ms(lambda: run_hf(hf_compiled), warmup=3, runs=runs)),
            ("fuselm cpu", median_ms(run_fuselm, runs=runs)),
        ]
        print_table(f"SmolLM2-135M prefill, {length} tokens, fp32", rows)


# ----------------------------------------------------------------------------- MiniLM
def minilm_batch(vocab_size: int, count: int = 64):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 129, (count,), generator=generator).tolist()
    ids = torch.zeros(count, max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1000, vocab_size, (n,), generator=generator)
        ids[row, 0] = 101
        mask[row, :n] = 1
    return ids, mask, sum(lengths) / ids.numel()


def onnx_session(hf_model, ids, mask, provider: str = "CPUExecutionProvider", threads: int = 2,
                 spinning: bool = True):
    """ONNX Runtime's session of `hf_model` exported (legacy exporter, opset 17); also the
    exported file's path. Export an instance nothing else times: exporting leaves the
    module computing other values (found in benchmarks/encode.py)."""
    import onnxruntime

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = Path(tempfile.mkdtemp()) / "minilm.onnx"
    torch.onnx.export(Wrapper(hf_model), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                    "last_hidden_state": {0: "b", 1: "s"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:  # its idle workers spin after a run and slow whatever runs next on the same cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=[provider]), path


def bench_minilm(runs: int) -> None:
    from transformers import BertModel

    loaded = load("minilm-l6")
    hf = BertModel.from_pretrained(str(fetch("minilm-l6"))).eval()
    ids, mask, real = minilm_batch(loaded.tokenizer.vocab_size)
    example, dynamic = capture_example(loaded.config)
    compiled = fuselm.compile(loaded.model, example, target="cpu", dynamic=dynamic)
    hf_compiled = torch.compile(hf)
    session, onnx_path = onnx_session(BertModel.from_pretrained(str(fetch("minilm-l6"))).eval(), ids, mask)
    from_onnx = fuselm.compile(str(onnx_path), target="cpu")  # the same file ONNX Runtime runs
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def run_hf(model=hf):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    rows = [
        ("transformers eager, padded", median_ms(run_hf, runs=runs)),
        ("torch.compile, padded", median_ms(lambda: run_hf(hf_compiled), warmup=3, runs=runs)),
        ("ONNX Runtime, padded, 2 threads", median_ms(lambda: session.run(None, feeds), runs=runs)),
        ("fuselm cpu, padded", median_ms(lambda: compiled(ids, mask), runs=runs)),
        ("fuselm cpu from the ONNX file, padded", median_ms(lambda: from_onnx(ids, mask), runs=runs)),
    ]
    print_diff("fuselm from ONNX vs ONNX Runtime", from_onnx(ids, mask)[0], torch.from_numpy(session.run(None, feeds)[0]))
    print_table(f"all-MiniLM-L6-v2, 64 sequences, lengths 8..128 ({real:.0%} real tokens), fp32", rows)


# ----------------------------------------------------------------------------- cuda
LM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_median_ms(fn, warmup: int = 3, runs: int = 20) -> float:
    """median_ms for GPU work: the clock starts and stops on an idle device."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peer_row(name: str, fn, runs: int):
    """(name, ms), or None when the peer fails: a GPU session is too short to lose to one."""
    try:
        return name, cuda_median_ms(fn, runs=runs)
    except Exception as error:
        print(f"  {name}: failed ({error!r:.300}), row left out")
        return None


def synchronize() -> None:
    if torch.cuda.is_available():  # absent only when the builders are tried on cpu
        torch.cuda.synchronize()


def first_output(out):
    """The compiled LM returns (logits, kv_cache); the encoder its hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def print_diff(label: str, got, expected) -> None:
    diff = (got.float() - expected.float()).abs().max().item()
    print(f"  max |{label}| = {diff:.3g} (max |reference| = {expected.float().abs().max().item():.3g})")


def has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def transformers_version() -> str:
    if not has_transformers():
        return "no transformers (its rows left out)"
    import transformers

    return f"transformers {transformers.__version__}"


def smollm2_shape():
    from fuselm.models.config import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def minilm_shape():
    from fuselm.models.config import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512)


def random_llama(config, dtype: torch.dtype, device: str = "cuda"):
    from fuselm.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    for param in model.parameters():  # transformers' initializer (norms stay ones): no N(0, 1) embedding logits
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.02)
    # .to(device) too: the rotary frequencies are built on cpu whatever the default device
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def hf_llama(config, model):
    """transformers' LlamaForCausalLM of the same config, holding `model`'s weights."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.dim_per_head,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings)
    weight = next(model.parameters())
    with torch.device(weight.device):
        hf = transformers.LlamaForCausalLM(hf_config)
    hf = hf.to(weight.dtype).eval().requires_grad_(False)
    hf.load_state_dict(model.state_dict(), strict=True)  # parameter names match (the lm_head is tied)
    return hf


def random_minilm(config, dtype: torch.dtype, device: str = "cuda"):
    """fuselm's BertModel and, when transformers is importable, its BertModel on the same weights."""
    from fuselm.models.bert import BertModel, hf_to_fuselm_state_dict

    torch.manual_seed(0)
    with torch.device(device):
        model = BertModel(config)
    hf = None
    if has_transformers():
        import transformers

        hf_config = transformers.BertConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
            pad_token_id=config.pad_token_id)
        with torch.device(device):
            hf = transformers.BertModel(hf_config)  # its initializer: normal(0, 0.02), as trained BERTs start
        hf = hf.to(dtype).eval().requires_grad_(False)
        model.load_state_dict(hf_to_fuselm_state_dict(hf.state_dict()), strict=True)
    return model.to(dtype).eval().requires_grad_(False), hf


def compile_cuda(model, config, dtype: torch.dtype):
    example, dynamic = capture_example(config, dtype=dtype)
    device = next(model.parameters()).device
    start = time.perf_counter()
    compiled = fuselm.compile(model, tuple(t.to(device) for t in example), target="cuda", dynamic=dynamic)
    return compiled, time.perf_counter() - start


def first_call(label: str, fn):
    """Run `fn` once (Triton compiles fuselm's kernels on their first launch) and time it."""
    start = time.perf_counter()
    out = first_output(fn())
    synchronize()
    print(f"  {label}: first call (kernel builds) {time.perf_counter() - start:.1f} s")
    return out


def bench_smollm2_cuda(lengths: list, runs: int, dtype: torch.dtype, device_name: str) -> None:
    config = smollm2_shape()
    model = random_llama(config, dtype)
    compiled, seconds = compile_cuda(model, config, dtype)
    print(f"\nSmolLM2-135M shape, random weights: fuselm compile for cuda {seconds:.1f} s, "
          f"{len(compiled.kernels)} kernels")
    model_compiled = torch.compile(model)
    hf = hf_llama(config, model) if has_transformers() else None
    hf_compiled = torch.compile(hf) if hf is not None else None
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (length,), generator=generator)

        def fresh():
            return pack_prompts(config, [ids.tolist()], dtype=dtype).to("cuda")

        got = first_call(f"{length} tokens", lambda: compiled(*fresh().as_tuple()))
        with torch.no_grad():
            expected = model(*fresh().as_tuple())
        print_diff("fuselm cuda - fuselm eager", got, expected)
        if hf is not None:
            with torch.no_grad():
                hf_logits = hf(ids[None].to("cuda"), logits_to_keep=1).logits[0]
                print_diff("fuselm cuda - transformers eager", got, hf_logits)
        rows = smollm2_rows(compiled, model, model_compiled, hf, hf_compiled, fresh(), ids[None].to("cuda"), runs)
        print_table(f"SmolLM2-135M shape prefill, {length} tokens, {dtype_name(dtype)}, {device_name}", rows, digits=2)


def smollm2_rows(compiled, model, model_compiled, hf, hf_compiled, inputs, hf_ids, runs: int) -> list:
    # One cache for every timed run: a prefill writes each slot before it reads it.
    def run_model(m=model):
        with torch.no_grad():
            return m(*inputs.as_tuple())

    def run_hf(m=hf):
        with torch.no_grad():
            return m(hf_ids, logits_to_keep=1).logits

    rows = [
        peer_row("eager (fuselm model)", run_model, runs),
        peer_row("torch.compile (fuselm model)", lambda: run_model(model_compiled), runs),
    ]
    if hf is not None:
        rows += [
            peer_row("transformers eager", run_hf, runs),
            peer_row("torch.compile (transformers)", lambda: run_hf(hf_compiled), runs),
        ]
    fuselm_ms = cuda_median_ms(lambda: compiled(*inputs.as_tuple()), runs=runs)
    return [row for row in rows if row] + [("fuselm cuda", fuselm_ms)]


def bench_minilm_cuda(counts: list, runs: int, device_name: str) -> None:
    config, dtype = minilm_shape(), torch.float16
    model, hf = random_minilm(config, dtype)
    compiled, seconds = compile_cuda(model, config, dtype)
    print(f"\nall-MiniLM-L6-v2 shape, random weights: fuselm compile for cuda {seconds:.1f} s, "
          f"{len(compiled.kernels)} kernels")
    batches = [minilm_batch(config.vocab_size, count) for count in counts]
    batches = [(ids.to("cuda"), mask.to("cuda"), real) for ids, mask, real in batches]
    session = onnx_cuda_session(hf, *batches[0][:2]) if hf is not None else None
    hf_compiled = torch.compile(hf) if hf is not None else None
    for count, (ids, mask, real) in zip(counts, batches):
        got = first_call(f"{count} sequences", lambda: compiled(ids, mask))
        real_rows = mask.bool()  # the rows of padding tokens are unspecified
        with torch.no_grad():
            print_diff("fuselm cuda - fuselm eager (real tokens)", got[real_rows], model(ids, mask)[real_rows])
            if hf is not None:
                expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
                print_diff("fuselm cuda - transformers eager (real tokens)", got[real_rows], expected[real_rows])
        rows = minilm_rows(compiled, hf, hf_compiled, session, ids, mask, runs)
        print_table(f"all-MiniLM-L6-v2 shape, {count} sequences, lengths 8..128 ({real:.0%} real tokens), fp16, "
                    f"{device_name}", rows, digits=2)


def minilm_rows(compiled, hf, hf_compiled, session, ids, mask, runs: int) -> list:
    def run_hf(m=hf):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).last_hidden_state

    rows = []
    if hf is not None:
        rows += [peer_row("transformers eager, padded", run_hf, runs),
                 peer_row("torch.compile, padded", lambda: run_hf(hf_compiled), runs)]
    if session is not None:
        rows.append(peer_row("ONNX Runtime CUDA, padded", onnx_cuda_run(session, ids, mask, hf.config), runs))
    fuselm_ms = cuda_median_ms(lambda: compiled(ids, mask), runs=runs)
    return [row for row in rows if row] + [("fuselm cuda, padded input", fuselm_ms)]


def onnx_cuda_session(hf_model, ids, mask):
    """ONNX Runtime's CUDA provider on the exported model, or None (saying why)."""
    try:
        import onnxruntime
    except ImportError:
        print("  ONNX Runtime: not installed, row left out")
        return None
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        print(f"  ONNX Runtime: no CUDA provider ({', '.join(onnxruntime.get_available_providers())}), row left out")
        return None
    try:
        return onnx_session(hf_model, ids, mask, provider="CUDAExecutionProvider")[0]
    except Exception as error:  # an optional peer must not end the run
        print(f"  ONNX Runtime: export or session failed ({error!r:.300}), row left out")
        return None


def onnx_cuda_run(session, ids, mask, config):
    """A run on tensors already on the GPU (IO binding): no host copies timed."""
    import numpy

    out = torch.empty(*ids.shape, config.hidden_size, dtype=torch.float16, device=ids.device)
    binding = session.io_binding()
    for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
        binding.bind_input(name, "cuda", 0, numpy.int64, tuple(tensor.shape), tensor.data_ptr())
    binding.bind_output("last_hidden_state", "cuda", 0, numpy.float16, tuple(out.shape), out.data_ptr())
    return lambda: session.run_with_iobinding(binding)


def dtype_name(dtype: torch.dtype) -> str:
    return {dtype: name for name, dtype in LM_DTYPES.items()}[dtype]


def main_cuda(args) -> None:
    import triton

    runs = 10 if args.quick else 30
    device_name = torch.cuda.get_device_name()
    print(f"fuselm {fuselm.__version__}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{transformers_version()}, {device_name}")
    bench_smollm2_cuda([128, 512], runs, LM_DTYPES[args.lm_dtype], device_name)
    bench_minilm_cuda([64, 1024], runs, device_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: real weights; cuda: random weights of the same shapes on a GPU")
    parser.add_argument("--lm-dtype", choices=sorted(LM_DTYPES), default="bf16", help="SmolLM2's dtype on cuda")
    parser.add_argument("--only", choices=("smollm2", "minilm"), help="one of the cpu workloads")
    args = parser.parse_args()
    if args.target == "cuda":
        if not torch.cuda.is_available():
            parser.error("--target cuda needs a CUDA GPU (none is visible)")
        main_cuda(args)
        return
    runs = 3 if args.quick else 7
    print(f"fuselm {fuselm.__version__}, torch {torch.__version__}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}")
    if args.only != "minilm":
        bench_smollm2([128, 512], runs)
    if args.only != "smollm2":
        bench_minilm(runs)


if __name__ == "__main__":
    main()
