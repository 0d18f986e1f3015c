"""Writing an artifact directory (layout in format.py): each part by its own function,
all into a staging directory next to the destination, renamed into place once complete.

An interrupted or failed build therefore leaves nothing at the destination (a killed
process leaves its `.NAME.staging-*` folder beside it, never a half artifact in its
place). The destination may be absent, an empty directory, or an artifact, which is
replaced; any other existing path is refused before anything is built.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

from ..codegen.cache import MARKER, KernelCache, program_cache
from ..errors import ArtifactError, IntegrityError
from ..integrity import verify_manifest, write_manifest
from ..ir.text import print_graph
from ..passes.partition import KernelGroup
from ..runtime.compiled_graph import CompiledGraph
from ..runtime.executor import FALLBACK_PREFIX
from .codec import encode_output, encode_signature
from .format import FORMAT, GRAPH, KERNELS, MANIFEST, PROGRAM, TOKENIZER, WEIGHTS, is_artifact
from .weights import write_weights


def check_destination(directory: Path) -> bool:
    """Whether `directory` holds an artifact that a build will replace; ArtifactError if it
    is something a build must not replace (a file, or a directory with other things)."""
    inside = next((parent for parent in directory.parents if is_artifact(parent)), None)
    if inside is not None:
        raise ArtifactError(f"{directory} is inside the artifact {inside}: a build there would change that artifact; "
                            "choose an -o outside it")
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ArtifactError(f"{directory} exists and is not a directory: refusing to replace it; choose another -o")
    if directory.is_dir() and any(directory.iterdir()):
        if not is_artifact(directory):
            raise ArtifactError(f"{directory} exists, is not empty and is not a fuselm artifact (it has no "
                                f"{MANIFEST}): refusing to replace it; choose another -o, or empty it first")
        return True
    return False


@contextlib.contextmanager
def staged(directory: Path):
    """A staging directory for an artifact at `directory`; renamed into place when the
    block ends without an error, removed in any case."""
    directory = Path(directory).absolute()
    check_destination(directory)
    staging = _sibling(directory, "staging")
    staging.mkdir(parents=True)
    try:
        yield staging
        _install(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once installed


def _sibling(directory: Path, kind: str) -> Path:
    """A hidden name next to `directory` (same file system: renames are atomic), its own."""
    return directory.with_name(f".{directory.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _install(staging: Path, directory: Path) -> None:
    check_destination(directory)  # again: something may have appeared there meanwhile
    replaced = None
    if directory.exists():
        replaced = _sibling(directory, "replaced")
        os.rename(directory, replaced)
    try:
        os.rename(staging, directory)
    except BaseException:
        if replaced is not None:
            os.rename(replaced, directory)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def write_code(compiled: CompiledGraph, cache: KernelCache, directory: Path) -> dict:
    """The compiled code of the artifact: each distinct kernel's cache entry, copied into
    `directory/kernels/<key>/`, and the graph's program (cpu) into `directory/program/`,
    each checked against the entry's own manifest. Returns the manifest's "kernels" (a
    list of {"key", "name", "ops", "launches", "source"}, in first-launch order) and
    "program" (the program's folder, or None)."""
    program = None
    if compiled.program is not None:
        programs = program_cache(compiled.target, cache.root)
        _copy_entry(programs, programs.key(compiled.graph), directory / PROGRAM)
        program = PROGRAM
    return {"kernels": _copy_kernels(compiled, cache, directory), "program": program}


def _copy_entry(cache: KernelCache, key: str, copy: Path) -> dict:
    """A cache entry copied to `copy`, verified there; its marker."""
    shutil.copytree(cache.entry_directory(key), copy, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        return verify_manifest(copy, MARKER, cache.manifest_versions)
    except IntegrityError as error:
        raise ArtifactError(f"the kernel cache entry {cache.entry_directory(key)} changed while it was copied "
                            f"({error}); build again") from None


def _copy_kernels(compiled: CompiledGraph, cache: KernelCache, directory: Path) -> list:
    """Each distinct kernel's entry; a fallback (a group the IR reference runs: `aten`
    ops, or ops no emitter takes) is listed with "fallback": true and has no files."""
    sources = {info.name: info.source_path for info in compiled.kernels}
    run_by = {id(group): kernel for group, kernel in compiled.launches}
    launches = Counter()
    kernels: dict = {}
    for group in (step for step in compiled.steps if isinstance(step, KernelGroup)):
        key = cache.key(group.graph)
        launches[key] += 1
        if key in kernels:
            continue
        if run_by[id(group)].name.startswith(FALLBACK_PREFIX):
            kernels[key] = {"key": key, "name": run_by[id(group)].name, "ops": list(group.ops), "source": None,
                            "fallback": True}
            continue
        marker = _copy_entry(cache, key, directory / KERNELS / key)
        source = sources.get(marker["name"])
        kernels[key] = {"key": key, "name": marker["name"], "ops": marker["ops"],
                        "source": f"{KERNELS}/{key}/{Path(source).name}" if source else None}
    return [{**kernel, "launches": launches[key]} for key, kernel in kernels.items()]


def write_graph(compiled: CompiledGraph, directory: Path) -> None:
    (directory / GRAPH).write_text(print_graph(compiled.graph))


def write_constants(compiled: CompiledGraph, directory: Path) -> None:
    """The graph's constants (weights, in the layouts the kernels read) as one file."""
    write_weights(directory / WEIGHTS, compiled.graph.constants)


def write_tokenizer(tokenizer, directory: Path) -> bool:
    """The tokenizer's files, if the model has a tokenizer; whether it has."""
    if tokenizer is None:
        return False
    tokenizer.save(directory / TOKENIZER)
    return True


def describe(compiled: CompiledGraph, *, source: str, config, machine: dict, dtype, max_model_len: int,
             block_size: Optional[int]) -> dict:
    """What the manifest says of the model, its target and how it is called
    (format.MANIFEST_KEYS but "kernels" and "tokenizer", which writing those adds);
    ArtifactError, before anything is written, for what an artifact cannot record."""
    return {
        "artifact_format": FORMAT,
        "model": {"source": source, "model_type": config.model_type, "config": dataclasses.asdict(config)},
        "target": compiled.target.name,
        "machine": machine,
        "dtype": str(dtype).removeprefix("torch."),
        "max_model_len": max_model_len,
        "block_size": block_size,
        "signature": encode_signature(compiled.signature, compiled.graph.inputs),
        "output": encode_output(compiled.output),
    }


def write_artifact_manifest(directory: Path, versions: dict, description: dict) -> dict:
    """manifest.json, written last: the sha256 of every file written before it, the
    versions that built them, and `description` (with "kernels" and "tokenizer")."""
    return write_manifest(directory, MANIFEST, versions, description)
