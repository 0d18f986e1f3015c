"""Keep Triton out of a cpu process.

`torch.export` imports `torch._dynamo`, whose utilities probe for Triton by importing
it when it is installed: ~100 MB of resident memory and a second of start-up that a
cpu-only server never uses. While `without_triton()` is active, importing `triton`
fails as if it were not installed, so torch records "no Triton" (it caches the probe)
and moves on; fuselm's own cuda codegen imports Triton only when asked for cuda.
Nothing changes if Triton was imported before.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import sys


class _TritonBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by fuselm on cpu)", name=name)
        return None


@contextlib.contextmanager
def without_triton():
    if "triton" in sys.modules:
        yield
        return
    blocker = _TritonBlocker()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
