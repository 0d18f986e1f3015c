"""Decode benchmark: fuselm serving a language model against its peers, measured in one run.

    python benchmarks/decode.py [--quick]                          # cpu, SmolLM2-135M
    python benchmarks/decode.py --target cuda [--shape tinyllama]  # GPU, random weights
    python benchmarks/decode.py --quantize all                     # cpu, every quantization scheme

cpu (SmolLM2-135M-Instruct, real weights from the Q4_1 GGUF, greedy, 128 new tokens per
request whatever the model says: `ignore_eos` / `min_new_tokens`):
- batch 1, one ~16-token prompt: decode tok/s after the first token (the prefill is
  timed apart: time to first token), for fuselm fp32, Hugging Face transformers eager
  fp32 (`generate`) and llama.cpp (llama-cpp-python on the same GGUF, 2 threads).
- 16 different prompts: generated tokens / wall time, prefill included; fuselm serves
  them concurrently, transformers as one left-padded batch, llama.cpp one at a time.
- fuselm's KV-cache utilization with 16 requests of 128 prompt + 128 new tokens
  (`engine.stats.mean_kv_utilization`), and the serving process's peak resident memory.

On cpu fuselm runs three times, each alone: as one native program a forward (the
default), kernel by kernel from the Python executor (FUSELM_PROGRAM=0), and from the
artifact `fuselm build` makes (with its build time, `LLM(model=DIR)`'s start-up, and the
first token of `fuselm generate --model DIR` counted from its process's start).

fuselm runs first, alone, in a subprocess of this script (`--serve-only`, which prints
its results as JSON), so `ru_maxrss` counts fuselm and nothing else (and shows whether
triton was imported: on cpu it must not be). Its prompts' token ids go on to the peers,
so every system decodes the same tokens. Prefix caching is off: the warm-up must not
serve the timed prompts from the cache.

cuda: a random-weight Llama of SmolLM2's shape (or TinyLlama-1.1B's, `--shape tinyllama`)
in bf16, batch 1 and 32 concurrent requests; the peers are the torch rows of
shared/tools/gpu_anchor.py (a gpt-fast-style static-cache model, eager and
torch.compile; SECTIONS=ceilings,llama), run as a subprocess after fuselm when the
script is found (.anchor/gpu_anchor.py in the checkout, or shared/tools/). The anchor
measures the TinyLlama shape only: ratios are printed for `--shape tinyllama`.

`--quantize SCHEMES` (a comma list, or all: every scheme but the -gptq ones, whose
kernels are their base scheme's, and gguf, the file's own Q4_1 /
Q8_0 blocks): on cpu, fuselm fp32 and fuselm with each
scheme (`fuselm.LLM(quantize=...)`, one program a forward), each in its own subprocess,
against the same transformers and llama.cpp runs; on cuda the schemes run on the random
model as well.

Ratios are fuselm tok/s / peer tok/s (> 1 means fuselm is faster). Speed is never
asserted in tests: this script is where it is measured.
"""
from __future__ import annotations

import argparse
import os

# torch's OpenMP workers otherwise spin for 200 ms after each torch op and take the
# cores from TVM's thread pool when both run in one process (set before torch loads;
# the fuselm subprocess inherits it).
os.environ.setdefault("KMP_BLOCKTIME", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULT_TAG = "FUSELM_DECODE_RESULT "
BLOCK_SIZE = 16
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a short recipe for a simple tomato soup that anyone can cook:",
    "In a small village by the sea, an old fisherman told the children",
    "The three laws of motion formulated by Isaac Newton describe how",
    "To write a good cover letter for a job application, you should",
    "The main differences between a virus and a bacterium are that",
    "Once upon a time, in a kingdom far away, there lived a young princess",
    "Photosynthesis is the process by which green plants turn sunlight into",
    "The best way to learn a new programming language is to start by",
    "During the Second World War, the city of London was bombed for",
    "A healthy breakfast should contain protein, fibre and a little fat, because",
    "The solar system has eight planets; the largest of them is Jupiter, which",
    "When you plant tomatoes in the spring, remember to water them every",
    "The French Revolution changed the political landscape of Europe by",
    "My favourite book is a novel about a detective who solves crimes in",
    "Machine learning models learn patterns from data by adjusting their",
]


