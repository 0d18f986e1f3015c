"""The kernel cache on disk heals itself: an entry whose files were damaged, swapped or
stale is rebuilt with one warning instead of crashing or computing the wrong thing, a
failed generation leaves nothing behind, and processes sharing a cache directory never
break each other's entries. Also `fuselm.integrity`, which the checks go through.

Loading a truncated .so is a SIGBUS, so that compile runs in a fresh subprocess (a crash
fails the test instead of killing pytest), as do the two processes racing to fill a cache.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fuselm
from fuselm.codegen import cache as kernel_cache
from fuselm.errors import IntegrityError, KernelCacheWarning
from fuselm.integrity import digest_files, verify_manifest, write_manifest
from fuselm.target import get_target

TESTS = Path(__file__).parent
KERNELS = 3  # in TinyMLP: the gemm + gelu, the plain gemm (same shapes), the layer norm
ROUNDS = 2  # of two processes racing to fill an empty cache


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 16)
        self.down = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.down(F.gelu(self.up(x))))


def compile_and_check(cache_dir) -> dict:
    """Compile TinyMLP with `cache_dir` and run it against eager torch: the largest error,
    the cache's stats and the KernelCacheWarnings it raised (also run in subprocesses)."""
    torch.manual_seed(0)
    model, x = TinyMLP().eval(), torch.randn(4, 16)
    kernel_cache.stats.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = fuselm.compile(model, (x,), target="cpu", cache_dir=str(cache_dir))(x)
    with torch.no_grad():
        error = (output - model(x)).abs().max().item()
    return {"error": error, "stats": dict(kernel_cache.stats),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, KernelCacheWarning)]}


def in_subprocess(script: str, *args) -> subprocess.Popen:
    """Start `script` in a fresh Python that can import this module as `kc`."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_kernel_cache as kc\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results_of(*processes: subprocess.Popen, timeout: int = 240) -> list:
    """The JSON each subprocess printed last; a crash (SIGBUS, ...) fails the test."""
    try:
        outputs = [(p, *p.communicate(timeout=timeout)) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, _, stderr in outputs:
        assert process.returncode == 0, f"a subprocess died (exit status {process.returncode}):\n{stderr[-3000:]}"
    return [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in outputs]


def entry_of(root: Path, kernel: str) -> Path:
    """The cache entry of TinyMLP's "gelu gemm", "plain gemm" or "norm" kernel."""
    named = {json.loads((e / "kernel.json").read_text())["name"]: e for e in (root / "cpu").iterdir()}
    is_kernel = {"gelu gemm": lambda name: name.startswith("gemm") and "gelu" in name,
                 "plain gemm": lambda name: name.startswith("gemm") and "gelu" not in name,
                 "norm": lambda name: "norm" in name}[kernel]
    [found] = [path for name, path in named.items() if is_kernel(name)]
    return found


def assert_healthy(root: Path) -> None:
    """Every entry verifies, and no staging or trash directory is left."""
    names = sorted(path.name for path in (root / "cpu").iterdir())
    assert len(names) == KERNELS and all(len(name) == 16 for name in names), names
    versions = kernel_cache.KernelCache(get_target("cpu")).manifest_versions
    for name in names:
        verify_manifest(root / "cpu" / name, "kernel.json", versions)


def assert_rebuilt_once(result: dict, entry: Path) -> None:
    assert result["error"] < 1e-5
    assert len(result["warnings"]) == 1 and str(entry) in result["warnings"][0], result["warnings"]
    assert "is corrupt" in result["warnings"][0] and "rebuilding it" in result["warnings"][0]
    assert result["stats"] == {"disk_hits": KERNELS - 1, "rebuilt": 1, "codegen_runs": 1}


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("filled")
    assert compile_and_check(root)["stats"] == {"codegen_runs": KERNELS}
    return root


