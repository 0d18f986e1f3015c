"""fuselm's tokenizer: a Hugging Face `tokenizers.Tokenizer` plus chat template and special ids.

Two sources:

- `Tokenizer.from_file(directory)`: `tokenizer.json`, with `tokenizer_config.json`,
  `special_tokens_map.json`, `chat_template.jinja` and `generation_config.json` when present.
- `Tokenizer.from_gguf(reader)`: a byte-level BPE rebuilt from llama.cpp's
  `tokenizer.ggml.*` metadata exactly as transformers' GGUF integration builds it
  (`integrations/gguf/gguf_tokenizer_mapping.py`), so both give the same ids: the vocabulary
  respelled in the byte alphabet, the file's merges, control tokens (type 3) added as
  special tokens and user-defined ones (type 4) as plain added tokens, and GPT-2's
  ByteLevel pre-tokenizer unless `tokenizer.ggml.pre` names a split regex of its own.

Chat templates render the way transformers renders them: a sandboxed jinja2 environment
with trim_blocks/lstrip_blocks, `raise_exception`, a non-escaping `tojson`, and the special
tokens (`bos_token`, `eos_token`, ...) as template variables.

`tokenizers` and `jinja2` are imported inside functions, so importing this module is cheap.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# llama.cpp's token types (enum llama_token_type)
GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` values whose split regex differs from GPT-2's (transformers' table,
# the Llama-3 family); any other value, `smollm` included, gets GPT-2's ByteLevel regex.
GGUF_PRE_TOKENIZER_SPLITS = {
    name: _LLAMA3_SPLIT
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
}


class Tokenizer:
    """Text <-> token ids, chat templates, and the special token ids a runtime needs."""

    def __init__(self, backend, *, special_tokens: dict[str, Optional[str]],
                 chat_template: Optional[str] = None, extra_eos_token_ids: Sequence[int] = ()):
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        eos = [self.token_to_id(self.special_tokens.get("eos_token")), *extra_eos_token_ids]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos if i is not None))

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_file(cls, directory) -> "Tokenizer":
        """A tokenizer from a Hugging Face model directory (needs `tokenizer.json`)."""
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:
            raise ValueError(f"{path}: not a valid tokenizer.json ({error})") from error
        # tokenizer.json may carry a fixed padding/truncation (all-MiniLM's pads to 128);
        # transformers turns both off unless a call asks, and so do we.
        backend.no_padding()
        backend.no_truncation()
        settings = read_tokenizer_settings(directory)
        special_tokens = {name: token_content(settings.get(name)) for name in SPECIAL_TOKEN_NAMES}
        return cls(backend, special_tokens=special_tokens,
                   chat_template=settings.get("chat_template"),
                   extra_eos_token_ids=generation_eos_token_ids(directory))

    @classmethod
    def of_numbered_words(cls, vocab_size: int, eos_token_id: int = 2) -> "Tokenizer":
        """A tokenizer for random-weight models: token i is the word `t<i>` (no files needed)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit

        backend = Backend(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
        backend.pre_tokenizer = WhitespaceSplit()
        return cls(backend, special_tokens={"eos_token": f"t{eos_token_id}"})

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """A tokenizer from the `tokenizer.ggml.*` metadata of an open `gguf.GGUFReader`."""
        metadata = GGUFTokenizerMetadata.read(reader)
        if metadata.model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {metadata.model!r} is not supported: "
                             "fuselm builds byte-level BPE ('gpt2') tokenizers from GGUF")
        backend = build_gguf_byte_level_bpe(metadata)
        return cls(backend, special_tokens=metadata.special_tokens(),
                   chat_template=metadata.chat_template,
                   extra_eos_token_ids=metadata.end_of_turn_ids())

    def save(self, directory) -> list:
        """Write this tokenizer as a Hugging Face directory's tokenizer files, which
        `from_file(directory)` reads back as the same tokenizer (whatever it was built from,
        a GGUF file's metadata included); returns the paths written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {
            "tokenizer.json": self.backend.to_str(),
            "tokenizer_config.json": json.dumps({**self.special_tokens, "chat_template": self.chat_template},
                                                ensure_ascii=False, indent=1),
            "generation_config.json": json.dumps({"eos_token_id": list(self.eos_token_ids)}),
        }
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
        return [directory / name for name in files]

    # -- encoding -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- chat -----------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_variables):
        """The conversation rendered by the chat template (token ids when `tokenize`)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        variables = {"tools": None, "documents": None,
                     **{k: v for k, v in self.special_tokens.items() if v is not None}, **template_variables}
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        text = compile_chat_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, chat_template={self.chat_template is not None})")


