"""Activation statistics on sample inputs: what w8a8 (SmoothQuant) and LLM.int8 need.

The graph runs in the IR interpreter on each sample; for the chosen gemm nodes the max
|x| of every input feature (x's last dim) is collected over all rows of all samples.
"""
from __future__ import annotations

import torch

from ..errors import FuselmError
from ..ir.graph import Graph
from ..ir.interpreter import bind_symbols, interpret


def activation_absmax(graph: Graph, samples, nodes: list, recapture=None) -> dict:
    """{node: f32 [K]}: max |x| per feature of each node's input 0 over `samples`
    (each a tuple of tensors, the graph's inputs in order). A sample of shapes the graph
    does not take (a static graph, other lengths) runs on `recapture(sample)` -> (the
    graph captured for it, its gemms matching `nodes` one to one), if given."""
    absmax: dict = {}

    def observer(mapping: dict):
        def observe(node, inputs):
            if node in mapping:
                target = mapping[node]
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs()
                row_max = x.amax(dim=0) if x.shape[0] else torch.zeros(x.shape[-1])
                absmax[target] = torch.maximum(absmax[target], row_max) if target in absmax else row_max
        return observe

    count = 0
    with torch.no_grad():
        for sample in samples:
            try:
                bind_symbols(graph.inputs, tuple(sample))
                run_on, mapping = graph, {node: node for node in nodes}
            except TypeError as error:
                if recapture is None:
                    raise FuselmError(f"quantize: calibration sample {count} does not fit the model's inputs: "
                                      f"{error}") from error
                try:
                    run_on, others = recapture(tuple(sample))
                except Exception as failure:  # the model itself refuses the sample
                    reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
                    raise FuselmError(f"quantize: calibration sample {count} does not fit the model's inputs: "
                                      f"{error}; the model cannot run it: {reason}") from failure
                if [n.inputs[1].name for n in others] != [n.inputs[1].name for n in nodes]:
                    raise FuselmError(f"quantize: calibration sample {count} takes another path through the model "
                                      "(other gemms run); calibrate on calls like the one compiled") from error
                mapping = dict(zip(others, nodes))
            interpret(run_on, *sample, observe=observer(mapping))
            count += 1
    if not count:
        raise FuselmError("quantize: the calibration data is empty; w8a8 and llm.int8 need at least one sample")
    return {node: absmax.get(node, torch.zeros(node.inputs[0].type.shape[-1])) for node in nodes}


CALIBRATION_TOKENS = 1024  # of the default text: enough for stable per-feature maxima
PROMPT_TOKENS = 256  # the calibration text runs as prompts of this many tokens


def default_text() -> str:
    """English prose every Python has: the help topics of pydoc (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def calibration_prompts(tokenizer, calibration, vocab_size: int, tokens: int = CALIBRATION_TOKENS) -> list:
    """Token prompts from calibration samples (texts or token lists; None: the default
    text), cut into PROMPT_TOKENS-token prompts, `tokens` in all."""
    samples = [default_text()] if calibration is None else list(calibration)
    ids: list = []
    for i, sample in enumerate(samples):
        if isinstance(sample, str):
            ids += tokenizer.encode(sample, add_special_tokens=False)
        elif isinstance(sample, (list, tuple)) and all(isinstance(t, int) and 0 <= t < vocab_size for t in sample):
            ids += list(sample)
        else:
            raise FuselmError(f"quantize: calibration sample {i} must be a text or a list of token ids below "
                              f"{vocab_size}, got {type(sample).__name__}")
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if not ids:
        raise FuselmError("quantize: the calibration data is empty; w8a8 and llm.int8 need at least one sample")
    return [ids[i:i + PROMPT_TOKENS] for i in range(0, len(ids), PROMPT_TOKENS)]
