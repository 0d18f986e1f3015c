"""The kernel cache: one kernel per distinct group, in memory and on disk.

The key hashes the group's IR (weights are parameters, symbols canonical), the target,
the versions of fuselm, torch and the target's compiler, and the source of the target's
emitters (an edited emitter must not reuse old kernels), so identical layers share
a kernel and a second compile of the same model does no code generation at all: the
backend reloads what it wrote (`codegen_runs` counts real generations; tests read it).

A backend may register settings that change what it generates but not its sources
(`register_key_setting`: the cpu backend's LLVM `-mcpu`); their current values are part
of the key too, so kernels built for a generic x86-64 and for this CPU never share one.

The target is a `fuselm.target.Target` (its `name`, `backend` package and `compiler`
distribution are what the cache reads). A backend is a module with `emit(group, directory) -> Kernel`, which generates and
builds a kernel and writes whatever it needs to reload it into `directory`, and
`load(group, directory) -> Kernel`, which reloads it without generating anything.

An entry is the directory `<root>/<target>/<key>`: what `emit` wrote, the group's IR
(`group.ir`) and the marker `kernel.json`, a `fuselm.integrity` manifest (the sha256 of
every file and the versions that built them, plus the kernel's name and ops). The disk
is not trusted: a hit is verified against its marker before the backend loads it (a
truncated .so is a SIGBUS when loaded; another kernel's .so loads and computes something
else), and an entry that fails the check, or that the backend cannot load, is rebuilt
with a `KernelCacheWarning`. Verifying hashes the entry's files again: 1-2 ms for a
cpu entry (~350 KB, mostly its .ll and .s), ~20 ms for the 14 kernels of a 2-layer Llama.

Processes may share a cache directory. A kernel is generated into a staging directory
of its own (removed whatever happens) and renamed into place in one step, so an entry is
complete or absent. A process that loses the race to install an entry uses the winner's
if it verifies and loads, and else replaces it. An entry is renamed away before it is
deleted, so no process loads from a directory while it is being deleted.
"""
from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import os
import shutil
import uuid
import warnings
from collections import Counter
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from ..errors import FuselmError, KernelCacheWarning
from ..integrity import verify_manifest, write_manifest
from ..ir.graph import Graph
from .kernel import Kernel, group_key

MARKER = "kernel.json"  # the entry's manifest, written last
INSTALL_ATTEMPTS = 4  # renames lost to other processes' entries that would not load, at most

# "codegen_runs": kernels generated; "disk_hits": reloaded from disk; "memory_hits": reused;
# "rebuilt": entries on disk found corrupt (or not loadable), moved away and generated again.
stats: Counter = Counter()
program_stats: Counter = Counter()  # the same, for the cpu program cache (whole graphs)
_key_settings: dict = {}  # backend package -> a function giving its current settings as "name=value"


def register_key_setting(backend: str, setting: Callable[[], str]) -> None:
    """Make `setting()` (e.g. "mcpu=znver3"), read at every key, part of `backend`'s keys."""
    _key_settings[backend] = setting


def program_cache(target, root: Optional[Path] = None) -> "KernelCache":
    """The cache of whole-graph programs (the target backend's PROGRAMS), beside `root`'s
    kernels in `<root>/<target>-programs`, counted in `program_stats`."""
    backend = importlib.import_module(target.backend)
    return KernelCache(target, root, backend.PROGRAMS, folder=f"{target.name}-programs", counts=program_stats)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FUSELM_CACHE", "~/.cache/fuselm")).expanduser() / "kernels"