@dataclass(frozen=True)
class Settings:
    target: str
    shape: str          # cuda: the random model's shape
    requests: int       # concurrent requests
    new_tokens: int     # per request
    util_prompt: int    # prompt tokens per request of the KV-utilization run
    util_new: int

    @classmethod
    def from_args(cls, args) -> "Settings":
        requests = 32 if args.target == "cuda" else 16
        if args.quick:
            return cls(args.target, args.shape, requests, new_tokens=16, util_prompt=32, util_new=16)
        return cls(args.target, args.shape, requests, new_tokens=128, util_prompt=128, util_new=128)

    @property
    def max_model_len(self) -> int:
        longest = max(32, self.util_prompt) + max(self.new_tokens, self.util_new)
        return -(-longest // BLOCK_SIZE) * BLOCK_SIZE


def greedy(new_tokens: int):
    from fuselm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)


# ------------------------------------------------------------------- fuselm (subprocess)
def random_shapes() -> dict:
    from fuselm.models.config import LlamaConfig

    return {
        "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
        "tinyllama": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5),
        # a smoke test of this script without a GPU (TRITON_INTERPRET=1 runs the cuda kernels)
        "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
    }


def build_llm(settings: Settings, model: str = "smollm2-135m", quantize: Optional[str] = None):
    """SmolLM2 with real weights (cpu; `model` may be its built artifact), or a
    random-weight model in bf16 (cuda); `quantize`: a scheme for fuselm.LLM."""
    from fuselm import LLM

    options = dict(max_model_len=settings.max_model_len, max_num_seqs=settings.requests,
                   block_size=BLOCK_SIZE, enable_prefix_caching=False)
    if quantize:
        options["quantize"] = quantize
    if settings.target == "cpu":
        return LLM(model, target="cpu", kv_cache_bytes=None, **options)
    return random_llm(random_shapes()[settings.shape], settings.target, **options)


def random_llm(config, target: str, dtype: torch.dtype = torch.bfloat16, **options):
    from fuselm import LLM
    from fuselm.target import get_target
    from fuselm.models import Tokenizer
    from fuselm.models.llama import LlamaForCausalLM
    from fuselm.models.loading import LoadedModel
    from fuselm.runtime.engine import LLMEngine
    from fuselm.runtime.kv_cache import kv_bytes_per_token

    torch.manual_seed(0)
    with get_target(target).device:  # initialize 1.1B weights on the GPU
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    loaded = LoadedModel(model, Tokenizer.of_numbered_words(config.vocab_size), config, Path("random-weights"))
    # room for every request's full context, as on cpu (not 90% of the GPU's memory)
    kv_cache_bytes = options["max_num_seqs"] * options["max_model_len"] * kv_bytes_per_token(config, dtype)
    return LLM.from_engine(LLMEngine(loaded, target, kv_cache_bytes=kv_cache_bytes, **options))


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size, (count, length), generator=generator).tolist()


def serving_prompts(llm, settings: Settings) -> list:
    if settings.target == "cpu":
        return [llm.tokenizer.encode(text) for text in PROMPTS[:settings.requests]]
    return random_prompts(settings.requests, 16, llm.engine.config.vocab_size, seed=1)


def time_single_request(engine, prompt: list, new_tokens: int) -> dict:
    """Time to first token, then decode tok/s over the tokens after it."""
    start = time.perf_counter()
    engine.add_request(prompt, greedy(new_tokens))
    first = final = None
    while engine.has_unfinished():
        for output in engine.step():
            if first is None and output.token_ids:
                first = time.perf_counter()
            final = output if output.finished else final
    decode_s = time.perf_counter() - first
    return {"ttft_s": first - start, "decode_tok_s": (len(final.token_ids) - 1) / decode_s,
            "token_ids": final.token_ids}


def time_generate(llm, prompts: list, new_tokens: int) -> dict:
    start = time.perf_counter()
    outputs = llm.generate(prompts, greedy(new_tokens))
    seconds = time.perf_counter() - start
    return {"tok_s": sum(len(o.token_ids) for o in outputs) / seconds, "seconds": seconds}


