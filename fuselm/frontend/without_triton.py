"""Keep Triton out of a cpu process.

`torch.export` imports `torch._dynamo`, whose utilities probe for Triton by importing
it when it is installed: ~100 MB of resident memory and a second of start-up that a
cpu-only server never uses. While `without_triton()` is active, importing `triton`
fails as if it were not installed, so torch records "no Triton" (it caches the probe)
and moves on; fuselm's own cuda codegen imports Triton only when asked for cuda.
Nothing changes if Triton was imported before.

A CUDA build of torch (PyPI's default on Linux) logs "triton not found; flop counting
will not work for triton kernels" when `torch.utils.flop_counter` is first imported and
Triton is not importable; `torch.export` imports it (through aot_autograd's runtime
estimation), so every cpu run printed it although Triton is installed. The warning is
only about our hiding, and a cpu process counts no Triton kernels: that one record is
dropped while the blocker is active (a CPU build of torch never logs it).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys

FLOP_COUNTER_LOGGER = "torch.utils.flop_counter"


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
    flop_counter_log = logging.getLogger(FLOP_COUNTER_LOGGER)
    sys.meta_path.insert(0, blocker)
    flop_counter_log.addFilter(_not_triton_missing)
    try:
        yield
    finally:
        flop_counter_log.removeFilter(_not_triton_missing)
        sys.meta_path.remove(blocker)


def _not_triton_missing(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("triton not found")
