"""Insert quantize/dequantize around gemms: the first half of quantization.

For each eligible gemm (a constant [N, K] floating-point weight, not skipped by the
config; see quant/config.py), the weight is quantized with torch at compile time into
its parts (ir/quant_ops.py formats) and the gemm reads `dequantize(parts)` instead:

  weight-only (int8, int4-gN, nf4)   gemm(x, dequantize(@w.q, @w.scale[, @w.offset]))
                                     rounded to nearest, or by GPTQ against the calibration
                                     inputs' X^T X (the -gptq schemes; quant/gptq.py)
  w8a8                               gemm(quantize_dynamic(x * @w.smooth), dequantize(@w.q, @w.scale))
                                     with SmoothQuant's 1/s in @w.smooth and w * s quantized
  llm.int8                           gemm(quantize_dynamic(x, @w.keep),
                                          dequantize(@w.q, @w.scale, @w.keep, @w.w_keep) {outliers})
                                     the outlier features `keep` exact, the rest int8

The graph still computes in floating point: the interpreter runs it as it stands, which
is the numerics of the scheme (what a Before/After check compares). fold_qgemm.py then
folds each q/dq pair into one `qgemm` whose dequantization happens inside the kernel.
w8a8 and llm.int8 read activation statistics from the calibration samples, GPTQ X^T X.
"""
from __future__ import annotations

import fnmatch
import warnings

import torch

from ..errors import CalibrationWarning, FuselmError
from ..ir.graph import Constant, Graph, transform
from ..quant.calibration import activation_absmax, input_gram
from ..quant.config import LM_HEAD, PACKED, QuantizeConfig
from ..quant.gptq import gptq_quantize
from ..quant.weights import outlier_features, quantize_weight, smoothing_factors
from .base import counters


def is_output_head(w: Constant, readers: list) -> bool:
    """The output projection: a weight named lm_head, or one an embedding also reads (tied)."""
    return "lm_head" in w.name or any(r.op == "embedding" for r in readers)


def eligible_gemms(graph: Graph, config: QuantizeConfig) -> list:
    """The gemms the config quantizes, in graph order."""
    readers = graph.users()
    chosen = []
    for node in graph.nodes:
        if node.op != "gemm" or "weight_layout" in node.attrs or not isinstance(node.inputs[1], Constant):
            continue
        w, x = node.inputs[1], node.inputs[0]
        if not (w.type.is_float and x.type.is_float and w.type.rank == 2 and not w.type.symbols):
            continue
        if any(p == LM_HEAD and is_output_head(w, readers.get(w, [])) or fnmatch.fnmatchcase(w.name, p)
               for p in config.skip):
            continue
        chosen.append(node)
    return chosen