# -- Hugging Face directory ---------------------------------------------------------

def read_json_if_present(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_tokenizer_settings(directory: Path) -> dict:
    """special_tokens_map.json overlaid by tokenizer_config.json, plus chat_template.jinja."""
    settings = {**read_json_if_present(directory / "special_tokens_map.json"),
                **read_json_if_present(directory / "tokenizer_config.json")}
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        settings["chat_template"] = template_file.read_text(encoding="utf-8")
    if isinstance(settings.get("chat_template"), list):  # named templates: use "default"
        named = {entry["name"]: entry["template"] for entry in settings["chat_template"]}
        settings["chat_template"] = named.get("default")
    return settings


def token_content(token) -> Optional[str]:
    """A special token as tokenizer_config.json spells it: a string or a serialized AddedToken."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def generation_eos_token_ids(directory: Path) -> list[int]:
    eos = read_json_if_present(directory / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


# -- GGUF ---------------------------------------------------------------------------

class GGUFTokenizerMetadata:
    """The `tokenizer.*` fields of a GGUF file."""

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self.model = fields.get("tokenizer.ggml.model")
        self.pre = fields.get("tokenizer.ggml.pre")
        self.tokens: list[str] = fields["tokenizer.ggml.tokens"]
        self.token_types: list[int] = fields.get("tokenizer.ggml.token_type") or []
        self.merges: list[str] = fields.get("tokenizer.ggml.merges") or []
        self.chat_template: Optional[str] = fields.get("tokenizer.chat_template")
        self.add_bos_token = bool(fields.get("tokenizer.ggml.add_bos_token", False))
        self.add_eos_token = bool(fields.get("tokenizer.ggml.add_eos_token", False))

    @classmethod
    def read(cls, reader) -> "GGUFTokenizerMetadata":
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise ValueError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
        return cls({key: field.contents() for key, field in reader.fields.items()
                    if key.startswith("tokenizer.")})

    def token(self, id_key: str) -> Optional[str]:
        token_id = self.fields.get(f"tokenizer.ggml.{id_key}")
        return None if token_id is None else self.tokens[token_id]

    def special_tokens(self) -> dict[str, Optional[str]]:
        return {"bos_token": self.token("bos_token_id"), "eos_token": self.token("eos_token_id"),
                "unk_token": self.token("unknown_token_id"), "pad_token": self.token("padding_token_id")}

    def end_of_turn_ids(self) -> list[int]:
        """llama.cpp's end-of-turn/end-of-message ids, which also end generation."""
        keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return [self.fields[key] for key in keys if self.fields.get(key) is not None]

    def ids_of_type(self, token_type: int) -> list[int]:
        return [i for i, kind in enumerate(self.token_types) if kind == token_type]


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (`bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def spell_in_byte_alphabet(token: str, alphabet: frozenset) -> str:
    if set(token) <= alphabet:
        return token
    return "".join(byte_alphabet()[b] for b in token.encode("utf-8"))


def build_gguf_byte_level_bpe(metadata: GGUFTokenizerMetadata):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    alphabet = frozenset(byte_alphabet().values())
    vocab = {spell_in_byte_alphabet(token, alphabet): i for i, token in enumerate(metadata.tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata.merges]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = GGUF_PRE_TOKENIZER_SPLITS.get(metadata.pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a llama.cpp mislabel: transformers skips it.
    control = [metadata.tokens[i] for i in metadata.ids_of_type(GGUF_TOKEN_CONTROL)
               if set(metadata.tokens[i]) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user_defined = [metadata.tokens[i] for i in metadata.ids_of_type(GGUF_TOKEN_USER_DEFINED)
                    if metadata.tokens[i] in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    set_bos_eos_post_processor(backend, metadata)
    return backend


def set_bos_eos_post_processor(backend, metadata: GGUFTokenizerMetadata) -> None:
    """Add BOS/EOS around each encoded text when the file asks for it."""
    from tokenizers import processors

    bos, eos = metadata.token("bos_token_id"), metadata.token("eos_token_id")
    pieces = ([bos] if metadata.add_bos_token and bos else []) + ["$A"] + \
             ([eos] if metadata.add_eos_token and eos else [])
    if len(pieces) > 1:
        special = [(t, backend.token_to_id(t)) for t in {bos, eos} if t and t in pieces]
        backend.post_processor = processors.TemplateProcessing(single=" ".join(pieces), special_tokens=special)


# -- chat templates -----------------------------------------------------------------

@lru_cache(maxsize=16)
def compile_chat_template(source: str):
    """A jinja2 template in the sandboxed environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must not contain
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)
