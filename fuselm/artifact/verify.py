"""Checking an artifact before anything of it is loaded: that it is one, of a format this
fuselm reads, built by the same fuselm, torch and compiler versions, for a target and a
machine this one is, and that every file is the one its manifest lists (sha256).

The sha256 of the files (~0.4 s for SmolLM2's 540 MB of weights) are computed on a
thread while the machine is checked, which imports the target's backend (TVM takes
seconds): nothing of the artifact is read but its manifest until every file matches.

Each refusal is an ArtifactError naming the directory, the problem and, where building
the artifact again fixes it, the `fuselm build` command that does.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

from ..codegen.cache import versions
from ..errors import ArtifactError, IntegrityError
from ..integrity import read_manifest, verify_manifest
from ..target import TARGETS, Target, get_target
from .format import FORMAT, MANIFEST, MANIFEST_KEYS, rebuild_command
from .machine import check_machine


def running_versions(target: Target) -> dict:
    """The versions an artifact for `target` must have been built with: fuselm, torch, the
    target's compiler (apache-tvm or triton) and the digest of its emitters' sources."""
    return dict(v.split("=", 1) for v in versions(target.backend, target.compiler))


def verify(directory: Path, target: Union[None, str, Target] = None) -> dict:
    """The manifest of the artifact at `directory`, once it is shown loadable here for
    `target` (None or "auto": the artifact's own); raises ArtifactError otherwise."""
    manifest = read(directory)
    rebuild = rebuild_command(manifest, directory)
    built_for = get_target(manifest["target"])
    asked = built_for.name if target in (None, "auto") else get_target(target).name
    if asked != built_for.name:
        for_asked = rebuild.replace(f"--target {built_for.name}", f"--target {asked}")
        raise ArtifactError(f"{directory} was built for target {built_for.name}, not {asked}; build one for {asked}: "
                            f"`{for_asked}`")
    running = running_versions(built_for)
    differing = [name for name, version in running.items() if manifest["versions"].get(name) != version]
    if differing:
        was = ", ".join(f"{name}={manifest['versions'].get(name, 'unknown')}" for name in differing)
        now = ", ".join(f"{name}={running[name]}" for name in differing)
        raise ArtifactError(f"{directory} was built with {was}; this is {now}. Rebuild it: `{rebuild}`")
    with ThreadPoolExecutor(max_workers=1) as pool:  # hashing releases the GIL: it overlaps the checks
        files = pool.submit(verify_manifest, directory, MANIFEST, running)
        check_machine(manifest, built_for, str(directory), rebuild)  # imports the backend (TVM: seconds)
        try:
            files.result()
        except IntegrityError as error:
            raise ArtifactError(f"{error}: the artifact changed after it was built (a file edited, truncated, "
                                f"added or lost); rebuild it: `{rebuild}`") from None
    return manifest


def read(directory: Path) -> dict:
    """The artifact's manifest, checked to be one of this format (not its files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    if not (directory / MANIFEST).is_file():
        raise ArtifactError(f"{directory} is not a fuselm artifact (it has no {MANIFEST}); build one with "
                            f"`fuselm build MODEL -o {directory}`")
    try:
        manifest = read_manifest(directory / MANIFEST)
    except IntegrityError as error:
        raise ArtifactError(f"{error}; rebuild it: `fuselm build MODEL -o {directory}`") from None
    found = manifest.get("artifact_format")
    if found != FORMAT:
        raise ArtifactError(f"{directory / MANIFEST}: artifact format {found!r}, but this fuselm reads format "
                            f"{FORMAT}; rebuild it: `{rebuild_command(manifest, directory)}`")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    wrong = [key for key, check in FIELD_CHECKS.items() if key in manifest and not check(manifest[key])]
    if missing or wrong or manifest["target"] not in TARGETS:
        problem = (f"missing {missing}" if missing else f"{', '.join(f'{k}={manifest[k]!r}' for k in wrong)} "
                   "not what an artifact records" if wrong else f"unknown target {manifest['target']!r}")
        raise ArtifactError(f"{directory / MANIFEST}: an invalid manifest ({problem}); "
                            f"rebuild it: `{rebuild_command(manifest, directory)}`")
    return manifest


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# What each manifest field must be (a manifest is not covered by its own sha256: an edited
# one must be refused by name, not fail somewhere in the loader).
FIELD_CHECKS = {
    "model": lambda v: isinstance(v, dict) and isinstance(v.get("model_type"), str) and isinstance(v.get("config"), dict),
    "target": lambda v: isinstance(v, str),
    "machine": lambda v: isinstance(v, dict),
    "dtype": lambda v: v in ("float32", "float16", "bfloat16", "float64"),
    "max_model_len": lambda v: v is None or _positive_int(v),  # None: an ONNX graph (no context length)
    "block_size": lambda v: v is None or _positive_int(v),
    "signature": lambda v: isinstance(v, dict),
    "output": lambda v: isinstance(v, dict),
    "kernels": lambda v: isinstance(v, list) and all(isinstance(k, dict) and isinstance(k.get("key"), str)
                                                     for k in v),
    "program": lambda v: v is None or v == "program",
    "tokenizer": lambda v: isinstance(v, bool),
    "quantize": lambda v: v is None or isinstance(v, str),
    "sentence": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("pooling"), list)
                                        and isinstance(v.get("normalize"), bool)),
}