def insert_quantization(graph: Graph, config: QuantizeConfig, samples=None, recapture=None) -> Graph:
    """The pass: every eligible gemm reads a dequantized weight (and quantized
    activations for w8a8 / llm.int8). `samples`: calibration inputs (tuples of the
    graph's input tensors), needed by the schemes that calibrate; `recapture(sample)`:
    the fused graph of a sample of other shapes (see quant/calibration.py)."""
    nodes = eligible_gemms(graph, config)
    if not nodes:
        return graph
    stats = {}
    if config.needs_calibration:
        if samples is None:
            raise FuselmError(f"quantize={config.name!r} needs calibration inputs (calibration=...)")
        if recapture is not None:
            def recaptured(sample):
                other = recapture(sample)
                return other, eligible_gemms(other, config)
        collect = input_gram if config.rounding == "gptq" else activation_absmax
        stats = collect(graph, samples, nodes, recaptured if recapture is not None else None)
    grams = _grams(nodes, stats, config) if config.rounding == "gptq" else {}
    wanted = set(nodes)
    shared: dict = {}  # weight name -> parts constants (weight-only schemes quantize a weight once)

    def visit(builder, node, inputs):
        if node not in wanted:
            return None
        w = builder.constants[node.inputs[1].name].float()
        x, extras = inputs[0], inputs[2:]
        name = node.inputs[1].name
        attrs = {"format": config.format, "k": w.shape[1], "n": w.shape[0]}
        if config.scheme == "w8a8":
            s = smoothing_factors(stats[node], w, config.alpha)
            smooth = builder.constant(builder.fresh_constant_name(f"{name}.smooth"), (1.0 / s).contiguous())
            x = builder.op("mul", x, smooth, source=node.source)
            w = w * s
        keep = None
        if config.scheme == "llm.int8":
            outliers = outlier_features(stats[node], config.threshold)
            if outliers.numel():
                keep = (builder.constant(builder.fresh_constant_name(f"{name}.keep"), outliers),
                        builder.constant(builder.fresh_constant_name(f"{name}.w_keep"), w[:, outliers].contiguous()))
                w = w.index_fill(1, outliers, 0.0)
                counters["quantize.outlier_features"] += int(outliers.numel())
        if config.activations == "int8":
            x = builder.op("quantize_dynamic", x, *(keep[:1] if keep else ()), bits=8, source=node.source)
        group_size = config.group_size or w.shape[1]
        key = (name, config.scheme) if config.activations == "float" else None
        parts = shared.get(key)
        if parts is None:
            tensors = (gptq_quantize(w, grams[name], config.format, group_size) if config.rounding == "gptq"
                       else quantize_weight(w, config.format, group_size))
            parts = [builder.constant(builder.fresh_constant_name(f"{name}.{part}"), t) for part, t in tensors.items()]
            if key is not None:
                shared[key] = parts
        dequantized = builder.op("dequantize", *parts, *(keep or ()), group_size=group_size, outliers=keep is not None,
                                 source=node.source, **attrs)
        if x.type.dtype != "f32":
            dequantized = builder.op("cast", dequantized, dtype=x.type.dtype, source=node.source)
        counters[f"quantize.{config.name}"] += 1
        return builder.op("gemm", x, dequantized, *extras, source=node.source, **node.attrs)

    return transform(graph, visit)


def _grams(nodes: list, stats: dict, config: QuantizeConfig) -> dict:
    """weight name -> X^T X summed over the gemms that read it (GPTQ), with a warning
    when fewer calibration rows than input features made it: GPTQ's rounding then fits
    those few inputs, and may do worse than rounding to nearest on others."""
    grams, rows = {}, {}
    for node in nodes:
        name, (gram, count) = node.inputs[1].name, stats[node]
        grams[name] = grams[name] + gram if name in grams else gram
        rows[name] = rows.get(name, 0) + count
        if not torch.isfinite(gram).all():
            raise FuselmError(f"quantize={config.name!r}: the calibration inputs reach the gemm of weight {name} as "
                              "inf or NaN; GPTQ needs finite activations (check the calibration samples)")
    short = [(name, rows[name], grams[name].shape[0]) for name in grams if rows[name] < grams[name].shape[0]]
    if short:
        name, count, k = short[0]
        warnings.warn(f"quantize={config.name!r}: GPTQ calibrated on {count} input rows for {k} input features "
                      f"(weight {name}{f' and {len(short) - 1} more' if len(short) > 1 else ''}): its rounding "
                      "fits those inputs; pass calibration= with more (thousands of tokens)", CalibrationWarning,
                      stacklevel=2)
    return grams


def quantization_passes(config: QuantizeConfig, samples=None, recapture=None) -> list:
    """The named passes that quantize a fused graph: insert q/dq, then fold into qgemm
    (only the fold for "gguf", whose dequantizes passes/packed_weights.py inserted)."""
    from .fold_qgemm import fold_qgemm

    if config.scheme == PACKED:
        return [("fold_qgemm", fold_qgemm)]

    def quantize(graph: Graph) -> Graph:
        return insert_quantization(graph, config, samples, recapture)

    return [("quantize", quantize), ("fold_qgemm", fold_qgemm)]
