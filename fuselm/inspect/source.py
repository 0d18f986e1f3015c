"""What `fuselm inspect` reads: kernels, their sources, the IR after each pass, the graph.

Everything else in this package asks an `InspectSource` and never reads the directory
itself, so a second kind of directory (the ahead-of-time artifact: manifest.json, graph.ir, kernels)
is one more class with the same methods (artifact_source.py), picked by `open_source`.

A dump directory is what `fuselm.compile(..., dump_dir=DIR)` writes (passes/manager.py
and codegen/dump.py): `NN_<pass>.ir` after each pass, `kernels/<name>.<ext>` and
`index.json`. The dump holds no weights, so `graph()` parses the last IR with
placeholder tensors for the constants, made by the caller: meta tensors to draw it,
random ones to run it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from ..errors import FuselmError
from ..ir.graph import Graph
from ..ir.types import TensorType, parse_type

# Which target wrote a kernel, by its source's extension (the backends' `source_ext`).
TARGET_OF_SOURCE_EXT = {"tir": "cpu", "py": "cuda"}

_PASS_FILE = re.compile(r"^(\d+)_(\w+)\.ir$")
_CONSTANT_LINE = re.compile(r"^\s*@(\S+) : (\S+)$", re.MULTILINE)
_RESULT_NAME = re.compile(r"^%(\w+) = ")
_SOURCE_COMMENT = re.compile(r"  # (.*)$")


class InspectError(FuselmError):
    """What the user asked for is not there (no such directory, kernel or pass): one line."""


@dataclass(frozen=True)
class Launch:
    """One place in the forward pass where a kernel runs."""

    nodes: tuple  # the IR lines of the graph nodes it computes, `%N = op(...) : type  # file:line`
    cache_layer: Optional[int]

    @property
    def node_ids(self) -> tuple:
        """The nodes' positions in the final graph (the N of `%N`)."""
        return tuple(int(m.group(1)) for m in map(_RESULT_NAME.match, self.nodes) if m and m.group(1).isdigit())

    @property
    def source_lines(self) -> tuple:
        """The model's source lines its nodes came from (`llama.py:76`), in order, once each."""
        found = (_SOURCE_COMMENT.search(line) for line in self.nodes)
        return tuple(dict.fromkeys(m.group(1) for m in found if m))


@dataclass(frozen=True)
class KernelEntry:
    name: str
    ops: tuple  # the IR ops it fused
    params: tuple  # its parameter types, symbolic dims canonical (n0, n1, ...)
    source_file: str  # relative to the source's directory; "" when it has no source
    extra_files: tuple  # other forms of it (LLVM IR, assembly)
    launches: tuple  # Launch per place it runs, in execution order

    @property
    def source_lines(self) -> tuple:
        return tuple(dict.fromkeys(line for launch in self.launches for line in launch.source_lines))

    @property
    def target_name(self) -> Optional[str]:
        return TARGET_OF_SOURCE_EXT.get(Path(self.source_file).suffix.lstrip("."))


@dataclass(frozen=True)
class PassDump:
    number: int
    name: str
    path: Path

    @property
    def label(self) -> str:
        return self.path.stem  # "07_fuse_epilogue"


class InspectSource(Protocol):
    directory: Path

    def kernels(self) -> list: ...  # KernelEntry, in order of first launch

    def kernel_source(self, name: str) -> str: ...  # as written, byte for byte

    def kernel_file(self, name: str) -> str: ...  # its file name, for the highlighter

    def passes(self) -> list: ...  # PassDump, in pipeline order

    def ir_after(self, pass_name: Optional[str] = None) -> str: ...

    def graph(self, make_constant: Callable[[str, TensorType], torch.Tensor]) -> Graph: ...

    def target_name(self) -> str: ...


def open_source(path) -> InspectSource:
    """The inspectable thing at `path`; an InspectError says why there is none."""
    directory = Path(path)
    if not directory.is_dir():
        raise InspectError(f"{directory} is not a directory (expected an artifact of `fuselm build` or a "
                           "dump_dir written by fuselm.compile)")
    if (directory / "index.json").is_file():
        return DumpSource(directory)
    if (directory / "manifest.json").is_file():
        from .artifact_source import ArtifactSource

        return ArtifactSource(directory)
    raise InspectError(f"{directory} is neither a fuselm artifact (no manifest.json: build one with `fuselm build`) "
                       "nor a dump (no index.json: compile with dump_dir=DIR or FUSELM_DUMP=DIR to write one)")


