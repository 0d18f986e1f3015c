"""Encoder benchmark: packed MiniLM against its peers, measured in one run. Not a test.

    python benchmarks/encode.py [--threads 2] [--texts 10000] [--runs 5]

1. The batch of `benchmarks/forward.py`: all-MiniLM-L6-v2 on 64 sequences with lengths
   uniform in 8..128 (about half the positions are padding), fp32, last_hidden_state:
   fuselm packed (`compile(pack=True)`), fuselm padded, transformers eager,
   torch.compile of it and ONNX Runtime, all padded but fuselm packed. Target: fuselm
   packed >= 2x ONNX Runtime.
2. `encode` throughput: `--texts` sentences of 1..60 words (a fixed generator), embedded
   with each system's whole pipeline at the same batch size (32, sentence-transformers'
   default): tokenize, sort by length, pad each batch to its longest, run, mean-pool the
   real tokens, L2-normalize, return in input order. fuselm is `Encoder.encode`; the
   peers run the same loop around their forward. Reported in texts/s; every system's
   embeddings are checked against transformers' (min cosine printed).

Every system gets the same threads (`--threads`: torch.set_num_threads, TVM's pool,
ONNX Runtime's intra-op threads, which do not spin between runs here: spinning, they
slowed the system timed after them) and fp32. Ratios are peer time / fuselm packed time
(> 1: fuselm faster).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the a of compiler kernel fuses model token attention mask padding sequence batch matrix layer norm "
         "residual quantize latency throughput memory cache packed varlen encoder sentence embedding vector "
         "search query document language machine learning inference server request").split()


def texts_of(count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertModel

    import fuselm
    from benchmarks.forward import median_ms, minilm_batch, onnx_session, print_table
    from fuselm.models import fetch
    from fuselm.models.contract import capture_example

    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads} for every system; fp32; batch size {args.batch_size}")
    path = str(fetch("minilm-l6"))
    hf = BertModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = fuselm.Encoder("minilm-l6", target="cpu", batch_size=args.batch_size)
    example, dynamic = capture_example(encoder.config)
    padded = fuselm.compile(encoder.forward.model, example, target="cpu", dynamic=dynamic)
    compiled_hf = torch.compile(hf)
    ids, mask, real = minilm_batch(encoder.config.vocab_size)
    # exported from its own instance: torch.onnx.export's tracing leaves the exported module
    # computing other values afterwards (measured: cosine 0.3 against its own earlier output)
    session, _ = onnx_session(BertModel.from_pretrained(path).eval(), ids, mask, threads=args.threads, spinning=False)

    def hf_forward(model):
        def run(input_ids, attention_mask):
            with torch.no_grad():
                return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return run

    def ort_forward(input_ids, attention_mask):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(session.run(None, feeds)[0])

    systems = [
        ("fuselm cpu, packed", encoder.forward),
        ("fuselm cpu, padded", padded),
        ("transformers eager, padded", hf_forward(hf)),
        ("torch.compile, padded", hf_forward(compiled_hf)),
        (f"ONNX Runtime, padded, {args.threads} threads", ort_forward),
    ]
    reference = hf_forward(hf)(ids, mask)
    keep = mask.bool()
    rows = []
    for name, forward in systems:
        with torch.no_grad():
            cosine = F.cosine_similarity(forward(ids, mask)[keep], reference[keep], dim=-1).min().item()
        rows.append((name, median_ms(lambda: forward(ids, mask), warmup=2, runs=args.runs)))
        print(f"  {name}: min cosine vs transformers at real positions {cosine:.6f}")
    print_table(f"all-MiniLM-L6-v2, 64 sequences, lengths 8..128 ({real:.0%} real tokens), fp32", rows)

    texts = texts_of(args.texts)

    def pipeline(forward):
        def encode(items):
            ids_list = tokenizer(items, truncation=True, max_length=encoder.max_length)["input_ids"]
            order = sorted(range(len(items)), key=lambda i: len(ids_list[i]))
            out = torch.empty(len(items), encoder.dimension)
            for start in range(0, len(order), args.batch_size):
                chosen = order[start:start + args.batch_size]
                width = max(len(ids_list[i]) for i in chosen)
                input_ids = torch.tensor([ids_list[i] + [0] * (width - len(ids_list[i])) for i in chosen])
                attention = torch.tensor([[1] * len(ids_list[i]) + [0] * (width - len(ids_list[i])) for i in chosen])
                with torch.no_grad():
                    hidden = forward(input_ids, attention)
                weights = attention[..., None].float()
                out[chosen] = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return F.normalize(out, p=2, dim=1)
        return encode

    encoders = [("fuselm Encoder.encode (packed)", encoder.encode)] + [
        (name.replace(", padded", ""), pipeline(forward)) for name, forward in systems[2:]]
    expected = pipeline(hf_forward(hf))(texts[:500])
    print(f"\nencode throughput: {len(texts)} texts of 1..60 words, batch size {args.batch_size}")
    print(f"  {'system':<36}{'texts/s':>10}{'fuselm / peer':>16}{'min cosine':>12}")
    results = []
    for name, encode in encoders:
        cosine = F.cosine_similarity(encode(texts[:500]), expected).min().item()
        encode(texts[:200])  # warm-up: every kernel and shape class built
        start = time.perf_counter()
        encode(texts)
        results.append((name, len(texts) / (time.perf_counter() - start), cosine))
    base = results[0][1]
    for name, rate, cosine in results:
        print(f"  {name:<36}{rate:>10.1f}{base / rate:>15.2f}x{cosine:>12.6f}")


if __name__ == "__main__":
    main()
