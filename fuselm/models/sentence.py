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
        modules = _json(directory / "modules.json") or []
        pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
        pooling = _json(directory / pooling_dir / "config.json") or {}
        modes = tuple(mode for mode in POOLING_MODES if pooling.get(f"pooling_mode_{mode}"))
        unknown = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
                   and k.removeprefix("pooling_mode_") not in POOLING_MODES]
        if unknown:
            raise ValueError(f"{directory}: pooling {unknown} is not supported (fuselm pools {list(POOLING_MODES)})")
        normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        length = (_json(directory / "sentence_bert_config.json") or {}).get("max_seq_length")
        return SentenceConfig(modes or ("mean_tokens",), normalize, length)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "pooling": list(self.pooling)}

    @staticmethod
    def from_dict(data: dict) -> "SentenceConfig":
        return SentenceConfig(tuple(data["pooling"]), bool(data["normalize"]), data.get("max_seq_length"))


def _json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None