class DumpSource:
    """A dump directory of `fuselm.compile(..., dump_dir=DIR)`."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            index = json.loads((directory / "index.json").read_text())
        except (OSError, ValueError) as error:
            raise InspectError(f"{directory / 'index.json'} cannot be read: {error}") from error
        self._kernels = [_kernel_entry(name, entry) for name, entry in index.items()]

    def kernels(self) -> list:
        return list(self._kernels)

    def kernel_names(self) -> list:
        return [entry.name for entry in self._kernels]

    def kernel_source(self, name: str) -> str:
        """The kernel's source as written; `NAME.ll` or `NAME.s` names one of its other forms."""
        return (self.directory / self.kernel_file(name)).read_text()

    def kernel_file(self, name: str) -> str:
        """Where `kernel_source(name)` comes from, relative to the directory."""
        entry = next((e for e in self._kernels if e.name == name), None)
        if entry is not None:
            if not entry.source_file or not (self.directory / entry.source_file).is_file():
                raise InspectError(f"kernel {name!r} has no source in {self.directory} (a fallback run by torch)")
            return entry.source_file
        for entry in self._kernels:
            for extra in entry.extra_files:
                if extra.rpartition("/")[2] == name:
                    return extra
        raise InspectError(f"no kernel {name!r} in {self.directory}; {close_matches(name, self.kernel_names())}")

    def passes(self) -> list:
        found = [(_PASS_FILE.match(p.name), p) for p in self.directory.iterdir()]
        return sorted((PassDump(int(m.group(1)), m.group(2), p) for m, p in found if m), key=lambda d: d.number)

    def ir_after(self, pass_name: Optional[str] = None) -> str:
        """The IR after the pass named (`fuse_norm`), numbered (`9`) or labelled
        (`09_fuse_norm`) as in the file names; without a name, after the last pass."""
        dumps = self.passes()
        if not dumps:
            raise InspectError(f"{self.directory} holds no NN_<pass>.ir files")
        if pass_name is None:
            return dumps[-1].path.read_text()
        wanted = pass_name.strip()
        for dump in dumps:
            if wanted in (dump.name, dump.label) or (wanted.isdigit() and int(wanted) == dump.number):
                return dump.path.read_text()
        raise InspectError(f"no pass {pass_name!r} in {self.directory}; passes: "
                           + ", ".join(d.label for d in dumps))

    def graph(self, make_constant: Callable[[str, TensorType], torch.Tensor]) -> Graph:
        """The graph the kernels were partitioned from (the last pass's IR), its
        constants made by `make_constant(name, type)` (the dump holds no weights)."""
        from ..ir.text import parse

        text = self.ir_after()
        constants = {name: make_constant(name, parse_type(type_text))
                     for name, type_text in _CONSTANT_LINE.findall(text)}
        return parse(text, constants)

    def target_name(self) -> str:
        """The target the kernels were built for, read off their source files."""
        names = {entry.target_name for entry in self._kernels} - {None}
        if len(names) != 1:
            raise InspectError(f"cannot tell which target built the kernels in {self.directory} "
                               f"(source files say {sorted(names) or 'nothing'}); pass --target")
        return names.pop()


def _kernel_entry(name: str, entry: dict) -> KernelEntry:
    launches = tuple(Launch(tuple(launch["nodes"]), launch.get("cache_layer")) for launch in entry.get("launches", ()))
    source = entry.get("source", "")
    if source.endswith("."):
        source = ""  # a fallback kernel (run by torch): an empty file named `<name>.`
    return KernelEntry(name, tuple(entry.get("ops", ())), tuple(entry.get("params", ())), source,
                       tuple(entry.get("extra_sources", ())), launches)


def close_matches(name: str, names: list) -> str:
    """'did you mean a, b?' over names containing `name` and names difflib finds close."""
    import difflib

    containing = [n for n in names if name.lower() in n.lower()]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    matches = list(dict.fromkeys(containing + close))[:5]
    if matches:
        return "close matches: " + ", ".join(matches)
    return "kernels: " + ", ".join(names[:8]) + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")