def kv_utilization(llm, settings: Settings) -> dict:
    from fuselm.runtime.engine import EngineStats

    llm.engine.stats = EngineStats()
    prompts = random_prompts(settings.requests, settings.util_prompt, llm.engine.config.vocab_size, seed=2)
    run = time_generate(llm, prompts, settings.util_new)
    stats = llm.engine.stats
    return {"mean": stats.mean_kv_utilization, "preemptions": stats.preemptions, "steps": stats.steps, **run}


def serve(settings: Settings, model: str = "smollm2-135m", quantize: Optional[str] = None) -> dict:
    start = time.perf_counter()
    llm = build_llm(settings, model, quantize)
    build_s = time.perf_counter() - start
    prompts = serving_prompts(llm, settings)
    warm = [p[::-1] for p in prompts]  # same lengths, other tokens
    llm.generate(warm[:1], greedy(4))
    llm.generate(warm, greedy(4))
    result = {
        "build_s": build_s,
        "prompts": prompts,
        "eos_token_ids": list(llm.tokenizer.eos_token_ids),
        "single": time_single_request(llm.engine, prompts[0], settings.new_tokens),
        "concurrent": time_generate(llm, prompts, settings.new_tokens),
        "utilization": kv_utilization(llm, settings),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "triton_imported": "triton" in sys.modules,
    }
    if settings.target == "cuda":
        result.update(cuda_details(llm, prompts, settings))
    return result


def cuda_details(llm, prompts: list, settings: Settings) -> dict:
    """The decode without CUDA graphs (batch 1), each batch's GPU time per decode step
    against its wall time (the rest is host work), and the gemm tiles tuning chose."""
    from fuselm.codegen.triton import tuning

    details = {"tuned_tiles": {" ".join(map(str, key)): cfg for key, cfg in tuning._chosen.items()}}
    runner = llm.engine.runner
    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        details["single_eager"] = time_single_request(llm.engine, prompts[0], settings.new_tokens)
    finally:
        runner.decode_graphs = graphs
    for batch in (1, settings.requests):
        try:
            details[f"profile_B{batch}"] = profile_decode(llm.engine, prompts[:batch])
        except Exception as err:  # noqa: BLE001 - a missing profiler must not lose the timings
            details[f"profile_B{batch}"] = {"error": repr(err)[:300]}
    return details


def profile_decode(engine, prompts: list, steps: int = 16) -> dict:
    """torch.profiler over `steps` decode steps of `prompts` served together."""
    from torch.profiler import ProfilerActivity, profile

    for prompt in prompts:
        engine.add_request(prompt, greedy(steps + 8))
    for _ in range(4):  # past the prefills
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    while engine.has_unfinished():
        engine.step()
    kernels = [(e.key, getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), e.count)
               for e in prof.key_averages()]
    kernels = sorted((k for k in kernels if k[1] > 0 and not k[0].startswith(("cuda", "Memcpy", "Memset"))),
                     key=lambda k: -k[1])
    return {"wall_ms_per_step": wall_ms, "gpu_ms_per_step": sum(k[1] for k in kernels) / 1e3 / steps,
            "top_kernels": [(name[:60], t / 1e3 / steps, count / steps) for name, t, count in kernels[:12]]}