@lru_cache(maxsize=None)
def versions(backend: str, compiler: str) -> tuple:
    """("fuselm=0.1.0", "torch=...", "<compiler>=...", "emitters=<digest>"): part of every key."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "none"

    return tuple(f"{d}={version(d)}" for d in ("fuselm", "torch", compiler)) + (f"emitters={emitter_digest(backend)}",)


def emitter_digest(backend: str) -> str:
    """A hash of the sources that decide what a kernel or program is: the backend
    package's emitters (found without importing the compiler), the shared codegen
    modules, and partition, which cuts a program into its kernels."""
    spec = importlib.util.find_spec(backend)
    codegen = Path(__file__).resolve().parent
    paths = sorted(Path(spec.submodule_search_locations[0]).glob("*.py")) + sorted(codegen.glob("*.py"))
    digest = hashlib.sha256()
    for path in paths + [codegen.parent / "passes" / "partition.py"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


class KernelCache:
    """`backend`, `folder` and `counts` default to the target's kernel backend,
    `<root>/<target>` and `stats`; the cpu program cache is this cache with the program
    backend (codegen/tvm/__init__.py's `PROGRAMS`, whose `key` hashes a whole graph),
    `<root>/<target>-programs` and `program_stats`."""

    def __init__(self, target, root: Optional[Path] = None, backend=None, folder: Optional[str] = None,
                 counts: Optional[Counter] = None):
        self.target = target
        self.stats = stats if counts is None else counts
        self.backend = backend if backend is not None else importlib.import_module(target.backend)
        self.root = Path(root) if root is not None else default_cache_dir()
        self.folder = self.root / (folder or target.name)
        for directory in (self.root, self.folder):
            if directory.exists() and not directory.is_dir():
                raise FuselmError(f"kernel cache directory {directory} is not a directory")
        self.memory: dict = {}

    @property
    def versions(self) -> tuple:
        return versions(self.target.backend, self.target.compiler)

    @property
    def manifest_versions(self) -> dict:
        """The versions as entries' markers record them: {"torch": "2.13.0", ...}."""
        return dict(v.split("=", 1) for v in self.versions)

    def key(self, group: Graph) -> str:
        key = getattr(self.backend, "key", group_key)
        setting = _key_settings.get(self.target.backend)
        return key(group, self.target.name, self.versions + ((setting(),) if setting else ()))

    def entry_directory(self, key: str) -> Path:
        """Where the entry of `key` is on disk (what `emit` wrote, once generated or reloaded)."""
        return self._entry(key)

    def holds(self, key: str) -> bool:
        """Whether `kernel` finds this key without generating: in memory, or an entry on
        disk with its marker (a corrupt entry is found to be so only when loaded)."""
        return key in self.memory or (self._entry(key) / MARKER).exists()

    def _entry(self, key: str) -> Path:
        return self.folder / key

    def kernel(self, group: Graph) -> Kernel:
        key = self.key(group)
        if key in self.memory:
            self.stats["memory_hits"] += 1
            return self.memory[key]
        entry = self._entry(key)
        kernel = self._reload(group, entry) if entry.exists() else None
        if kernel is None:
            kernel = self._generate(group, entry)
        self.memory[key] = kernel
        return kernel

    def _reload(self, group: Graph, entry: Path) -> Optional[Kernel]:
        """The kernel of an entry on disk; None once an entry that fails is moved away."""
        try:
            kernel = self._load_verified(group, entry)
        except Exception as error:  # whatever a bad entry makes the backend raise: rebuild it
            _delete(self._discard(entry, error, "rebuilding it"))
            return None
        self.stats["disk_hits"] += 1
        return kernel

    def _load_verified(self, group: Graph, entry: Path) -> Kernel:
        """The entry's kernel, loaded only once its files match its marker."""
        verify_manifest(entry, MARKER, self.manifest_versions)
        return self.backend.load(group, entry)

    def _discard(self, entry: Path, error: Exception, action: str) -> Optional[Path]:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        warnings.warn(f"fuselm: kernel cache entry {entry} is corrupt ({reason}); {action}", KernelCacheWarning)
        self.stats["rebuilt"] += 1
        return _move_aside(entry)

    def _generate(self, group: Graph, entry: Path) -> Kernel:
        staging = _unique_sibling(entry, "tmp")
        try:
            staging.mkdir(parents=True)
            kernel = self.backend.emit(group, staging)
            (staging / "group.ir").write_text(str(group))
            write_manifest(staging, MARKER, self.manifest_versions, {"name": kernel.name, "ops": list(kernel.ops)})
            self.stats["codegen_runs"] += 1
            return self._install(group, staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone once renamed into place

    def _install(self, group: Graph, staging: Path, entry: Path) -> Kernel:
        """Rename `staging` into place as `entry` and load it from there (so source paths
        point into the cache). If another process installed the entry first, use theirs
        when it verifies and loads, else move theirs away and install ours."""
        moved_away = []
        try:
            for _ in range(INSTALL_ATTEMPTS):
                if _rename_unless_taken(staging, entry):
                    return self.backend.load(group, entry)
                try:
                    return self._load_verified(group, entry)
                except Exception as error:
                    if entry.exists():  # else another process moved it away meanwhile
                        moved_away.append(self._discard(entry, error, "replacing it"))
            raise FuselmError(f"could not install kernel cache entry {entry}: other processes kept "
                              f"installing entries that do not load there")
        finally:
            for path in moved_away:
                _delete(path)


def _unique_sibling(entry: Path, kind: str) -> Path:
    """A name next to `entry` that no other process or thread will pick (same file system,
    so a rename to or from it is atomic)."""
    return entry.with_name(f"{entry.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _rename_unless_taken(source: Path, destination: Path) -> bool:
    """Rename the directory `source` to `destination`; False if that is already there."""
    try:
        os.rename(source, destination)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def _move_aside(entry: Path) -> Optional[Path]:
    """Rename `entry` to a trash name of its own; None if another process moved it first."""
    trash = _unique_sibling(entry, "trash")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return None
    return trash


def _delete(path: Optional[Path]) -> None:
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
