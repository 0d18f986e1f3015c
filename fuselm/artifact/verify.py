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
    if missing or manifest["target"] not in TARGETS:
        raise ArtifactError(f"{directory / MANIFEST}: an invalid manifest (missing {missing or 'a known target'}); "
                            f"rebuild it: `{rebuild_command(manifest, directory)}`")
    return manifest