def run_fuselm(args, model: str = "smollm2-135m", env: Optional[dict] = None, quantize: Optional[str] = None) -> dict:
    """`serve` in a fresh process; its stderr (progress) passes through."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-only", "--target", args.target,
               "--shape", args.shape, "--model", model] + (["--quick"] if args.quick else [])
    command += ["--quantize", quantize] if quantize else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env={**os.environ, **(env or {})})
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG):])


def build_artifact(settings: Settings, directory: Path) -> float:
    """`fuselm build` of SmolLM2 for cpu (seconds, warm kernel cache: what a rebuild costs)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fuselm.build", "smollm2-135m", "-o", str(directory), "--target", "cpu",
                    "--max-model-len", str(settings.max_model_len)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def first_token_from_artifact(directory: Path) -> dict:
    """`fuselm generate --model DIR`: seconds from the process's start to its first token
    on stdout (tokens are printed as they come), and to its exit."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fuselm", "generate", "--model", str(directory),
                                "--max-tokens", "8", "The capital of France is"], stdout=subprocess.PIPE)
    process.stdout.read(1)
    first = time.perf_counter() - start
    process.communicate()
    return {"first_token_s": first, "exit_s": time.perf_counter() - start}


def run_quantized(args) -> dict:
    """fuselm fp32, then fuselm with each scheme of --quantize, each alone."""
    from fuselm.quant.config import GPTQ, PACKED, SCHEMES

    # "all": each format once (a -gptq scheme runs the kernels of the scheme it rounds)
    schemes = args.quantize.split(",")
    if args.quantize == "all":
        schemes = [*(s for s in SCHEMES if not s.endswith(GPTQ)), PACKED]
    return {"fp32": run_fuselm(args), **{scheme: run_fuselm(args, quantize=scheme) for scheme in schemes}}


def report_quantized(settings: Settings, variants: dict, hf: Optional[dict], llama: Optional[dict]) -> None:
    n, fp32 = settings.requests, variants["fp32"]
    print(f"\nSmolLM2-135M-Instruct greedy decode on {settings.target}, {settings.new_tokens} new tokens per request, "
          "quantized")
    print(f"    {'system':<52}{'tok/s':>9}{'fuselm / it':>14}   target")
    # ratios are of the first row: int4-g32 (the targets' scheme) when it ran
    order = sorted(variants, key=lambda scheme: scheme != "int4-g32")
    single = [Row(f"fuselm {scheme}", variants[scheme]["single"]["decode_tok_s"]) for scheme in order]
    concurrent = [Row(f"fuselm {scheme}, {n} concurrent", variants[scheme]["concurrent"]["tok_s"]) for scheme in order]
    peers = [Row("transformers eager fp32", hf["single"])] if hf else []
    peers += [Row("llama.cpp Q4_1, 2 threads", llama["single"], target=1.2)] if llama else []
    print_group("batch 1 (decode tok/s after the first token)", single + peers)
    batch_peers = [Row(f"llama.cpp Q4_1, {n} requests one at a time", llama["batch"], target=4.0)] if llama else []
    print_group(f"{n} requests (generated tokens / wall time, prefill included)", concurrent + batch_peers)
    for scheme, v in variants.items():
        ratio = v["single"]["decode_tok_s"] / fp32["single"]["decode_tok_s"]
        rss = v["peak_rss_bytes"]
        rss_target = f" (target < 0.9 GB: {verdict(rss < 0.9e9)})" if scheme == "gguf" else ""
        print(f"  {scheme}: batch 1 {ratio:.2f}x fuselm fp32" + (" (int8 target 1.6x)" if scheme == "int8" else "")
              + f"; peak RSS {rss / 1e9:.2f} GB{rss_target}; load + compile {v['build_s']:.1f} s")


def run_cpu_variants(args, settings: Settings) -> dict:
    """The one-program default, the Python executor, and the built artifact, each alone."""
    variants = {"program": run_fuselm(args), "executor": run_fuselm(args, env={"FUSELM_PROGRAM": "0"})}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "smollm2-cpu"
        build_s = build_artifact(settings, directory)
        variants["artifact"] = {**run_fuselm(args, model=str(directory)), "artifact_build_s": build_s,
                                **first_token_from_artifact(directory)}
    return variants


# ------------------------------------------------------------------- cpu peers
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    from fuselm.models import fetch

    path = fetch("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_generate(model, prompts: list, new_tokens: int, pad: int) -> tuple:
    """(seconds, generated ids of the first row) of one left-padded greedy `generate`."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - start, out[0, width:].tolist()


