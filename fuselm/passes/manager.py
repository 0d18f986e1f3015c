"""The pass pipeline: a flat, named list of Graph -> Graph functions.

`run_passes` applies them in order (`pipeline(target)` is PIPELINE plus the passes of
one target, e.g. cpu's weight `layout`), skipping any named in `disable`; with
`FUSELM_VERIFY=1` the verifier checks the graph after every pass, and with a
`dump_dir` the graph is written as `NN_<pass>.ir` before the first pass (00_captured)
and after each one, like TVM's DumpIR and TORCH_COMPILE_DEBUG.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import FuselmError
from ..ir.graph import Graph
from ..ir.registry import IRTypeError
from ..ir.verify import IRVerificationError, verify
from .common_subexpressions import eliminate_common_subexpressions
from .constant_folding import fold_constants
from .dead_code import eliminate_dead_code
from .fuse_attention import fuse_attention
from .fuse_epilogue import fuse_epilogue
from .fuse_norm import fuse_norm
from .fuse_sibling_gemms import fuse_sibling_gemms
from .canonicalize import canonicalize
from .layout import prepack_weights
from .matmul_to_gemm import matmul_to_gemm
from .pack_varlen import pack_varlen

Pass = tuple  # (name, Graph -> Graph)


class PassError(FuselmError):
    """A pass built an ill-typed or invalid graph (a fuselm bug, reported with the pass's name)."""

# matmul_to_gemm before constant folding: `x @ W.t()` then reads W itself, not a folded copy.
CLEANUP: list = [
    ("canonicalize", canonicalize),
    ("matmul_to_gemm", matmul_to_gemm),
    ("constant_folding", fold_constants),
    ("common_subexpressions", eliminate_common_subexpressions),
    ("dead_code", eliminate_dead_code),
]

# Order matters: attention and rope first (they consume matmuls and elementwise chains),
# then epilogues (the gated rule needs the gate/up gemms still separate), then siblings
# (q/k/v), then residual adds into norms (adds a gemm epilogue did not take).
FUSION: list = [
    ("fuse_attention", fuse_attention),
    ("fuse_epilogue", fuse_epilogue),
    ("fuse_sibling_gemms", fuse_sibling_gemms),
    ("fuse_norm", fuse_norm),
]

PIPELINE: list = CLEANUP + FUSION + [("dead_code_final", eliminate_dead_code)]

# What one target's kernels want of the graph, after the generic pipeline: cpu reads
# gemm weights prepacked in k16 panels; cuda's kernels read [N, K] as it is.
TARGET_PASSES: dict = {
    "cpu": [("layout", prepack_weights)],
    "cuda": [],
}


def pipeline(target: Optional[str] = None, donate_weights: bool = False, quantize: Optional[list] = None,
             packed_weights: Optional[Pass] = None, pack: bool = False) -> list:
    """PIPELINE, then the passes of `target` (none when target is None). With
    `donate_weights` the layout pass packs weights into their own storage (see layout.py).
    `quantize`: the quantization passes (passes/quantize.py `quantization_passes`), run
    on the fused graph, before the final dead-code pass and the target's passes.
    `packed_weights`: the pass giving a packed checkpoint's weights their parts
    (passes/packed_weights.py), right after matmul_to_gemm: while gemms read their
    weights as captured, before constant folding and fusion.
    `pack`: pack_varlen right after fuse_attention (it reads fused attentions and the
    plain gemms, norms and activations fusion then fuses on the packed rows)."""
    passes = PIPELINE[:-1] + list(quantize or []) + PIPELINE[-1:] + TARGET_PASSES.get(target, [])
    if pack:
        at = [name for name, _ in passes].index("fuse_attention") + 1
        passes = passes[:at] + [("pack_varlen", pack_varlen)] + passes[at:]
    if packed_weights is not None:
        at = [name for name, _ in passes].index("matmul_to_gemm") + 1
        passes = passes[:at] + [packed_weights] + passes[at:]
    if donate_weights:
        passes = [(name, functools.partial(fn, donate_weights=True) if fn is prepack_weights else fn)
                  for name, fn in passes]
    return passes


def verification_enabled() -> bool:
    return os.environ.get("FUSELM_VERIFY", "") not in ("", "0")


def run_passes(
    graph: Graph,
    passes: Optional[Iterable[Pass]] = None,
    disable: Iterable[str] = (),
    dump_dir: Optional[str] = None,
) -> Graph:
    passes = list(PIPELINE if passes is None else passes)
    unknown = set(disable) - {name for name, _ in passes}
    if unknown:
        raise ValueError(f"cannot disable unknown passes {sorted(unknown)}; the pipeline is {[n for n, _ in passes]}")
    passes = [p for p in passes if p[0] not in set(disable)]
    dump = _dumper(dump_dir)
    dump(0, "captured", graph)
    for index, (name, fn) in enumerate(passes, start=1):
        try:
            graph = fn(graph)
            if verification_enabled():
                verify(graph)
        except (IRTypeError, IRVerificationError) as error:  # a pass bug: say which pass
            raise PassError(f"fuselm pass {name!r} produced an invalid graph: {error}") from error
        dump(index, name, graph)
    return graph


def _dumper(dump_dir: Optional[str]) -> Callable:
    dump_dir = dump_dir or os.environ.get("FUSELM_DUMP") or None
    if not dump_dir:
        return lambda index, name, graph: None
    directory = Path(dump_dir)
    directory.mkdir(parents=True, exist_ok=True)

    def dump(index: int, name: str, graph: Graph) -> None:
        (directory / f"{index:02d}_{name}.ir").write_text(str(graph))

    return dump
