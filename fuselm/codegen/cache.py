"""The kernel cache: one kernel per distinct group, in memory and on disk.

The key hashes the group's IR (weights are parameters, symbols canonical), the target,
the versions of fuselm, torch and the target's compiler, and the source of the target's
emitters (an edited emitter must not reuse old kernels), so identical layers share
a kernel and a second compile of the same model does no code generation at all: the
backend reloads what it wrote (`codegen_runs` counts real generations; tests read it).

The target is a `fuselm.target.Target` (its `name`, `backend` package and `compiler`
distribution are what the cache reads). A backend is a module with `emit(group, directory) -> Kernel`, which generates and
builds a kernel and writes whatever it needs to reload it into `directory`, and
`load(group, directory) -> Kernel`, which reloads it without generating anything.
An entry is used only once its `kernel.json` marker is written, after everything else.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from collections import Counter
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Optional

from ..ir.graph import Graph
from .kernel import Kernel, group_key

# "codegen_runs": kernels generated; "disk_hits": reloaded from disk; "memory_hits": reused.
stats: Counter = Counter()


def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSELM_CACHE", "~/.cache/fuselm")).expanduser() / "kernels"


@lru_cache(maxsize=None)
def versions(backend: str, compiler: str) -> tuple:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "none"

    return tuple(f"{d}={version(d)}" for d in ("fuselm", "torch", compiler)) + (emitter_digest(backend),)


def emitter_digest(backend: str) -> str:
    """A hash of a backend package's emitter sources (found without importing the compiler)."""
    spec = importlib.util.find_spec(backend)
    digest = hashlib.sha256()
    for path in sorted(Path(spec.submodule_search_locations[0]).glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


class KernelCache:
    def __init__(self, target, root: Optional[Path] = None):
        self.target = target
        self.backend = importlib.import_module(target.backend)
        self.root = Path(root) if root is not None else default_cache_dir()
        self.memory: dict = {}

    def kernel(self, group: Graph) -> Kernel:
        key = group_key(group, self.target.name, versions(self.target.backend, self.target.compiler))
        if key in self.memory:
            stats["memory_hits"] += 1
            return self.memory[key]
        entry = self.root / self.target.name / key
        if (entry / "kernel.json").exists():
            kernel = self.backend.load(group, entry)
            stats["disk_hits"] += 1
        else:
            kernel = self._generate(group, entry)
        self.memory[key] = kernel
        return kernel

    def _generate(self, group: Graph, entry: Path) -> Kernel:
        staging = entry.with_name(entry.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        kernel = self.backend.emit(group, staging)
        (staging / "group.ir").write_text(str(group))
        (staging / "kernel.json").write_text(json.dumps({"name": kernel.name, "ops": list(kernel.ops)}))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
        stats["codegen_runs"] += 1
        # reload from the final place, so source paths point into the cache entry
        return self.backend.load(group, entry)