def time_transformers(prompts: list, new_tokens: int, pad: int) -> dict:
    model = hf_smollm2()
    hf_generate(model, prompts[:1], 4, pad)  # warm-up
    hf_generate(model, [p[::-1] for p in prompts], 4, pad)
    first_s, _ = hf_generate(model, prompts[:1], 1, pad)  # prefill + first token
    single_s, token_ids = hf_generate(model, prompts[:1], new_tokens, pad)
    batch_s, _ = hf_generate(model, prompts, new_tokens, pad)
    return {"single": (new_tokens - 1) / (single_s - first_s), "batch": len(prompts) * new_tokens / batch_s,
            "token_ids": token_ids}


def llama_cpp_request(llm, prompt: list, new_tokens: int) -> tuple:
    """(seconds to first token, seconds in all) for one greedy request of `new_tokens`."""
    llm.reset()
    start = time.perf_counter()
    first, count = None, 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        first = first or time.perf_counter()
        count += 1
        if count == new_tokens:  # `generate` does not stop at EOS by itself
            break
    return first - start, time.perf_counter() - start


def time_llama_cpp(prompts: list, new_tokens: int, n_ctx: int) -> Optional[dict]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from fuselm.models import fetch

    llm = Llama(model_path=str(fetch("smollm2-135m")), n_threads=2, n_threads_batch=2, n_ctx=n_ctx,
                n_batch=n_ctx, seed=0, verbose=False)
    llama_cpp_request(llm, prompts[0][::-1], 8)  # warm-up
    runs = [llama_cpp_request(llm, p, new_tokens) for p in prompts]
    single = statistics.median((new_tokens - 1) / (total - first) for first, total in runs)
    return {"single": single, "batch": len(prompts) * new_tokens / sum(total for _, total in runs)}


# ------------------------------------------------------------------- cuda peers
def find_anchor(explicit: Optional[str]) -> Optional[Path]:
    candidates = [Path(explicit)] if explicit else [
        ROOT / ".anchor" / "gpu_anchor.py", ROOT / "shared" / "tools" / "gpu_anchor.py",
        ROOT.parent / "shared" / "tools" / "gpu_anchor.py"]
    return next((p for p in candidates if p.is_file()), None)


def run_gpu_anchor(path: Path) -> dict:
    """gpu_anchor.py's ceilings and static-cache Llama rows (1.1B shape), from its anchor.json."""
    out = os.environ.get("OUT") or tempfile.mkdtemp()
    env = dict(os.environ, SECTIONS="ceilings,llama", OUT=out, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, str(path)], env=env, stdout=sys.stderr, check=False)
    result = Path(out) / "anchor.json"
    return json.loads(result.read_text()) if result.is_file() else {}


# ------------------------------------------------------------------- report
@dataclass(frozen=True)
class Row:
    name: str
    tok_s: Optional[float]      # None: not measured (the name says why)
    target: Optional[float] = None  # fuselm / this peer should be at least this
    note: str = ""
    compared: bool = True           # print the ratio fuselm / this


def print_group(title: str, rows: list) -> None:
    base = rows[0].tok_s
    print(f"  {title}")
    for row in rows:
        if row.tok_s is None:
            print(f"    {row.name}")
            continue
        ratio = f"{base / row.tok_s:.2f}x" if row is not rows[0] and row.compared and base else ""
        target = ""
        if row.target is not None and base:
            target = f">= {row.target:g}x ({'met' if base / row.tok_s >= row.target else 'MISSED'})"
        print(f"    {row.name:<52}{row.tok_s:>9.1f}{ratio:>14}   {target or row.note}")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def leading_agreement(ours: list, theirs: list) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def print_fuselm_facts(fuselm: dict, settings: Settings) -> None:
    util, rss = fuselm["utilization"], fuselm["peak_rss_bytes"]
    print(f"  fuselm load + compile {fuselm['build_s']:.1f} s; batch 1 time to first token "
          f"{fuselm['single']['ttft_s'] * 1000:.0f} ms ({len(fuselm['prompts'][0])}-token prompt)")
    print(f"  KV-cache utilization, {settings.requests} requests x ({settings.util_prompt} prompt + "
          f"{settings.util_new} new tokens): {util['mean']:.1%} (target >= 95%: {verdict(util['mean'] >= 0.95)}); "
          f"{util['preemptions']} preemptions, {util['steps']} steps, {util['tok_s']:.1f} tok/s")
    rss_target = f" (target < 1.5 GB: {verdict(rss < 1.5e9)})" if settings.target == "cpu" else ""
    triton = "yes" if fuselm["triton_imported"] else "no"
    print(f"  fuselm serving process peak RSS {rss / 1e9:.2f} GB{rss_target}; triton imported: {triton}"
          + (f" ({verdict(not fuselm['triton_imported'])}: must be no on cpu)" if settings.target == "cpu" else ""))


