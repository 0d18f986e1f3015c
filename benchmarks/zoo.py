"""Model-zoo conformance: Hugging Face architectures compiled by fuselm, against eager.

    python benchmarks/zoo.py                         # every architecture, cpu
    python benchmarks/zoo.py --only gpt2,bert        # a subset
    python benchmarks/zoo.py --cuda 3                # also 3 of them for cuda (Triton's
                                                     # interpreter when no GPU is visible)
    python benchmarks/zoo.py --json zoo.json --cache-dir /tmp/zoo-cache --threads 2

Every model is built from a small config with `from_config` (random weights, perturbed
so biases and norm scales are not trivial; nothing is downloaded), in fp32, eval mode,
with `attn_implementation="sdpa"` where the architecture supports it, else "eager". Its
plain forward runs on natural inputs: `input_ids` and `attention_mask` (a batch of 2, the
second row right-padded) with `use_cache=False` where the forward takes it,
`pixel_values` for ViT, `input_features` for the Whisper encoder. Each model is compiled
with `fuselm.compile(model, target=..., cache_dir=...)` (lazy: the first call captures)
and its output compared with eager's: max relative error = max over every output tensor
of max|fuselm - eager| / max|eager|.

The table: captured / compiled (the stage a failure came from decides: an error raised
under fuselm.frontend is a capture failure), fallback ops with counts, kernels, max
relative error, fuselm time / eager time on cpu (median of `--runs` calls after a
warm-up, the two taking turns; torch eager and fuselm's TVM pool run with the same
`--threads`), and the first line of the error. One thread by default: on a shared
2-core machine two-thread pools (OpenMP's, TVM's) stall at every barrier whenever another
process takes a core, and the same tiny model then measures anywhere from 2 to 300 ms;
one thread each measures within a few percent. Pass `--threads 2` on a quiet machine.
A model passes when it compiles, runs, matches within `--tol` (1e-4) and its only
fallbacks are ATen ops the IR cannot express: ops the frontend's table lacks, or mapped
ops whose handler refused the form the model uses (aten.index with two index tensors),
listed apart in the summary. A fallback of a fused group of IR ops that no kernel of the
target computes fails the model.

Each model runs in a worker process (spawned, reused across models, replaced after a
crash or a `--timeout`), so a segfault or a hang costs one row, never the run;
`--inline` runs in this process instead (for a debugger). The architecture table
(`ARCHS`, `Sizes`, `build`, `natural_inputs`, `max_relative_error`) is what
tests/test_zoo.py imports.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """One set of small dimensions every architecture is built from (shared dims let
    models share kernels in one cache)."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # for architectures with grouped-query attention
    intermediate: int = 128
    vocab: int = 256
    seq: int = 12
    batch: int = 2
    pad: int = 3  # padded positions at the end of the second row
    positions: int = 64
    image: int = 32
    patch: int = 8
    mel_bins: int = 16
    audio_frames: int = 16  # encoder positions of Whisper (input frames = 2x)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


DEFAULT = Sizes()
TINY = Sizes(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=64, seq=8, pad=2, positions=32,
             image=16, patch=8, mel_bins=8, audio_frames=8)


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # decoder | encoder | other
    config: str  # the transformers config class
    fields: Callable[[Sizes], dict]  # config fields for these sizes
    model: str = "AutoModelForCausalLM"  # an Auto class (from_config) or a model class (_from_config)
    inputs: str = "text"  # text | image | audio
    submodule: Optional[str] = None  # a part of the built model to run (Whisper: "encoder")


def _decoder(name, config, fields, **kw):
    return Arch(name, "decoder", config, fields, **kw)


def _encoder(name, config, fields, **kw):
    return Arch(name, "encoder", config, fields, model=kw.pop("model", "AutoModel"), **kw)


def _llama_like(s: Sizes, **extra) -> dict:
    return dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                max_position_embeddings=s.positions, **extra)