@pytest.fixture
def cache_copy(filled_cache, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(filled_cache, root)
    return root


# -- damaged entries are rebuilt --------------------------------------------------------


def library(entry: Path) -> Path:
    return next(entry.glob("*.so"))


def replace_with_other_kernels_library(gelu_gemm: Path, root: Path) -> None:
    """The plain gemm's library has the same functions and shapes: it loads, and computes
    the gemm without the gelu."""
    library(gelu_gemm).write_bytes(library(entry_of(root, "plain gemm")).read_bytes())


def set_marker_version(entry: Path, _root: Path) -> None:
    marker = json.loads((entry / "kernel.json").read_text())
    marker.setdefault("versions", {})["torch"] = "2.12.0"
    (entry / "kernel.json").write_text(json.dumps(marker))


DAMAGE = {  # what is done to the gelu gemm's entry, and the reason its warning gives
    "empty library": (lambda entry, root: library(entry).write_bytes(b""), "differs from the manifest's"),
    "random bytes": (lambda entry, root: library(entry).write_bytes(os.urandom(library(entry).stat().st_size)),
                     "differs from the manifest's"),
    "missing library": (lambda entry, root: library(entry).unlink(), ".so: missing"),
    "another kernel's library": (replace_with_other_kernels_library, "differs from the manifest's"),
    "marker not JSON": (lambda entry, root: (entry / "kernel.json").write_text("{not json"), "unreadable manifest"),
    "marker of other versions": (set_marker_version, "running torch="),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_entry_is_rebuilt_with_one_warning(cache_copy, damage):
    gelu_gemm = entry_of(cache_copy, "gelu gemm")
    do_damage, reason = DAMAGE[damage]
    do_damage(gelu_gemm, cache_copy)
    result = compile_and_check(cache_copy)
    assert_rebuilt_once(result, gelu_gemm)
    assert reason in result["warnings"][0]
    assert_healthy(cache_copy)


def test_truncated_library_is_rebuilt_in_the_next_process_not_a_crash(cache_copy):
    """Loading a .so cut in half is a SIGBUS: every later run crashed before."""
    norm = entry_of(cache_copy, "norm")
    data = library(norm).read_bytes()
    library(norm).write_bytes(data[: len(data) // 2])
    [result] = results_of(in_subprocess("print(kc.json.dumps(kc.compile_and_check(sys.argv[1])))", cache_copy))
    assert_rebuilt_once(result, norm)
    assert_healthy(cache_copy)
    again = compile_and_check(cache_copy)  # healed: a plain disk hit now
    assert again["stats"] == {"disk_hits": KERNELS} and not again["warnings"] and again["error"] < 1e-5


def test_entry_the_backend_cannot_load_is_rebuilt(cache_copy, monkeypatch):
    import fuselm.codegen.tvm as backend

    load, refused = backend.load, []

    def load_refusing_once(group, directory):
        if not refused:
            refused.append(directory)
            raise RuntimeError("undefined symbol: __tvm_ffi_gemv\n(a second line of detail)")
        return load(group, directory)

    monkeypatch.setattr(backend, "load", load_refusing_once)
    result = compile_and_check(cache_copy)
    assert_rebuilt_once(result, refused[0])
    assert "(undefined symbol: __tvm_ffi_gemv)" in result["warnings"][0]
    assert_healthy(cache_copy)


# -- a failed generation -----------------------------------------------------------------


def test_failed_generation_raises_and_leaves_no_staging_directory(tmp_path, monkeypatch):
    import fuselm.codegen.tvm as backend

    emit = backend.emit

    def emit_then_fail(group, directory):
        emit(group, directory)  # the staging directory holds a whole kernel when it fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(backend, "emit", emit_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        compile_and_check(tmp_path)
    assert list((tmp_path / "cpu").iterdir()) == []


# -- processes sharing a cache ------------------------------------------------------------


def lose_the_race_to(theirs: Path, monkeypatch) -> list:
    """Make the next kernel generated find, as it finishes, that another process has
    installed a copy of `theirs` as its entry; returns where the inode of that copy goes."""
    import fuselm.codegen.tvm as backend

    emit, installed = backend.emit, []

    def emit_while_another_installs(group, staging):
        kernel = emit(group, staging)
        entry = staging.with_name(staging.name.split(".")[0])  # staging is "<key>.tmp..."
        shutil.copytree(theirs, entry)
        installed.append(entry.stat().st_ino)
        return kernel

    monkeypatch.setattr(backend, "emit", emit_while_another_installs)
    return installed


def test_losing_the_race_to_a_sound_entry_uses_it_and_leaves_it_alone(cache_copy, tmp_path, monkeypatch):
    gelu_gemm = entry_of(cache_copy, "gelu gemm")
    gelu_gemm.rename(tmp_path / "theirs")
    installed = lose_the_race_to(tmp_path / "theirs", monkeypatch)
    result = compile_and_check(cache_copy)
    assert result["error"] < 1e-5 and not result["warnings"]
    assert result["stats"] == {"disk_hits": KERNELS - 1, "codegen_runs": 1}
    assert gelu_gemm.stat().st_ino == installed[0]  # never deleted under whoever may load it
    assert_healthy(cache_copy)


def test_losing_the_race_to_a_corrupt_entry_replaces_it(cache_copy, tmp_path, monkeypatch):
    gelu_gemm = entry_of(cache_copy, "gelu gemm")
    gelu_gemm.rename(tmp_path / "theirs")
    library(tmp_path / "theirs").write_bytes(b"")
    lose_the_race_to(tmp_path / "theirs", monkeypatch)
    result = compile_and_check(cache_copy)
    assert result["error"] < 1e-5 and result["stats"] == {"disk_hits": KERNELS - 1, "codegen_runs": 1, "rebuilt": 1}
    assert len(result["warnings"]) == 1 and f"entry {gelu_gemm} is corrupt" in result["warnings"][0]
    assert result["warnings"][0].endswith("replacing it")
    assert_healthy(cache_copy)


RACER = """
    import json, shutil, time
    from pathlib import Path
    import tvm

    # A slow disk, to widen the windows in which one process could break an entry that
    # another is installing or loading: deleting a directory takes a while, and so does
    # the cpu backend's load between reading the library and reading the kernel's sources.
    rmtree, load_module = shutil.rmtree, tvm.runtime.load_module
    shutil.rmtree = lambda path, **options: (rmtree(path, **options), time.sleep(0.25))[0]
    tvm.runtime.load_module = lambda path: (load_module(path), time.sleep(0.25))[0]
    root, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    results = []
    try:
        for number in range(rounds):  # both start each round together
            (root / f"ready-{number}-{me}").touch()
            while len(list(root.glob(f"ready-{number}-*"))) < 2:
                time.sleep(0.001)
            results.append(kc.compile_and_check(root / f"round{number}"))
    finally:  # one that fails must not keep the other waiting
        for number in range(rounds):
            (root / f"ready-{number}-{me}").touch()
    print(json.dumps(results))
"""


def test_two_processes_filling_one_cache_at_once_both_succeed(tmp_path):
    racers = [in_subprocess(RACER, tmp_path, me, ROUNDS) for me in "ab"]
    for result in (r for rounds in results_of(*racers) for r in rounds):
        assert result["error"] < 1e-5 and not result["warnings"], result
    for number in range(ROUNDS):
        assert_healthy(tmp_path / f"round{number}")


# -- fuselm.integrity ---------------------------------------------------------------------

VERSIONS = {"fuselm": "0.1.0", "torch": "2.13.0"}


@pytest.fixture
def signed(tmp_path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / "sub" / "b.txt").write_text("b")
    write_manifest(tmp_path, "manifest.json", VERSIONS, {"name": "two files"})
    return tmp_path


def test_manifest_lists_every_file_and_verifies(signed):
    manifest = verify_manifest(signed, "manifest.json", VERSIONS)
    assert list(manifest["files"]) == ["a.bin", "sub/b.txt"] and manifest["name"] == "two files"
    assert manifest["files"] == digest_files(signed, frozenset({"manifest.json"}))
    (signed / "__pycache__").mkdir()  # bytecode Python writes when it imports from there
    (signed / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"pyc")
    verify_manifest(signed, "manifest.json", VERSIONS)


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "a.bin").write_bytes(b"\x01" * 1000), r"a\.bin: sha256 \w+\.\.\. differs from the manifest's"),
    (lambda d: (d / "sub" / "b.txt").unlink(), r"sub/b\.txt: missing"),
    (lambda d: (d / "c.so").write_bytes(b""), r"c\.so: unexpected file"),
    (lambda d: (d / "manifest.json").write_text("{"), r"manifest\.json: unreadable manifest"),
    (lambda d: (d / "manifest.json").unlink(), r"manifest\.json: missing manifest"),
    (lambda d: (d / "manifest.json").write_text("[]"), r"manifest\.json: not a manifest of format 1"),
])
def test_a_changed_directory_names_the_file_and_the_problem(signed, change, message):
    change(signed)
    with pytest.raises(IntegrityError, match=message):
        verify_manifest(signed, "manifest.json", VERSIONS)


def test_other_versions_are_named_as_built_and_running(signed):
    with pytest.raises(IntegrityError, match="built with torch=2.13.0, running torch=2.12.0"):
        verify_manifest(signed, "manifest.json", {**VERSIONS, "torch": "2.12.0"})
    with pytest.raises(IntegrityError, match="built with triton=unknown, running triton=3.6.0"):
        verify_manifest(signed, "manifest.json", {**VERSIONS, "triton": "3.6.0"})


def test_extra_keys_cannot_overwrite_the_formats_own(tmp_path):
    with pytest.raises(ValueError, match="files"):
        write_manifest(tmp_path, "manifest.json", VERSIONS, {"files": {}})


@pytest.mark.parametrize("where", ["root", "target"])
def test_a_cache_dir_that_is_a_file_is_named(tmp_path, where):
    root = tmp_path / "cache"
    if where == "root":
        root.write_text("not a directory")
    else:
        root.mkdir()
        (root / "cpu").write_text("not a directory")
    named = "cache_dir=.* is a file, not a directory" if where == "root" else "kernel cache directory .* is not a directory"
    with pytest.raises(fuselm.FuselmError, match=named):  # (the root: refused by compile, before any call)
        compile_and_check(root)