def report_cpu(settings: Settings, variants: dict, hf: dict, llama: Optional[dict]) -> None:
    n, fuselm, executor, artifact = settings.requests, variants["program"], variants["executor"], variants["artifact"]
    llama_missing = Row("llama.cpp: not installed (pip install llama-cpp-python)", None)
    print(f"\nSmolLM2-135M-Instruct greedy decode on cpu, {settings.new_tokens} new tokens per request")
    print(f"    {'system':<52}{'tok/s':>9}{'fuselm / it':>14}   target")
    print_group("batch 1 (decode tok/s after the first token)", [
        Row("fuselm fp32 (one program a forward)", fuselm["single"]["decode_tok_s"]),
        Row("fuselm fp32, kernel by kernel (Python executor)", executor["single"]["decode_tok_s"], target=1.1),
        Row("fuselm fp32, served from its artifact", artifact["single"]["decode_tok_s"], note="same program"),
        Row("transformers eager fp32", hf["single"], target=1.1),
        Row("llama.cpp Q4_1, 2 threads", llama["single"]) if llama else llama_missing,
    ])
    print_group(f"{n} requests (generated tokens / wall time, prefill included)", [
        Row(f"fuselm fp32, {n} concurrent", fuselm["concurrent"]["tok_s"]),
        Row(f"transformers eager fp32, batch {n} left-padded", hf["batch"]),
        Row(f"llama.cpp Q4_1, {n} requests one at a time", llama["batch"], target=2.0) if llama else llama_missing,
    ])
    print_fuselm_facts(fuselm, settings)
    print(f"  artifact: fuselm build {artifact['artifact_build_s']:.1f} s (warm kernel cache); LLM(model=DIR) "
          f"{artifact['build_s']:.2f} s (vs {fuselm['build_s']:.1f} s load + compile, warm cache); "
          f"`fuselm generate --model DIR` first token {artifact['first_token_s']:.2f} s after its start "
          f"(target 4.5 s: {verdict(artifact['first_token_s'] <= 4.5)}), exit {artifact['exit_s']:.2f} s")
    ours, theirs = fuselm["single"]["token_ids"], hf["token_ids"]
    eos = next((i for i, t in enumerate(ours) if t in fuselm["eos_token_ids"]), None)
    print(f"  greedy tokens, fuselm vs transformers (batch 1): first {leading_agreement(ours, theirs)} of "
          f"{len(ours)} identical" + (f" (fuselm's first EOS at {eos}; transformers' min_new_tokens bans EOS)"
                                      if eos is not None else ""))


