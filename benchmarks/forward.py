"""Forward-pass benchmark on cpu: fuselm against its peers, measured in one run.

    python benchmarks/forward.py [--quick]

Rows:
- SmolLM2-135M-Instruct prefill of one prompt at 128 and 512 tokens (logits of the last
  token): Hugging Face transformers eager, torch.compile of it, fuselm compiled for cpu.
- all-MiniLM-L6-v2 on 64 sequences with lengths uniform in 8..128 (padded batch):
  transformers eager, torch.compile, ONNX Runtime (2 threads), fuselm compiled for cpu.
- fuselm's cold and cached compile times for SmolLM2 (targets: < 60 s and < 10 s).

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


def print_table(title: str, rows: list) -> None:
    base = next(ms for name, ms in rows if name.startswith("fuselm"))
    print(f"\n{title}")
    print(f"  {'system':<34}{'ms':>10}{'peer / fuselm':>16}")
    for name, ms in rows:
        print(f"  {name:<34}{ms:>10.1f}{ms / base:>15.2f}x")


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
def minilm_batch(tokenizer, count: int = 64):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 129, (count,), generator=generator).tolist()
    ids = torch.zeros(count, max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1000, tokenizer.vocab_size, (n,), generator=generator)
        ids[row, 0] = 101
        mask[row, :n] = 1
    return ids, mask, sum(lengths) / ids.numel()


def onnx_session(hf_model, ids, mask):
    import onnxruntime

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = Path(tempfile.mkdtemp()) / "minilm.onnx"
    torch.onnx.export(Wrapper(hf_model), (ids, mask), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_minilm(runs: int) -> None:
    from transformers import BertModel

    loaded = load("minilm-l6")
    hf = BertModel.from_pretrained(str(fetch("minilm-l6"))).eval()
    ids, mask, real = minilm_batch(loaded.tokenizer)
    example, dynamic = capture_example(loaded.config)
    compiled = fuselm.compile(loaded.model, example, target="cpu", dynamic=dynamic)
    hf_compiled = torch.compile(hf)
    session = onnx_session(hf, ids, mask)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def run_hf(model=hf):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    rows = [
        ("transformers eager, padded", median_ms(run_hf, runs=runs)),
        ("torch.compile, padded", median_ms(lambda: run_hf(hf_compiled), warmup=3, runs=runs)),
        ("ONNX Runtime, padded, 2 threads", median_ms(lambda: session.run(None, feeds), runs=runs)),
        ("fuselm cpu, padded", median_ms(lambda: compiled(ids, mask), runs=runs)),
    ]
    print_table(f"all-MiniLM-L6-v2, 64 sequences, lengths 8..128 ({real:.0%} real tokens), fp32", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    runs = 3 if args.quick else 7
    print(f"fuselm {fuselm.__version__}, torch {torch.__version__}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}")
    bench_smollm2([128, 512], runs)
    bench_minilm(runs)


if __name__ == "__main__":
    main()
