"""`fuselm inspect` on an ahead-of-time artifact (fuselm/artifact/format.py's layout).

An artifact holds the graph after the last pass (graph.ir), a copy of each kernel's
cache entry (kernels/<key>/: its source, LLVM IR and assembly on cpu) and the manifest
listing them. Its kernel table is built as the loader builds its steps: graph.ir parsed
(placeholder constants: listing reads no weights), partitioned, and each group matched to
its kernel by the kernel cache's key. `--profile` runs the artifact's own kernels, loaded
only after the manifest's checks pass (a damaged shared library is a crash when loaded).
It holds no IR per pass: `--ir` shows graph.ir alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..ir.graph import Graph
from ..ir.types import TensorType
from .source import DumpSource, InspectError, KernelEntry, Launch


class ArtifactSource(DumpSource):
    """A directory written by `fuselm build` (kernel lookups as a dump's: see DumpSource)."""

    def __init__(self, directory: Path):
        from ..artifact.format import GRAPH

        from ..artifact.verify import read, running_versions
        from ..errors import ArtifactError, one_line
        from ..target import get_target

        self.directory = directory
        try:
            self.manifest = read(directory)  # a manifest of this format, its fields checked
            self._text = (directory / GRAPH).read_text()
        except (OSError, ValueError, ArtifactError) as error:
            raise InspectError(f"{directory} cannot be read as a fuselm artifact: {one_line(error)}") from None
        running = running_versions(get_target(self.manifest["target"]))
        if any(self.manifest["versions"].get(name) != version for name, version in running.items()):
            # its kernels are keyed by the versions that built them: none would be found
            raise InspectError(f"{directory} was built by other fuselm code (versions {self.manifest['versions']}; "
                               f"this is {running}); rebuild it with `fuselm build`")
        self._kernels = self._entries()

    def _entries(self) -> list:
        """One KernelEntry per kernel of the manifest, with its launches in the graph."""
        from ..ir.text import format_node, value_names
        from ..passes.partition import KernelGroup, partition

        graph = self.graph(lambda name, type: _meta(type))
        names = value_names(graph)
        listed = {kernel["key"]: kernel for kernel in self.manifest.get("kernels", [])}
        launches: dict = {}
        params: dict = {}
        for group in (s for s in partition(graph) if isinstance(s, KernelGroup)):
            key = self._key(group.graph)
            if key not in listed:
                raise InspectError(f"{self.directory}: graph.ir needs a kernel for [{' '.join(group.ops)}] that the "
                                   "manifest does not list (a damaged artifact?)")
            launches.setdefault(key, []).append(Launch(tuple(format_node(n, names) for n in group.nodes),
                                                       group.cache_layer))
            params.setdefault(key, tuple(str(v.type) for v in group.graph.inputs))
        entries = []
        for key, runs in launches.items():
            kernel = listed[key]
            source = kernel.get("source") or ""
            extras = tuple(str(Path(source).with_suffix(ext)) for ext in (".ll", ".s")
                           if source and (self.directory / source).with_suffix(ext).is_file())
            entries.append(KernelEntry(kernel["name"], tuple(kernel["ops"]), params[key], source, extras, tuple(runs)))
        return entries

    def _key(self, group: Graph) -> str:
        from ..artifact.machine import loading_settings
        from ..codegen.cache import KernelCache
        from ..target import get_target

        with loading_settings(self.manifest["machine"]):
            return KernelCache(get_target(self.target_name()), self.directory / "kernels").key(group)

    def passes(self) -> list:
        return []

    def ir_after(self, pass_name: Optional[str] = None) -> str:
        if pass_name is not None:
            raise InspectError(f"{self.directory} is an artifact: it holds the IR after the last pass only "
                               "(inspect it without a pass name); compile with dump_dir=DIR for each pass's IR")
        return self._text

    def graph(self, make_constant: Callable[[str, TensorType], torch.Tensor]) -> Graph:
        from ..ir.text import parse
        from .source import _CONSTANT_LINE, parse_type

        constants = {name: make_constant(name, parse_type(text)) for name, text in _CONSTANT_LINE.findall(self._text)}
        return parse(self._text, constants)

    def target_name(self) -> str:
        return self.manifest["target"]

    def load_kernels(self, groups: list, target) -> dict:
        """{id(group): Kernel}: the artifact's own kernels, once its manifest checks pass."""
        from ..artifact.machine import loading_settings
        from ..artifact.verify import verify
        from ..codegen.cache import KernelCache
        from ..errors import ArtifactError

        try:
            verify(self.directory, target)
        except ArtifactError as error:
            raise InspectError(str(error)) from None
        kernels: dict = {}
        loaded: dict = {}
        with loading_settings(self.manifest["machine"]), target.importing():
            cache = KernelCache(target, self.directory / "kernels")
            for group in groups:
                key = cache.key(group.graph)
                if key not in loaded:
                    loaded[key] = cache.backend.load(group.graph, self.directory / "kernels" / key)
                kernels[id(group)] = loaded[key]
        return kernels


def _meta(ir_type: TensorType) -> torch.Tensor:
    """A stand-in constant for listing: its dtype and static shape, no memory."""
    return torch.empty([d if isinstance(d, int) else 1 for d in ir_type.shape], dtype=ir_type.torch_dtype,
                       device="meta")
