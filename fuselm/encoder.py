"""`fuselm.Encoder`: sentence embeddings from an encoder model, packed.

    encoder = fuselm.Encoder("minilm-l6")         # all-MiniLM-L6-v2, target="auto"
    vectors = encoder.encode(["a text", "another"])  # float32 [2, 384], in input order
    vector = encoder.encode("one text")              # [384]

As sentence-transformers does for the model: texts are tokenized (with the special
tokens), truncated at `max_seq_length` of `sentence_bert_config.json` (else the model's
positions), run through the encoder, pooled as `1_Pooling/config.json` says (mean over
real tokens by default; cls, max, mean_sqrt_len and several at once, concatenated in
sentence-transformers' order) and L2-normalized when `modules.json` holds a Normalize
module (the default of `normalize`). The encoder is compiled with `pack=True`
(passes/pack_varlen.py): gemms, norms and attention run on the real tokens only. A call
sorts its texts by length and cuts them into batches of `batch_size`, so each batch is
padded little; results come back in input order.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .models.sentence import SentenceConfig
from .target import get_target

class Encoder:
    def __init__(self, model: str = "minilm-l6", target: str = "auto", *, quantize=None,
                 cache_dir: Optional[str] = None, batch_size: int = 32):
        """`model`: a named model, a Hugging Face BERT directory (with or without
        sentence-transformers' files), or an artifact of `fuselm build` of one (loaded,
        nothing compiled; packed as built). `quantize`: a scheme of `fuselm.compile`."""
        from .artifact.format import is_artifact

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if is_artifact(model):
            self._load_artifact(model, target, quantize)
        else:
            self._compile(model, target, quantize, cache_dir)
        if self.config.model_type != "bert":
            raise ValueError(f"{model!r} is a {self.config.model_type} model, not an encoder: fuselm.Encoder runs "
                             "BERT-style encoders; use fuselm.LLM for language models")
        positions = self.config.max_position_embeddings
        self.max_length = min(self.sentence.max_seq_length or positions, positions)
        self._truncating = type(self.tokenizer.backend).from_str(self.tokenizer.backend.to_str())
        self._truncating.enable_truncation(self.max_length)
        self.batch_size = batch_size
        self.dimension = self.config.hidden_size * len(self.sentence.pooling)

    def _compile(self, model, target, quantize, cache_dir) -> None:
        from . import api
        from .models import load
        from .runtime.engine import DEFAULT_BLOCK_SIZE  # unused by an encoder's capture

        self.target = get_target(target)
        loaded = load(model)
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        if self.config.model_type != "bert":
            return  # refused by the caller, before anything compiles
        self.sentence = SentenceConfig.read(loaded.source) if loaded.source.is_dir() else SentenceConfig()
        # as `fuselm build` compiles it (quantize's calibration: sentences of text)
        self.forward = api.compile_lm(loaded, self.target, DEFAULT_BLOCK_SIZE, torch.float32, cache_dir,
                                      quantize=quantize, pack=True)

    def _load_artifact(self, model, target, quantize) -> None:
        from .artifact import load as load_artifact
        from .errors import ArtifactError

        if quantize not in (None, "none"):
            raise ArtifactError(f"{model} is an artifact: its quantization was chosen when it was built "
                                "(fuselm build --quantize); load it without quantize=")
        self.forward = load_artifact(model, None if target == "auto" else target)
        self.target, self.config, self.tokenizer = self.forward.target, self.forward.config, self.forward.tokenizer
        recorded = self.forward.manifest.get("sentence")
        self.sentence = SentenceConfig.from_dict(recorded) if recorded else SentenceConfig()

    def encode(self, texts: Union[str, Sequence[str]], batch_size: Optional[int] = None,
               normalize: Optional[bool] = None, truncate: bool = True) -> torch.Tensor:
        """Embeddings: `[N, D]` float32 for a list of N texts, `[D]` for one string.
        `normalize`: L2-normalize (default: as the model's sentence-transformers files
        say). `truncate=False` refuses a text longer than the model takes instead of
        cutting it."""
        if normalize not in (None, True, False) or truncate not in (True, False):
            raise TypeError(f"normalize must be None, True or False and truncate True or False, got "
                            f"normalize={normalize!r}, truncate={truncate!r}")
        single = isinstance(texts, str)
        items = [texts] if single else _texts(texts)
        batch_size = self.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        ids = self._tokenize(items, truncate)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.dimension, dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            out[chosen] = self._embed([ids[i] for i in chosen])
        if self.sentence.normalize if normalize is None else normalize:
            out = F.normalize(out, p=2, dim=1)
        return out[0] if single else out

    def _tokenize(self, texts: list, truncate: bool) -> list:
        if not texts:
            return []
        if truncate:  # the tokenizer's own truncation keeps the special tokens, as sentence-transformers'
            return [encoding.ids for encoding in self._truncating.encode_batch(texts)]
        ids = self.tokenizer.encode_batch(texts)
        for i, row in enumerate(ids):
            if len(row) > self.max_length:
                raise ValueError(f"text {i} is {len(row)} tokens long, and this model takes at most "
                                 f"{self.max_length}; truncating cuts it (truncate=True; `fuselm embed` "
                                 "without --no-truncate)")
        return ids

    def _embed(self, rows: list) -> torch.Tensor:
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.int64)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.int64)
        hidden = self.forward(input_ids.to(self.target.device), mask.to(self.target.device))
        return pool(hidden.float().cpu(), mask, self.sentence.pooling)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """sentence-transformers' pooling of `hidden [B, S, D]` over the real tokens of mask."""
    keep = mask[..., None].to(hidden.dtype)
    counts = keep.sum(1).clamp(min=1e-9)
    pooled = {
        "cls_token": lambda: hidden[:, 0],
        "max_tokens": lambda: hidden.masked_fill(keep == 0, -1e9).amax(1),
        "mean_tokens": lambda: (hidden * keep).sum(1) / counts,
        "mean_sqrt_len_tokens": lambda: (hidden * keep).sum(1) / counts.sqrt(),
    }
    return torch.cat([pooled[mode]() for mode in modes], dim=1)


def _texts(texts) -> list:
    if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
        raise TypeError(f"encode takes a string or a list of strings, got {type(texts).__name__}")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"encode: item {i} is a {type(text).__name__}, not a string")
    return items
