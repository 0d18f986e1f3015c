"""Integrity of a directory of files: a manifest, written once the files are complete,
records the sha256 of every file and the versions that built them, and is checked before
anything reads the files, so that a damaged or stale directory is refused with a reason
instead of crashing (a truncated shared library is a SIGBUS when loaded) or computing the
wrong thing (another kernel's library loads fine).

The manifest is a JSON file inside the directory it describes (the kernel cache's
`kernel.json`, an ahead-of-time artifact's `manifest.json`):

    {
      "format": 1,
      "versions": {"fuselm": "0.1.0", "torch": "2.13.0", "apache-tvm": "0.27.0"},
      "files": {"gemm_k64_n96.so": "<sha256 hex>", "weights/w0.bin": "<sha256 hex>"},
      "name": "gemm_k64_n96"            <- the writer's own keys, here a kernel's name
    }

`files` lists every file under the directory by its path relative to it ("/"-separated,
sorted), except the manifest itself and `__pycache__` folders: Python writes bytecode
there when it imports a module from the directory, and rewrites it at will. A directory
verifies only if its manifest parses, its versions are the running ones, and its files
are exactly the listed ones, each with its digest; `verify_manifest` otherwise raises an
`IntegrityError` naming the file and the problem. This guards against accidents (a
copy cut short, a disk error, a file from elsewhere, a stale build), not against someone
who rewrites the manifest too.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import IntegrityError

__all__ = ["IntegrityError", "digest_files", "file_digest", "read_manifest", "verify_manifest", "write_manifest"]

FORMAT = 1
RESERVED = ("format", "versions", "files")
DERIVED_DIRECTORIES = frozenset({"__pycache__"})
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks (a file may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(directory: Path, exclude: frozenset = frozenset()) -> dict:
    """{relative path: sha256 hex} of every file under `directory` (but `exclude`, paths
    relative to it, and `__pycache__` folders), sorted by path."""
    directory = Path(directory)
    digests = {}
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = [name for name in subfolders if name not in DERIVED_DIRECTORIES]
        for name in files:
            relative = Path(folder, name).relative_to(directory).as_posix()
            if relative not in exclude:
                digests[relative] = file_digest(Path(folder, name))
    return dict(sorted(digests.items()))


def write_manifest(directory: Path, name: str, versions: dict, extra: dict = None) -> dict:
    """Write `directory/name`, the manifest of every file in `directory` and the
    `versions` that built them, plus the caller's `extra` keys; returns it. Call it last,
    on a directory nobody reads yet (stage it, then rename it into place)."""
    clashing = sorted(set(extra or {}) & set(RESERVED))
    if clashing:
        raise ValueError(f"manifest keys {clashing} are the format's own; name the extra keys otherwise")
    manifest = {"format": FORMAT, "versions": dict(versions),
                "files": digest_files(directory, frozenset({name})), **(extra or {})}
    (Path(directory) / name).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_manifest(directory: Path, name: str, versions: dict) -> dict:
    """The manifest `directory/name`, once the directory is shown to match it and to be
    built with `versions` (the running ones); raises IntegrityError otherwise."""
    directory = Path(directory)
    manifest = read_manifest(directory / name)
    _check_versions(directory / name, manifest["versions"], versions)
    _check_files(directory, manifest["files"], name)
    return manifest


def read_manifest(path: Path) -> dict:
    """The manifest at `path`, checked to have the format's keys (not the files)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing manifest") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise IntegrityError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path}: not a manifest of format {FORMAT}")
    if not _is_str_dict(manifest.get("versions")) or not _is_str_dict(manifest.get("files")):
        raise IntegrityError(f"{path}: invalid manifest (its 'versions' and 'files' must map names to strings)")
    return manifest


def _is_str_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _check_versions(path: Path, built: dict, running: dict) -> None:
    differing = [key for key, version in running.items() if built.get(key) != version]
    if differing:
        was = ", ".join(f"{key}={built.get(key, 'unknown')}" for key in differing)
        now = ", ".join(f"{key}={running[key]}" for key in differing)
        raise IntegrityError(f"{path}: built with {was}, running {now}")


def _check_files(directory: Path, listed: dict, name: str) -> None:
    try:
        found = digest_files(directory, frozenset({name}))
    except OSError as error:
        raise IntegrityError(f"{directory}: unreadable ({error})") from None
    problems = [f"{directory / path}: missing" for path in listed if path not in found]
    problems += [f"{directory / path}: sha256 {found[path][:16]}... differs from the manifest's {digest[:16]}..."
                 for path, digest in listed.items() if path in found and found[path] != digest]
    problems += [f"{directory / path}: unexpected file (not in the manifest)" for path in found if path not in listed]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise IntegrityError(problems[0] + more)
