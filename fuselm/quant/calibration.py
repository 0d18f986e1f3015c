"""Activation statistics on sample inputs: what w8a8 (SmoothQuant), LLM.int8 and GPTQ need.

The graph runs in the IR interpreter on each sample; for the chosen gemm nodes a
statistic of the input x (as [rows, K] over all rows of all samples) is accumulated: the
max |x| of every input feature (`activation_absmax`), or X^T X (`input_gram`).
"""
from __future__ import annotations

import re

import torch

from ..errors import FuselmError
from ..ir.graph import Graph
from ..ir.interpreter import bind_symbols, interpret

CALIBRATED = "w8a8, llm.int8 and the -gptq schemes"


def activation_absmax(graph: Graph, samples, nodes: list, recapture=None) -> dict:
    """{node: f32 [K]}: max |x| per feature of each node's input 0 over `samples`
    (each a tuple of tensors, the graph's inputs in order). A sample of shapes the graph
    does not take (a static graph, other lengths) runs on `recapture(sample)` -> (the
    graph captured for it, its gemms matching `nodes` one to one), if given."""
    def absmax(x: torch.Tensor, before):
        row_max = x.abs().amax(dim=0) if x.shape[0] else torch.zeros(x.shape[-1])
        return row_max if before is None else torch.maximum(before, row_max)

    found = _accumulate(graph, samples, nodes, recapture, absmax)
    return {node: found.get(node, torch.zeros(node.inputs[0].type.shape[-1])) for node in nodes}


def input_gram(graph: Graph, samples, nodes: list, recapture=None) -> dict:
    """{node: (f64 [K, K], rows)}: X^T X of each node's input 0 over all rows of
    `samples` (as `activation_absmax` runs them), GPTQ's H up to a factor, and how many
    rows it sums."""
    def gram(x: torch.Tensor, before):
        product = (x.T @ x).double()
        return (product, x.shape[0]) if before is None else (before[0] + product, before[1] + x.shape[0])

    found = _accumulate(graph, samples, nodes, recapture, gram)
    k = {node: node.inputs[0].type.shape[-1] for node in nodes}
    return {node: found.get(node, (torch.zeros(k[node], k[node], dtype=torch.float64), 0)) for node in nodes}


def _accumulate(graph: Graph, samples, nodes: list, recapture, update) -> dict:
    """{node: update(x, the value so far or None)} folded over the f32 [rows, K] input 0
    of each node in `nodes` on every sample."""
    found: dict = {}

    def observer(mapping: dict):
        def observe(node, inputs):
            if node in mapping:
                target = mapping[node]
                found[target] = update(inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]), found.get(target))
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
        raise FuselmError(f"quantize: the calibration data is empty; {CALIBRATED} need at least one sample")
    return found


CALIBRATION_TOKENS = 2048  # of the default text: stable per-feature maxima, and GPTQ's H of full rank
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
        raise FuselmError(f"quantize: the calibration data is empty; {CALIBRATED} need at least one sample")
    return [ids[i:i + PROMPT_TOKENS] for i in range(0, len(ids), PROMPT_TOKENS)]


CALIBRATION_SENTENCES = 128  # of the default text, for an encoder
SENTENCE_BATCH = 32  # sentences per padded calibration batch


def prose_sentences(text: str) -> list:
    """Sentences of running prose (no code, no tables): paragraphs whose lines are not
    indented, split after . ! ?, 8 to 40 words, starting with a capital letter."""
    sentences = []
    for paragraph in text.split("\n\n"):
        if not paragraph.strip() or any(line.startswith((" ", "\t", "*", "+", "=", "-", ">")) for line in
                                        paragraph.splitlines()):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
            words = sentence.split()
            if 8 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?" and \
                    sum(c.isalpha() or c in " ,.;:'\"-" for c in sentence) >= 0.9 * len(sentence):
                sentences.append(sentence)
    return sentences


def encoder_batch(tokenizer, texts: list, max_length: int = None) -> tuple:
    """(input_ids, attention_mask) of `texts`, padded with 0 to the longest (each cut to
    `max_length` tokens)."""
    ids = [row[:max_length] for row in tokenizer.encode_batch(texts)]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return input_ids, mask


def encoder_calibration(tokenizer, calibration, max_length: int) -> list:
    """An encoder's calibration samples, (input_ids, attention_mask) batches of
    SENTENCE_BATCH texts: `calibration`'s texts, or (None) the first
    CALIBRATION_SENTENCES prose sentences of the default text; samples that are not
    texts are the model's own call arguments and pass as they are."""
    if calibration is None:
        texts = prose_sentences(default_text())[:CALIBRATION_SENTENCES]
    else:
        samples = list(calibration)
        if not all(isinstance(sample, str) for sample in samples):
            return samples
        texts = [text for text in samples if text.strip()]
        if not texts:
            raise FuselmError(f"quantize: the calibration data is empty; {CALIBRATED} need at least one sample")
    return [encoder_batch(tokenizer, texts[i:i + SENTENCE_BATCH], max_length)
            for i in range(0, len(texts), SENTENCE_BATCH)]