def _bert_like(s: Sizes, **extra) -> dict:
    return {**dict(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                   intermediate_size=s.intermediate, max_position_embeddings=s.positions), **extra}


ARCHS: dict = {a.name: a for a in [
    # -- decoders (causal LM heads: logits)
    _decoder("gpt2", "GPT2Config", lambda s: dict(
        vocab_size=s.vocab, n_positions=s.positions, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
        n_inner=s.intermediate)),
    _decoder("gpt_neo", "GPTNeoConfig", lambda s: dict(
        vocab_size=s.vocab, max_position_embeddings=s.positions, hidden_size=s.hidden, num_layers=s.layers,
        num_heads=s.heads, intermediate_size=s.intermediate, window_size=s.seq // 2,
        attention_types=[[["global", "local"], max(1, s.layers // 2)]] if s.layers > 1 else [[["global"], 1]])),
    _decoder("gptj", "GPTJConfig", lambda s: dict(
        vocab_size=s.vocab, n_positions=s.positions, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
        n_inner=s.intermediate, rotary_dim=s.head_dim // 2)),
    _decoder("opt", "OPTConfig", lambda s: dict(
        vocab_size=s.vocab, max_position_embeddings=s.positions, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, ffn_dim=s.intermediate, word_embed_proj_dim=s.hidden, pad_token_id=1)),
    _decoder("bloom", "BloomConfig", lambda s: dict(
        vocab_size=s.vocab, hidden_size=s.hidden, n_layer=s.layers, n_head=s.heads)),
    _decoder("falcon", "FalconConfig", lambda s: dict(
        vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        max_position_embeddings=s.positions, new_decoder_architecture=False, multi_query=True, alibi=False)),
    _decoder("llama", "LlamaConfig", lambda s: _llama_like(s)),
    _decoder("mistral", "MistralConfig", lambda s: _llama_like(s, sliding_window=s.seq // 2)),
    _decoder("qwen2", "Qwen2Config", lambda s: _llama_like(s)),
    _decoder("qwen3", "Qwen3Config", lambda s: _llama_like(s, head_dim=s.head_dim)),
    _decoder("phi", "PhiConfig", lambda s: _llama_like(s, partial_rotary_factor=0.5)),
    _decoder("phi3", "Phi3Config", lambda s: _llama_like(s, pad_token_id=0)),
    _decoder("gemma", "GemmaConfig", lambda s: _llama_like(s, head_dim=s.head_dim)),
    _decoder("stablelm", "StableLmConfig", lambda s: _llama_like(s, partial_rotary_factor=0.5)),
    _decoder("gpt_neox", "GPTNeoXConfig", lambda s: dict(
        vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        intermediate_size=s.intermediate, max_position_embeddings=s.positions, rotary_pct=0.5)),
    # -- encoders (base models: hidden states, and the pooler where the model has one)
    _encoder("bert", "BertConfig", lambda s: _bert_like(s)),
    _encoder("roberta", "RobertaConfig", lambda s: _bert_like(s, max_position_embeddings=s.positions + 2)),
    _encoder("distilbert", "DistilBertConfig", lambda s: dict(
        vocab_size=s.vocab, dim=s.hidden, n_layers=s.layers, n_heads=s.heads, hidden_dim=s.intermediate,
        max_position_embeddings=s.positions)),
    _encoder("albert", "AlbertConfig", lambda s: _bert_like(s, embedding_size=s.hidden // 2)),
    _encoder("electra", "ElectraConfig", lambda s: _bert_like(s, embedding_size=s.hidden // 2)),
    _encoder("t5_encoder", "T5Config", lambda s: dict(
        vocab_size=s.vocab, d_model=s.hidden, d_kv=s.head_dim, d_ff=s.intermediate, num_layers=s.layers,
        num_heads=s.heads, relative_attention_num_buckets=8, relative_attention_max_distance=16),
        model="T5EncoderModel"),
    # -- others
    Arch("vit", "other", "ViTConfig", lambda s: dict(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        intermediate_size=s.intermediate, image_size=s.image, patch_size=s.patch, num_channels=3),
        model="AutoModel", inputs="image"),
    Arch("clip_text", "other", "CLIPTextConfig", lambda s: dict(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, max_position_embeddings=s.positions, eos_token_id=2),
        model="AutoModel"),
    Arch("whisper_encoder", "other", "WhisperConfig", lambda s: dict(
        vocab_size=s.vocab, num_mel_bins=s.mel_bins, d_model=s.hidden, encoder_layers=s.layers,
        encoder_attention_heads=s.heads, encoder_ffn_dim=s.intermediate, decoder_layers=1,
        decoder_attention_heads=s.heads, decoder_ffn_dim=s.intermediate, max_source_positions=s.audio_frames,
        max_target_positions=s.positions, pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=2,
        suppress_tokens=[], begin_suppress_tokens=[]),
        model="AutoModel", inputs="audio", submodule="encoder"),
]}

# the order `--cuda N` takes its N models in: varied architectures first
CUDA_ORDER = ["gpt2", "llama", "bert", "distilbert", "vit", "t5_encoder", "qwen2", "opt", "whisper_encoder",
              "clip_text"]


def build(arch: Arch, sizes: Sizes = DEFAULT, seed: int = 0):
    """(model, attn_implementation): the architecture with random weights, fp32, eval;
    sdpa when the architecture supports it, else eager."""
    import torch
    import transformers

    config = getattr(transformers, arch.config)(**arch.fields(sizes))
    owner = getattr(transformers, arch.model)
    make = owner.from_config if arch.model.startswith("Auto") else owner._from_config
    errors = []
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(seed)
        try:
            model = make(config, attn_implementation=implementation, dtype=torch.float32)
        except (ValueError, ImportError) as error:  # "does not support an attention implementation ..."
            errors.append(f"{implementation}: {_first_line(error)}")
            continue
        if arch.submodule:
            model = getattr(model, arch.submodule)
        with torch.no_grad():  # not the init's zeros and ones: biases and norm scales matter
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        return model.float().eval(), implementation
    raise RuntimeError("; ".join(errors))


def natural_inputs(arch: Arch, model, sizes: Sizes = DEFAULT, seed: int = 1) -> dict:
    """The forward's keyword arguments: token ids and a padded mask, pixels, or audio
    features, on the model's device."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if arch.inputs == "image":
        inputs = {"pixel_values": torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=generator)}
    elif arch.inputs == "audio":
        inputs = {"input_features": torch.randn(sizes.batch, sizes.mel_bins, 2 * sizes.audio_frames,
                                                generator=generator)}
    else:
        ids = torch.randint(3, sizes.vocab, (sizes.batch, sizes.seq), generator=generator)
        mask = torch.ones(sizes.batch, sizes.seq, dtype=torch.long)
        mask[1, sizes.seq - sizes.pad:] = 0
        if arch.name == "clip_text":  # pooled output reads the (first) end-of-text token
            ids[0, -1] = 2
            ids[1, sizes.seq - sizes.pad - 1] = 2
        inputs = {"input_ids": ids, "attention_mask": mask}
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# ----------------------------------------------------------------------------- comparison
def output_tensors(output) -> list:
    """(path, tensor) for every tensor in a model output (ModelOutput, tuple, dict...)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [("", output)]
    if isinstance(output, dict):  # ModelOutput is an OrderedDict of its non-None fields
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    else:
        return []
    return [(f"{key}{'.' + path if path else ''}", tensor)
            for key, value in items for path, tensor in output_tensors(value)]


def max_relative_error(got, expected) -> float:
    """max over the output tensors of max|got - expected| / max|expected|; inf when the
    structure, a shape, or where the NaNs are differs."""
    import torch

    got_tensors, expected_tensors = output_tensors(got), output_tensors(expected)
    if type(got) is not type(expected) or [p for p, _ in got_tensors] != [p for p, _ in expected_tensors]:
        raise AssertionError(f"output structure differs: {type(got).__name__}{[p for p, _ in got_tensors]} "
                             f"vs eager {type(expected).__name__}{[p for p, _ in expected_tensors]}")
    worst = 0.0
    for (path, a), (_, b) in zip(got_tensors, expected_tensors):
        if a.shape != b.shape:
            raise AssertionError(f"output {path}: shape {tuple(a.shape)} vs eager {tuple(b.shape)}")
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return math.inf
        finite = ~torch.isnan(b)
        if not finite.any():
            continue
        diff = (a[finite] - b[finite]).abs().max().item()
        scale = b[finite].abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst


# ----------------------------------------------------------------------------- one model
@dataclass
class Result:
    name: str
    family: str
    target: str
    attention: str = ""
    captured: bool = False
    compiled: bool = False
    ran: bool = False
    fallbacks: dict = field(default_factory=dict)
    unmapped: list = field(default_factory=list)  # fallbacks of ATen ops the frontend's table lacks
    refused: list = field(default_factory=list)  # fallbacks of ATen ops the table maps but refused in this form
    kernels: Optional[int] = None
    rel_error: Optional[float] = None
    compile_s: Optional[float] = None
    fuselm_ms: Optional[float] = None
    eager_ms: Optional[float] = None
    stage: str = ""  # where a failure was raised: build, eager, capture, passes, codegen, runtime, compare
    error: str = ""

    @property
    def ratio(self) -> Optional[float]:
        return self.fuselm_ms / self.eager_ms if self.fuselm_ms and self.eager_ms else None

    @property
    def group_fallbacks(self) -> list:
        """Fallbacks that are not ATen ops: fused groups of IR ops no kernel computed."""
        return [op for op in self.fallbacks if op not in self.unmapped and op not in self.refused]

    def passed(self, tol: float) -> bool:
        return (self.ran and self.rel_error is not None and self.rel_error <= tol
                and not self.group_fallbacks)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def failure_stage(error: BaseException) -> str:
    """The fuselm layer an exception came from: the first frame under fuselm/ beyond the
    api module (frontend -> capture, passes, codegen, runtime)."""
    layers = {"frontend": "capture", "passes": "passes", "codegen": "codegen", "runtime": "runtime",
              "ir": "ir", "target.py": "target"}
    package = ROOT / "fuselm"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        path = Path(frame.f_code.co_filename)
        try:
            parts = path.resolve().relative_to(package).parts
        except ValueError:
            continue
        if parts and parts[0] in layers:
            return layers[parts[0]]
    return "fuselm"


def aten_fallbacks(fallbacks: dict) -> tuple:
    """(unmapped, refused): the fallbacks that are ATen overloads, split into those the
    frontend's table has no entry for and those it maps but whose handler refused the
    arguments (aten.index with two index tensors). Any other fallback is a fused group of
    IR ops that no kernel of the target computed."""
    import torch

    from fuselm.frontend.aten_table import ATEN_TABLE

    unmapped, refused = [], []
    for name in fallbacks:
        parts = name.split(".")
        if len(parts) != 3 or "+" in name:
            continue
        try:
            overload = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
        except (AttributeError, RuntimeError):
            continue
        (refused if overload in ATEN_TABLE else unmapped).append(name)
    return unmapped, refused


def median_ms(functions: list, runs: int) -> list:
    """Median milliseconds of each function, after a warm-up call; the functions take
    turns, so a busy machine slows them alike."""
    times = [[] for _ in functions]
    for fn in functions:
        fn()
    for _ in range(runs):
        for fn, record in zip(functions, times):
            start = time.perf_counter()
            fn()
            record.append((time.perf_counter() - start) * 1000)
    return [statistics.median(record) for record in times]


def run_model(name: str, target: str = "cpu", sizes: Sizes = DEFAULT, cache_dir: Optional[str] = None,
              runs: int = 5, threads: int = 2, strict: bool = False) -> Result:
    """Build, compile and compare one architecture; every failure lands in the Result."""
    import torch

    import fuselm

    arch = ARCHS[name]
    result = Result(name, arch.family, target)
    torch.set_num_threads(threads)
    result.stage, compiled = "build", None
    try:
        model, result.attention = build(arch, sizes)
        if target == "cuda" and torch.cuda.is_available():
            model = model.cuda()
        inputs = natural_inputs(arch, model, sizes)
        result.stage = "eager"
        with torch.no_grad():
            expected = model(**inputs)
        result.stage = "compile"
        compiled = fuselm.compile(model, target=target, cache_dir=cache_dir, strict=strict)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fuselm.FallbackWarning)
            got = compiled(**inputs)
        result.compile_s = time.perf_counter() - start
        result.captured = result.compiled = result.ran = True
        result.fallbacks = compiled.fallbacks
        result.unmapped, result.refused = aten_fallbacks(result.fallbacks)
        result.kernels = len(compiled.kernels)
        result.stage = "compare"
        result.rel_error = max_relative_error(got, expected)
        if target == "cpu" and runs > 0:
            result.stage = "timing"
            with torch.no_grad():
                result.eager_ms, result.fuselm_ms = median_ms([lambda: model(**inputs), lambda: compiled(**inputs)],
                                                              runs)
        result.stage = ""
    except Exception as error:  # noqa: BLE001 - every failure is a row of the table
        result.error = _first_line(error)
        if result.stage == "compile":
            result.stage = failure_stage(error)
            entries = compiled.entries if compiled is not None else []
            result.compiled = bool(entries)
            result.captured = result.compiled or result.stage != "capture"
            if entries:  # compiled; the first run failed
                result.stage = f"run/{result.stage}"
                result.fallbacks = dict(entries[-1].fallbacks)
                result.unmapped, result.refused = aten_fallbacks(result.fallbacks)
                result.kernels = len(compiled.kernels)
        if os.environ.get("ZOO_TRACEBACK"):
            traceback.print_exc()
    return result


# ----------------------------------------------------------------------------- workers
def _worker(connection, env: dict, log: Optional[str]) -> None:
    """A spawned process that runs models sent to it until it gets None; its stderr
    (TVM's and transformers' warnings, tracebacks with ZOO_TRACEBACK=1) goes to `log`."""
    os.environ.update(env)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "a")
        os.dup2(handle.fileno(), 2)
        sys.stderr = handle
    warnings.filterwarnings("ignore")
    _quiet_transformers()
    import fuselm  # noqa: F401  (imports are not the first model's time)

    connection.send("ready")
    while True:
        job = connection.recv()
        if job is None:
            return
        if log:
            print(f"==== {job['target']} {job['name']}", file=sys.stderr, flush=True)
        connection.send(dataclasses.asdict(run_model(**job)))


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


class Pool:
    """One worker process at a time; a crash or a timeout replaces it."""

    def __init__(self, timeout: float, env: dict, log: Optional[str] = None):
        import multiprocessing

        self.context = multiprocessing.get_context("spawn")
        self.timeout, self.env, self.log = timeout, env, log
        self.process = self.connection = None

    def _start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child, self.env, self.log), daemon=True)
        self.process.start()
        child.close()
        self.connection = parent
        if not (parent.poll(600) and parent.recv() == "ready"):
            raise RuntimeError(f"the zoo's worker process did not start (exit code {self.process.exitcode})")

    def run(self, job: dict) -> Result:
        arch = ARCHS[job["name"]]
        try:
            if self.process is None or not self.process.is_alive():
                self._start()
            self.connection.send(job)
            if self.connection.poll(self.timeout):
                return Result(**self.connection.recv())
            stage, failure = "timeout", f"no result after {self.timeout:.0f} s; the worker was killed"
        except (EOFError, OSError):
            self.process.join(5)
            stage, failure = "crash", f"the worker process died (exit code {self.process.exitcode})"
        except Exception as error:  # noqa: BLE001 - the worker did not start
            stage, failure = "crash", _first_line(error)
        self.stop(kill=True)
        return Result(job["name"], arch.family, job["target"], stage=stage, error=failure)

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            try:
                self.connection.send(None)
            except OSError:
                pass
        self.process.join(10)
        self.process = self.connection = None


# ----------------------------------------------------------------------------- report
def _fallback_text(result: Result) -> str:
    def tag(op):
        return "" if op in result.unmapped else " (refused)" if op in result.refused else " (group)"

    return ", ".join(f"{op} x{n}{tag(op)}" for op, n in sorted(result.fallbacks.items())) or "-"


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(results: list, tol: float) -> None:
    yes = {True: "yes", False: "no"}
    header = (f"{'model':<16} {'target':<6} {'attn':<5} {'capt':<4} {'comp':<4} {'kern':>4} {'rel err':>8} "
              f"{'eager ms':>8} {'fuselm ms':>9} {'speedup':>7} {'compile':>7}  {'':<4} fallbacks | error")
    print(header)
    print("-" * len(header))
    for r in results:
        tail = _fallback_text(r)
        if r.error:
            tail += f" | [{r.stage}] {r.error[:240]}"
        print(f"{r.name:<16} {r.target:<6} {r.attention or '-':<5} {yes[r.captured]:<4} {yes[r.compiled]:<4} "
              f"{_fmt(r.kernels, 'd'):>4} {_fmt(r.rel_error, '.1e'):>8} {_fmt(r.eager_ms, '.2f'):>8} "
              f"{_fmt(r.fuselm_ms, '.2f'):>9} {_fmt(1 / r.ratio if r.ratio else None, '.2f'):>7} {_fmt(r.compile_s, '.1f', 's'):>7}  "
              f"{'ok' if r.passed(tol) else 'FAIL':<4} {tail}")


def summary(results: list, tol: float) -> dict:
    out = {}
    for target in dict.fromkeys(r.target for r in results):
        rows = [r for r in results if r.target == target]
        passed = [r for r in rows if r.passed(tol)]
        ratios = [r.ratio for r in passed if r.ratio]
        out[target] = {
            "models": len(rows),
            "captured": sum(r.captured for r in rows),
            "compiled": sum(r.compiled for r in rows),
            "passed": [r.name for r in passed],
            "failed": [r.name for r in rows if not r.passed(tol)],
            "fallback_free": [r.name for r in passed if not r.fallbacks],
            "unmapped_aten_fallbacks": sorted({op for r in rows for op in r.unmapped}),
            "refused_aten_fallbacks": sorted({op for r in rows for op in r.refused}),
            "group_fallbacks": sorted({op for r in rows for op in r.group_fallbacks}),
            "geomean_ratio_vs_eager": (math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None),
            "geomean_over": len(ratios),
        }
    return out


def print_summary(results: list, tol: float) -> dict:
    info = summary(results, tol)
    for target, s in info.items():
        print(f"\n[{target}] {len(s['passed'])}/{s['models']} compile and match eager within {tol:g} with no "
              f"fallback other than ATen ops the IR cannot express ({len(s['fallback_free'])} with no fallback "
              f"at all); captured {s['captured']}, compiled {s['compiled']}")
        print(f"  passed: {', '.join(s['passed']) or '-'}")
        print(f"  failed: {', '.join(s['failed']) or '-'}")
        print(f"  ATen ops with no IR mapping that fell back: {', '.join(s['unmapped_aten_fallbacks']) or '-'}")
        print(f"  ATen ops mapped, but refused in the form the models use: "
              f"{', '.join(s['refused_aten_fallbacks']) or '-'}")
        print(f"  IR groups without a kernel (fail the model): {', '.join(s['group_fallbacks']) or '-'}")
        if s["geomean_ratio_vs_eager"] is not None:
            print(f"  speedup over torch eager (eager time / fuselm time), geometric mean over the "
                  f"{s['geomean_over']} passing models: {1 / s['geomean_ratio_vs_eager']:.2f}x")
    return info


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated architectures (default: all): " + ",".join(ARCHS))
    parser.add_argument("--cuda", type=int, default=0, metavar="N",
                        help="also compile N of them for cuda (tiny configs; Triton's interpreter without a GPU)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the cpu runs (with --cuda)")
    parser.add_argument("--json", metavar="FILE", help="write the results and the summary as JSON")
    parser.add_argument("--cache-dir", help="fuselm kernel cache (default: a fresh temporary directory)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch eager and for fuselm's TVM pool (default 1: see the module's doc)")
    parser.add_argument("--runs", type=int, default=11, help="timed runs per model (median; 0: no timing)")
    parser.add_argument("--tol", type=float, default=1e-4, help="max relative error to pass (default 1e-4)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model before it is killed")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on cpu too")
    parser.add_argument("--inline", action="store_true", help="run in this process (no worker; a crash ends the run)")
    args = parser.parse_args(argv)

    names = list(ARCHS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARCHS]
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {list(ARCHS)}")
    env = {"KMP_BLOCKTIME": os.environ.get("KMP_BLOCKTIME", "0"), "TVM_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.cuda:
        import torch

        if not torch.cuda.is_available():  # before anything imports triton
            if "triton" in sys.modules:
                print("warning: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            env["TRITON_INTERPRET"] = "1"
    os.environ.update(env)

    jobs = []
    cache_root = args.cache_dir or tempfile.mkdtemp(prefix="fuselm-zoo-")
    cpu_sizes = TINY if args.tiny else DEFAULT
    if not args.no_cpu:
        jobs += [dict(name=n, target="cpu", sizes=cpu_sizes, cache_dir=str(Path(cache_root) / "cpu"),
                      runs=args.runs, threads=args.threads) for n in names]
    if args.cuda:
        order = [n for n in CUDA_ORDER if n in names] + [n for n in names if n not in CUDA_ORDER]
        jobs += [dict(name=n, target="cuda", sizes=TINY, cache_dir=str(Path(cache_root) / "cuda"), runs=0,
                      threads=args.threads) for n in order[: args.cuda]]
    print(f"fuselm zoo: {len(jobs)} runs, kernel cache {cache_root}, torch threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus", flush=True)

    results, start = [], time.perf_counter()
    log = str(Path(cache_root) / "worker-stderr.log")
    pool = None if args.inline else Pool(args.timeout, env, log)
    try:
        for job in jobs:
            t0 = time.perf_counter()
            if pool is None:
                warnings.filterwarnings("ignore")
                _quiet_transformers()
                result = run_model(**job)
            else:
                result = pool.run(job)
            results.append(result)
            status = "ok" if result.passed(args.tol) else f"FAIL [{result.stage}] {result.error[:120]}"
            print(f"  {job['target']:<5}{job['name']:<16}{time.perf_counter() - t0:6.1f}s  {status}", flush=True)
    finally:
        if pool is not None:
            pool.stop()
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.0f} s (load average {os.getloadavg()[0]:.1f})"
          + ("" if args.inline else f"; workers' stderr in {log}") + "\n")
    print_table(results, args.tol)
    info = print_summary(results, args.tol)
    if args.json:
        rows = [{**dataclasses.asdict(r), "ratio": r.ratio, "group_fallbacks": r.group_fallbacks,
                 "passed": r.passed(args.tol)} for r in results]
        sizes = {"cpu": dataclasses.asdict(cpu_sizes), "cuda": dataclasses.asdict(TINY)}
        Path(args.json).write_text(json.dumps({"results": rows, "summary": info, "sizes": sizes,
                                               "tol": args.tol}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
