"""Quantization quality benchmark: how far each `quantize=` scheme moves the real models.

    python benchmarks/quality.py [--schemes int8,w8a8,nf4] [--tokens 2048] [--sentences 32]

For each scheme (default: int8, w8a8, int4-g32, int4-g64, int4-g128, llm.int8, nf4, their
GPTQ-rounded forms int8-gptq ... nf4-gptq, and gguf, SmolLM2's file served with its own
blocks: load(packed=True), SmolLM2 only):
- SmolLM2-135M-Instruct (fuselm.models.load("smollm2-135m"): the Q4_1 GGUF, weights
  dequantized to fp32, which is the reference here), teacher-forced over `--tokens`
  tokens of English (the standard library's pydoc_data.topics, quant/calibration.py's
  default_text) run as prompts of 256 tokens packed into one prefill with all logits:
  top-1 agreement with the fp32 model, mean KL(p_fp32 || p_quant) per token (nats),
  and the perplexity of both on the text itself. Its weights come from a Q4_1 file (groups
  of 32 with an f16 scale and minimum): int4-g32 reproduces them exactly, so its row is
  lossless by construction and the other 4-bit rows re-quantize a 4-bit grid.
- all-MiniLM-L6-v2 (load("minilm-l6")): cosine of the mean-pooled sentence embeddings
  (fuselm.models.bert.sentence_embeddings) against fp32, min and mean over `--sentences`
  sentences of the same text.
- the quantized weights' bytes (every part: q, scales, offsets, SmoothQuant factors,
  LLM.int8's float outlier columns) against the fp32 bytes of the weights they replace.

The evaluation text is another part of default_text() than the calibration: w8a8,
llm.int8 and the -gptq schemes calibrate on its first 2,048 tokens (SmolLM2, as fuselm.LLM does by default)
or its first sentences (MiniLM); the evaluation starts `--skip-chars` (200,000)
characters in. Graphs run in the IR interpreter (fuselm.ir.interpret, the reference
numerics of every op, qgemm included) on the captured and fused graph, quantized by the
passes `fuselm.compile` runs (quantization_passes after the generic pipeline), as
tests/test_quantize_models.py does. Quality is never asserted beyond a few floors in
tests: this script is where it is measured. Runs on cpu: about 13 minutes on 2 (busy)
cores, 7 GB peak memory, for the defaults.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os

os.environ["HF_HUB_OFFLINE"] = "1"
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fuselm  # noqa: E402
from fuselm import ir  # noqa: E402
from fuselm.frontend import capture  # noqa: E402
from fuselm.ir.graph import Constant  # noqa: E402
from fuselm.models import load  # noqa: E402
from fuselm.models.bert import sentence_embeddings  # noqa: E402
from fuselm.models.contract import capture_example, pack_prompts  # noqa: E402
from fuselm.passes import pipeline, run_passes  # noqa: E402
from fuselm.passes.packed_weights import use_packed_weights  # noqa: E402
from fuselm.passes.quantize import quantization_passes  # noqa: E402
from fuselm.quant import QuantizeConfig  # noqa: E402
from fuselm.quant.config import SCHEMES as QUANTIZE_SCHEMES  # noqa: E402
from fuselm.quant.calibration import (PROMPT_TOKENS, calibration_prompts, default_text, encoder_batch,  # noqa: E402
                                      prose_sentences)

SCHEMES = (*QUANTIZE_SCHEMES, "gguf")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fused_graph(loaded):
    example, dynamic = capture_example(loaded.config)
    return run_passes(capture(loaded.model, example, dynamic), pipeline())


def gguf_graph(source):
    """quantize="gguf": the file's own Q4_1 / Q8_0 blocks (load(packed=True)), captured and
    compiled as fuselm.LLM(FILE, quantize="gguf") compiles them."""
    packed = load(source, packed=True)
    example, dynamic = capture_example(packed.config)
    passes = pipeline(quantize=quantization_passes(QuantizeConfig("gguf")),
                      packed_weights=("packed_weights", functools.partial(use_packed_weights, packed=packed.packed)))
    return run_passes(capture(packed.model, example, dynamic), passes)


def quantized_graph(fused, scheme: str, samples):
    config = QuantizeConfig(scheme)
    return run_passes(fused, quantization_passes(config, samples if config.needs_calibration else None))


def weight_bytes(graph) -> tuple:
    """(quantized bytes, fp32 bytes of the weights they replace, qgemms, float gemms) of
    a quantized graph; parts shared by several qgemms (one weight) count once."""
    packed, replaced, seen = 0, 0, set()
    qgemms = gemms = 0
    for node in graph.nodes:
        if node.op == "gemm" and isinstance(node.inputs[1], Constant):
            gemms += 1
        if node.op != "qgemm":
            continue
        qgemms += 1
        parts = dict(zip(node.attrs["parts"], node.inputs[1:]))
        if parts["q"].name in seen:
            continue
        seen.add(parts["q"].name)
        replaced += node.attrs["n"] * node.attrs["k"] * 4
        for value in parts.values():
            tensor = graph.constants[value.name]
            packed += tensor.numel() * tensor.element_size()
    return packed, replaced, qgemms, gemms


# ----------------------------------------------------------------------------- SmolLM2
def run_lm(graph, inputs) -> torch.Tensor:
    fresh = tuple(t.clone() for t in inputs.as_tuple())  # the paged cache is written in place
    with torch.no_grad():
        return ir.interpret(graph, *fresh)[0]  # (logits, the updated cache)


def lm_metrics(reference: torch.Tensor, logits: torch.Tensor, prompts: list) -> dict:
    """Top-1 agreement, mean KL(p_ref || p) and both perplexities, one prompt's rows at a
    time (the full log-softmaxes of 2,048 x 49,152 would be 400 MB each)."""
    agree = kl = nll_ref = nll = diff = 0.0
    targets = 0
    start = 0
    for prompt in prompts:
        rows = slice(start, start + len(prompt))
        start += len(prompt)
        diff = max(diff, (reference[rows] - logits[rows]).abs().max().item())
        log_p = F.log_softmax(reference[rows].double(), dim=-1)
        log_q = F.log_softmax(logits[rows].double(), dim=-1)
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        kl += (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0).sum().item()
        nxt = torch.tensor(prompt[1:])  # row j predicts token j + 1 of its prompt
        nll_ref -= log_p[:-1].gather(1, nxt[:, None]).sum().item()
        nll -= log_q[:-1].gather(1, nxt[:, None]).sum().item()
        targets += len(prompt) - 1
        del log_p, log_q
    tokens = start
    return {"top1": agree / tokens, "kl": kl / tokens, "ppl_ref": float(torch.tensor(nll_ref / targets).exp()),
            "ppl": float(torch.tensor(nll / targets).exp()), "max_diff": diff}


def bench_smollm2(schemes: list, tokens: int, skip_chars: int, results: dict) -> None:
    start = time.perf_counter()
    loaded = load("smollm2-135m")
    tokenizer, vocab = loaded.tokenizer, loaded.config.vocab_size
    fused = fused_graph(loaded)
    text = default_text()

    calibration = calibration_prompts(tokenizer, None, vocab)  # fuselm.LLM's default: the first 2,048 tokens
    calibration_chars = len(tokenizer.decode([t for p in calibration for t in p]))
    samples = [pack_prompts(loaded.config, calibration, all_logits=True).as_tuple()]
    prompts = calibration_prompts(tokenizer, [text[skip_chars:]], vocab, tokens=tokens)
    eval_chars = len(tokenizer.decode([t for p in prompts for t in p]))
    inputs = pack_prompts(loaded.config, prompts, all_logits=True)
    total = sum(map(len, prompts))
    print(f"\nSmolLM2-135M-Instruct ({loaded.source.name}, run in fp32), {loaded.config.num_hidden_layers} layers, "
          f"vocab {vocab}; {len([n for n in fused.nodes if n.op == 'gemm'])} gemms in the fused graph")
    print(f"  text: pydoc_data.topics, {len(text):,} characters")
    print(f"  calibration (w8a8, llm.int8, -gptq): its first {sum(map(len, calibration)):,} tokens "
          f"(characters 0..~{calibration_chars:,}), as {len(calibration)} prompts packed in one prefill")
    print(f"  evaluation: {total:,} tokens from character {skip_chars:,} on (..~{skip_chars + eval_chars:,}), "
          f"{len(prompts)} prompts of {PROMPT_TOKENS} tokens packed in one prefill, teacher-forced, all logits")

    t0 = time.perf_counter()
    reference = run_lm(fused, inputs)
    print(f"  fp32 reference run: {time.perf_counter() - t0:.1f} s, logits {tuple(reference.shape)}")

    print(f"\n  {'scheme':<15}{'gemms q/float':>15}{'top-1':>9}{'mean KL':>10}{'ppl fp32':>10}{'ppl q':>9}"
          f"{'max|dlogit|':>13}{'q MB':>8}{'fp32 MB':>9}{'ratio':>8}{'quantize s':>12}{'run s':>8}")
    for scheme in schemes:
        t0 = time.perf_counter()
        graph = gguf_graph(loaded.source) if scheme == "gguf" else quantized_graph(fused, scheme, samples)
        t1 = time.perf_counter()
        logits = run_lm(graph, inputs)
        t2 = time.perf_counter()
        metrics = lm_metrics(reference, logits, prompts)
        packed, replaced, qgemms, gemms = weight_bytes(graph)
        del logits, graph
        gc.collect()
        metrics.update(bytes=packed, replaced=replaced, ratio=packed / replaced)
        results.setdefault(scheme, {}).update(metrics)
        print(f"  {scheme:<15}{f'{qgemms}/{gemms}':>15}{metrics['top1']:>9.2%}{metrics['kl']:>10.4f}"
              f"{metrics['ppl_ref']:>10.2f}{metrics['ppl']:>9.2f}{metrics['max_diff']:>13.3g}"
              f"{packed / 1e6:>8.1f}{replaced / 1e6:>9.1f}"
              f"{packed / replaced:>8.3f}{t1 - t0:>12.1f}{t2 - t1:>8.1f}", flush=True)
    print("  (gemms q/float: qgemms / gemms left in floating point; the 4-bit schemes keep the tied lm_head "
          "in fp32 by default, and its bytes are not in the ratio)")
    if loaded.source.suffix.lower() == ".gguf":
        print(f"  note: the fp32 weights are those of {loaded.source.name}, dequantized: a Q4_1 file's weights already "
              "lie on a 4-bit grid (groups of 32, f16 scale and minimum), which int4-g32 reproduces exactly "
              "(max|dlogit| 0 above); the other 4-bit schemes re-quantize that grid onto another. MiniLM's "
              "weights (safetensors, never quantized) show the 4-bit schemes' own loss.")
    print(f"  SmolLM2 total {time.perf_counter() - start:.0f} s, peak RSS so far {peak_rss_gb():.1f} GB")
    del reference, fused
    gc.collect()


# ----------------------------------------------------------------------------- MiniLM
def bench_minilm(schemes: list, count: int, skip_chars: int, results: dict) -> None:
    start = time.perf_counter()
    loaded = load("minilm-l6")
    fused = fused_graph(loaded)
    text = default_text()
    calibration_sentences = prose_sentences(text[:skip_chars])[:count]
    sentences = prose_sentences(text[skip_chars:])[:count]
    calibration = [encoder_batch(loaded.tokenizer, calibration_sentences)]
    input_ids, mask = encoder_batch(loaded.tokenizer, sentences)
    print(f"\nall-MiniLM-L6-v2, {loaded.config.num_hidden_layers} layers, "
          f"{len([n for n in fused.nodes if n.op == 'gemm'])} gemms in the fused graph")
    print(f"  calibration (w8a8, llm.int8, -gptq): the first {len(calibration_sentences)} prose sentences of the text")
    print(f"  evaluation: {len(sentences)} prose sentences from character {skip_chars:,} on, "
          f"{int(mask.sum())} tokens (padded to {tuple(input_ids.shape)}), mean pooled and L2-normalized")
    print(f"  e.g. {sentences[0]!r}")
    with torch.no_grad():
        reference = sentence_embeddings(ir.interpret(fused, input_ids, mask), mask)
    print(f"\n  {'scheme':<15}{'gemms q/float':>15}{'cos min':>10}{'cos mean':>10}{'q MB':>8}{'fp32 MB':>9}"
          f"{'ratio':>8}")
    for scheme in (s for s in schemes if s != "gguf"):  # MiniLM is a safetensors model: no GGUF blocks
        graph = quantized_graph(fused, scheme, calibration)
        with torch.no_grad():
            ours = sentence_embeddings(ir.interpret(graph, input_ids, mask), mask)
        cosine = F.cosine_similarity(ours.double(), reference.double())
        packed, replaced, qgemms, gemms = weight_bytes(graph)
        results.setdefault(scheme, {}).update(cos_min=cosine.min().item(), cos_mean=cosine.mean().item(),
                                              minilm_ratio=packed / replaced)
        print(f"  {scheme:<15}{f'{qgemms}/{gemms}':>15}{cosine.min().item():>10.5f}{cosine.mean().item():>10.5f}"
              f"{packed / 1e6:>8.2f}{replaced / 1e6:>9.2f}{packed / replaced:>8.3f}", flush=True)
    print(f"  MiniLM total {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------- main
def markdown(results: dict, schemes: list) -> None:
    print("\n| scheme | SmolLM2 top-1 | SmolLM2 mean KL | MiniLM cos min / mean | weight bytes ratio |")
    print("|---|---|---|---|---|")
    for scheme in schemes:
        r = results.get(scheme, {})
        top1 = f"{r['top1']:.2%}" if "top1" in r else "-"
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        cos = f"{r['cos_min']:.5f} / {r['cos_mean']:.5f}" if "cos_min" in r else "-"
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else f"{r['minilm_ratio']:.3f} (MiniLM)" if r else "-"
        print(f"| {scheme} | {top1} | {kl} | {cos} | {ratio} |")
    print("\nweight bytes ratio: SmolLM2's quantized parts / the fp32 bytes of the weights they replace")
    print("SmolLM2's weights come from its Q4_1 GGUF: int4-g32 is lossless on them by construction (see above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help=f"comma-separated, from {', '.join(SCHEMES)} (default: all)")
    parser.add_argument("--tokens", type=int, default=2048, help="SmolLM2 evaluation tokens (prompts of 256)")
    parser.add_argument("--sentences", type=int, default=32, help="MiniLM evaluation sentences")
    parser.add_argument("--skip-chars", type=int, default=200_000,
                        help="the evaluation text starts this many characters into default_text()")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip-lm", action="store_true", help="MiniLM only")
    parser.add_argument("--skip-minilm", action="store_true", help="SmolLM2 only")
    args = parser.parse_args()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for scheme in schemes:
        if scheme not in SCHEMES:
            parser.error(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"fuselm {fuselm.__version__}, torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}, fp32 reference, IR interpreter (reference numerics)")
    print(f"schemes: {', '.join(schemes)}")
    results: dict = {}
    if not args.skip_lm:
        bench_smollm2(schemes, args.tokens, args.skip_chars, results)
    if not args.skip_minilm:
        bench_minilm(schemes, args.sentences, args.skip_chars, results)
    markdown(results, schemes)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
