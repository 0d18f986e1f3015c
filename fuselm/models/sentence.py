"""What sentence-transformers' files say of a model directory: pooling, normalization and
the longest input (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`).
`fuselm.Encoder` embeds as they say; an encoder artifact records it in its manifest."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers' order


@dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers' files say of a model directory."""
    pooling: tuple = ("mean_tokens",)
    normalize: bool = False
    max_seq_length: Optional[int] = None

    @staticmethod
    def read(directory: Path) -> "SentenceConfig":
        modules = _json(directory / "modules.json", list) or []
        if not all(isinstance(m, dict) and isinstance(m.get("type", ""), str) for m in modules):
            raise ValueError(f"{directory / 'modules.json'}: not a list of sentence-transformers modules")
        pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
        pooling = _json(directory / str(pooling_dir) / "config.json", dict) or {}
        modes = tuple(mode for mode in POOLING_MODES if pooling.get(f"pooling_mode_{mode}"))
        unknown = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
                   and k.removeprefix("pooling_mode_") not in POOLING_MODES]
        if unknown:
            raise ValueError(f"{directory}: pooling {unknown} is not supported (fuselm pools {list(POOLING_MODES)})")
        normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        length = (_json(directory / "sentence_bert_config.json", dict) or {}).get("max_seq_length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"{directory / 'sentence_bert_config.json'}: max_seq_length must be a positive int, "
                             f"got {length!r}")
        return SentenceConfig(modes or ("mean_tokens",), normalize, length)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "pooling": list(self.pooling)}

    @staticmethod
    def from_dict(data: dict) -> "SentenceConfig":
        return SentenceConfig(tuple(data["pooling"]), bool(data["normalize"]), data.get("max_seq_length"))


def _json(path: Path, kind: type):
    """The file's JSON value (None without the file); ValueError naming the file when it
    is not JSON or not a `kind`."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(value, kind):
        wanted = "a list" if kind is list else "an object"
        raise ValueError(f"{path}: a JSON {type(value).__name__}, where sentence-transformers writes {wanted}")
    return value
