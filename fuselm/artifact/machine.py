"""What an artifact's code needs of the machine that runs it, recorded at build and
checked before anything is loaded: the one place the artifact code tells targets apart.

- cpu: the kernels are native code that LLVM generated for one CPU (`--mcpu native`: the
  build machine's, e.g. znver3; `--mcpu generic`: x86-64-v3, any x86-64 with AVX2). The
  manifest records that CPU and the instruction-set extensions its code may use
  (`codegen/tvm/build.py`'s `cpu_features`); a machine whose CPU lacks one of them is
  refused (its kernels could die of an illegal instruction).
- cuda: the kernels are Triton sources, compiled for the GPU they run on at their first
  launch, so the build does not tie them to a GPU architecture ("gpu_arch": "any"); a
  machine needs a CUDA GPU (or Triton's interpreter, TRITON_INTERPRET=1, as for
  `fuselm.compile(target="cuda")`).
"""
from __future__ import annotations

import contextlib

from ..errors import ArtifactError, FuselmError
from ..target import Target

MCPU_OPTIONS = ("native", "generic")


def check_mcpu(target: Target, mcpu: str) -> None:
    """ArtifactError for an `--mcpu` that does not apply to `target`."""
    if mcpu not in MCPU_OPTIONS:
        raise ArtifactError(f"--mcpu {mcpu!r}: choose one of {list(MCPU_OPTIONS)}")
    if target.name != "cpu" and mcpu != "native":
        raise ArtifactError(f"--mcpu {mcpu} applies to cpu kernels; {target.name} kernels are compiled for the GPU "
                            "they run on")


def code_settings(target: Target, mcpu: str):
    """A context in which `fuselm build` generates the kernels: for cpu, built for `mcpu`."""
    if target.name != "cpu":
        return contextlib.nullcontext()
    from ..codegen.tvm.host import use_mcpu

    return use_mcpu(mcpu)


def requirements(target: Target, mcpu: str) -> dict:
    """The manifest's "machine" entry, inside `code_settings(target, mcpu)`."""
    if target.name != "cpu":
        return {"gpu_arch": "any"}
    from ..codegen.tvm.host import cpu_features, host_cpu_features, mcpu as llvm_cpu

    host_cpu_features()  # remembered on disk: loading on this machine then needs no LLVM (tvm import)
    return {"mcpu": mcpu, "llvm_cpu": llvm_cpu(), "cpu_features": list(cpu_features(llvm_cpu()))}


def loading_settings(machine: dict):
    """A context in which the kernels load (and are keyed) as they were built."""
    if "llvm_cpu" not in machine:
        return contextlib.nullcontext()
    from ..codegen.tvm.host import use_mcpu

    return use_mcpu(machine["llvm_cpu"], check=False)  # checked by check_machine


def check_machine(manifest: dict, target: Target, where: str, rebuild: str) -> None:
    """Raise ArtifactError if this machine cannot run the artifact's code."""
    try:
        target.check_available()
    except FuselmError:  # cuda without a GPU
        for_cpu = rebuild.replace("--target cuda", "--target cpu")
        raise ArtifactError(f"{where} holds {target.name} kernels, which need a CUDA GPU, and none is visible "
                            "(TRITON_INTERPRET=1 runs them in Triton's interpreter instead, slowly); build a cpu "
                            f"artifact for this machine: `{for_cpu}`") from None
    machine = manifest.get("machine")
    if not isinstance(machine, dict):
        raise ArtifactError(f"{where}: the manifest has no valid 'machine' entry; rebuild it: `{rebuild}`")
    if "cpu_features" in machine:
        from ..codegen.tvm.host import host_cpu, host_cpu_features

        missing = sorted(set(machine["cpu_features"]) - set(host_cpu_features()))
        if missing:
            raise ArtifactError(
                f"{where} holds kernels built for the CPU {machine.get('llvm_cpu')} (--mcpu {machine.get('mcpu')}), "
                f"which use {', '.join(missing)}: this CPU ({host_cpu()}) lacks {'it' if len(missing) == 1 else 'them'}. "
                f"Rebuild it on this machine: `{rebuild.replace(' --mcpu generic', '')}`"
                + ("" if machine.get("mcpu") == "generic" else " (or with --mcpu generic, for any x86-64 with AVX2)"))
