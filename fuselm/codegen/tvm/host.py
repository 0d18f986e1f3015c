"""Which CPU the cpu kernels are built (and cache-keyed) for, and what this machine's CPU
can run: importing this module does not import tvm.

Kernels are built for this machine's CPU (LLVM's `-mcpu` of the host) unless
`use_mcpu(...)` names another: `fuselm build --mcpu generic` builds for any x86-64 with
AVX2 (`x86-64-v3`). The CPU is part of every kernel cache key (registered with the cache
in __init__.py), so kernels built for two CPUs never share an entry. `cpu_features` lists the
instruction-set extensions a CPU's kernels may use, which an artifact records and checks
against `host_cpu_features()` before it loads them.

Asking LLVM means importing tvm (~2-3 s), which loading an artifact otherwise avoids
(`vm.py` runs its program through TVM's runtime library alone). So the host's answer is
remembered on disk, in `<FUSELM_CACHE>/host-cpu.json`, under a key of what the kernel
describes the CPU as (/proc/cpuinfo's vendor, family, model, stepping and flags) and the
tvm version: a machine whose CPU changes (a VM moved to another host) asks LLVM again.
Where /proc/cpuinfo is missing, or the file cannot be written, LLVM is asked every time.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Optional

from ...errors import FuselmError
from ..cache import default_cache_dir

# `--mcpu` spellings -> LLVM CPU names ("native": this machine's, resolved when used)
MCPU_CHOICES = {"native": None, "generic": "x86-64-v3"}  # x86-64-v3: AVX2, FMA, BMI2, F16C, MOVBE
_mcpu: contextvars.ContextVar = contextvars.ContextVar("fuselm_mcpu", default=None)  # None: the host's
# LLVM's feature lists mix instruction-set extensions with tuning flags (`fast-*`,
# `slow-*`, `macrofusion`, ...), which change how code is scheduled, not which
# instructions it needs: those are left out of what an artifact requires of a CPU.
_TUNING_FEATURE = re.compile(
    r"(fast|faster|slow|false-deps|tuning|prefer|no-bypass-delay|use-glm|use-slm|lea)-"
    r"|(branchfusion|macrofusion|sbb-dep-breaking|allow-light-256-bit|pad-short-functions|vzeroupper|"
    r"branch-hint|ermsb|fsrm|idivl-to-divb|idivq-to-divl|64bit-mode|32bit-mode|16bit-mode)$")
_CPUINFO_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags")
MEMO_FILE = "host-cpu.json"


@contextlib.contextmanager
def use_mcpu(mcpu, check: bool = True):
    """While active (in this thread), kernels are built, and cache-keyed, for `mcpu`: an
    LLVM CPU name, a `MCPU_CHOICES` spelling ("native", "generic"), or None (the host's).
    `check=False` trusts the name (an artifact's recorded CPU): no LLVM, no tvm import."""
    name = MCPU_CHOICES.get(mcpu, mcpu)
    if check and name is not None:
        import tvm

        triple = tvm.target.codegen.llvm_get_system_triple()
        if not tvm.target.codegen.llvm_is_valid_cpu(name, triple):
            raise FuselmError(f"LLVM knows no CPU {name!r} for {triple}; use one of {sorted(MCPU_CHOICES)} or an "
                              "LLVM CPU name")
    token = _mcpu.set(name)
    try:
        yield
    finally:
        _mcpu.reset(token)


def mcpu() -> str:
    """The LLVM CPU kernels are built for now: `use_mcpu`'s, else the host's (e.g. "znver3")."""
    return _mcpu.get() or host_cpu()


@functools.cache
def cpu_features(cpu: str) -> tuple:
    """The instruction-set extensions LLVM lets kernels built for `cpu` use, sorted
    (LLVM's names: "avx2", "fma", "sse4.2", ...; its tuning flags left out)."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    with target:
        features = tvm.target.codegen.llvm_get_cpu_features(target)
    return tuple(sorted(str(f) for f in features if not _TUNING_FEATURE.match(str(f))))


def host_cpu() -> str:
    """This machine's CPU as LLVM names it (e.g. "znver3")."""
    return host_record()["llvm_cpu"]


def host_cpu_features() -> tuple:
    """`cpu_features` of this machine's CPU."""
    return tuple(host_record()["features"])


@functools.cache
def host_record() -> dict:
    """{"key", "llvm_cpu", "features"}: this machine's CPU as LLVM sees it, as remembered in
    MEMO_FILE (asked of LLVM, and remembered, where it is missing or for another CPU)."""
    key = _host_key()
    memo = default_cache_dir().parent / MEMO_FILE
    if key is not None:
        with contextlib.suppress(OSError, ValueError):
            remembered = json.loads(memo.read_text())
            if (remembered.get("key") == key and isinstance(remembered.get("llvm_cpu"), str)
                    and isinstance(remembered.get("features"), list)):
                return remembered
    import tvm

    cpu = str(tvm.target.codegen.llvm_get_system_cpu())
    answer = {"key": key, "llvm_cpu": cpu, "features": list(cpu_features(cpu))}
    if key is not None:
        with contextlib.suppress(OSError):  # a read-only cache: ask LLVM next time too
            memo.parent.mkdir(parents=True, exist_ok=True)
            partial = memo.with_name(f"{MEMO_FILE}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(answer))
            partial.replace(memo)
    return answer


def _host_key() -> Optional[str]:
    """What identifies this CPU to the features LLVM reports for it; None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        tvm_version = metadata.version("apache-tvm")
    except (OSError, metadata.PackageNotFoundError):
        return None
    first = text.split("\n\n", 1)[0]  # the first processor's entry
    fields = sorted(line.strip() for line in first.splitlines() if line.split(":")[0].strip() in _CPUINFO_FIELDS)
    if not any(line.startswith("flags") for line in fields):
        return None
    return hashlib.sha256("\n".join([f"tvm={tvm_version}", *fields]).encode()).hexdigest()[:16]