def report_cuda(settings: Settings, fuselm: dict, anchor: Optional[dict]) -> None:
    n, same = settings.requests, settings.shape == "tinyllama"
    floors = {"smollm2": ">= 1,350 tok/s", "tinyllama": ">= 1,450 tok/s", "tiny": "smoke test"}
    label = "" if same else " [1.1B shape: not compared]"

    def peer(key: str, name: str, target: Optional[float] = None) -> Row:
        if not anchor or key not in anchor:
            return Row(f"{name}: not measured (gpu_anchor.py not found or failed)", None)
        value = anchor[key]
        return Row(name + label, value, target if same else None, compared=same)

    print(f"\nrandom-weight Llama, {settings.shape} shape, bf16, greedy decode on cuda, "
          f"{settings.new_tokens} new tokens per request")
    print(f"    {'system':<52}{'tok/s':>9}{'fuselm / it':>14}   target")
    print_group("batch 1 (decode tok/s after the first token)", [
        Row("fuselm bf16", fuselm["single"]["decode_tok_s"], note=floors[settings.shape]),
        peer("eager_B1_tok_s", "torch static-cache eager"),
        peer("compiled_B1_tok_s", "torch.compile reduce-overhead", target=2.1),
    ])
    print_group(f"{n} requests (generated tokens / wall time, prefill included)", [
        Row(f"fuselm bf16, {n} concurrent", fuselm["concurrent"]["tok_s"]),
        peer("eager_B32_tok_s", "torch static-cache eager, batch 32"),
        peer("compiled_B32_tok_s", "torch.compile reduce-overhead, batch 32", target=1.2),
    ])
    if anchor and "floor_B1_tok_s" in anchor:
        floor = anchor["floor_B1_tok_s"]
        share = fuselm["single"]["decode_tok_s"] / floor if same else None
        print(f"  bandwidth floor, 1.1B bf16 at batch 1: {floor:.0f} tok/s"
              + (f"; fuselm at {share:.0%} of it (target >= 75%: {verdict(share >= 0.75)})" if share else ""))
    if "single_eager" in fuselm:
        graphed, eager = fuselm["single"]["token_ids"], fuselm["single_eager"]["token_ids"]
        print(f"  batch 1 without CUDA graphs (enforce_eager): {fuselm['single_eager']['decode_tok_s']:.1f} tok/s; "
              f"greedy tokens with and without graphs: first {leading_agreement(graphed, eager)} of {len(graphed)} identical")
    for key in (k for k in fuselm if k.startswith("profile_B")):
        profile = fuselm[key]
        if "error" in profile:
            print(f"  {key}: {profile['error']}")
            continue
        print(f"  decode step, batch {key[9:]}: {profile['wall_ms_per_step']:.3f} ms wall under the profiler, "
              f"{profile['gpu_ms_per_step']:.3f} ms of GPU kernels")
        for name, ms, count in profile["top_kernels"]:
            print(f"      {ms:8.4f} ms  x{count:<5.1f} {name}")
    for shape, cfg in fuselm.get("tuned_tiles", {}).items():
        print(f"  tuned tile {shape}: {cfg}")
    print_fuselm_facts(fuselm, settings)


# ------------------------------------------------------------------- main
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 new tokens per request: a smoke test")
    parser.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=("smollm2", "tinyllama", "tiny"), default="smollm2",
                        help="cuda: the random-weight model's shape")
    parser.add_argument("--anchor", help="cuda: path of gpu_anchor.py (default: .anchor/ or shared/tools/)")
    parser.add_argument("--no-anchor", action="store_true", help="cuda: skip the torch baseline")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # the fuselm subprocess
    parser.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)  # its model (or artifact)
    parser.add_argument("--quantize", metavar="SCHEMES",
                        help="compare fuselm fp32 with these quantization schemes (comma list, or all)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    settings = Settings.from_args(args)
    if args.serve_only:
        print(RESULT_TAG + json.dumps(serve(settings, args.model, args.quantize)), flush=True)
        return
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}", flush=True)
    if args.quantize:
        variants = run_quantized(args)
        prompts = variants["fp32"]["prompts"]
        hf = llama = None
        if settings.target == "cpu":
            hf = time_transformers(prompts, settings.new_tokens, pad=variants["fp32"]["eos_token_ids"][0])
            llama = time_llama_cpp(prompts, settings.new_tokens, n_ctx=settings.max_model_len)
        report_quantized(settings, variants, hf, llama)
        return
    if settings.target == "cpu":
        variants = run_cpu_variants(args, settings)
        prompts = variants["program"]["prompts"]
        hf = time_transformers(prompts, settings.new_tokens, pad=variants["program"]["eos_token_ids"][0])
        llama = time_llama_cpp(prompts, settings.new_tokens, n_ctx=settings.max_model_len)
        report_cpu(settings, variants, hf, llama)
        return
    fuselm = run_fuselm(args)
    if settings.target == "cuda":
        anchor_path = None if args.no_anchor else find_anchor(args.anchor)
        report_cuda(settings, fuselm, run_gpu_anchor(anchor_path) if anchor_path else None)


if __name__ == "__main__":
    main()
