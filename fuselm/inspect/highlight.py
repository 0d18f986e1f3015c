"""Kernel sources on a terminal: coloured by pygments when it is installed and the
output is a terminal, byte for byte as written otherwise (so `> file` and pipes get the
exact source)."""
from __future__ import annotations

import sys
from pathlib import PurePath

# TVMScript is Python syntax; `ll` is LLVM IR and `s` the assembly TVM writes beside it.
LEXER_OF_EXT = {"py": "python", "tir": "python", "ll": "llvm", "s": "gas"}


def write_source(text: str, filename: str, stream=None) -> None:
    stream = stream or sys.stdout
    coloured = _highlighted(text, filename) if _is_terminal(stream) else None
    stream.write(coloured if coloured is not None else text)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _highlighted(text: str, filename: str):
    try:
        from pygments import highlight
        from pygments.formatters import TerminalFormatter
        from pygments.lexers import get_lexer_by_name
    except ImportError:
        return None
    lexer = LEXER_OF_EXT.get(PurePath(filename).suffix.lstrip("."))
    if lexer is None:
        return None
    return highlight(text, get_lexer_by_name(lexer), TerminalFormatter())
