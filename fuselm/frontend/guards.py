"""Shape guards: the conditions on input sizes under which a captured graph is the model.

A model that branches on a size (`if x.shape[0] > 4:`) is exported down the branch its
example took; with that dim symbolic, torch.export records the condition as a guard
(`L['x'].size()[0] > 4`) instead of putting it in the graph. A compiled graph serves a
call only where its guards hold; a call failing them is captured again, down the other
branch, as torch.compile's guards would.

The guards are Python expressions torch's shape environment printed over the exported
forward's parameters (`L[name]`, the call signature's tensor names); evaluated with no
builtins but `math` and `torch`, once per new input shape (api remembers the result).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_NAMESPACE = {"__builtins__": {}, "math": math, "torch": torch}


class ShapeGuards:
    """The guards of one capture. `holds(names, tensors)` says whether a call meets them;
    a guard that cannot be evaluated on a call does not hold (the call recompiles, and a
    recompile limit ends a loop, rather than a wrong graph running)."""

    def __init__(self, codes: tuple = ()):
        self.codes = tuple(codes)
        self._compiled = [compile(code, f"<guard {code}>", "eval") for code in self.codes]

    @staticmethod
    def of(exported) -> "ShapeGuards":
        """The guards torch.export recorded for `exported` (none on a torch without them)."""
        return ShapeGuards(tuple(getattr(exported, "_guards_code", None) or ()))

    def holds(self, names: tuple, tensors: tuple) -> bool:
        return self.failing(names, tensors) is None

    def failing(self, names: tuple, tensors: tuple) -> Optional[str]:
        """The first guard the call fails, or None when it meets them all."""
        if not self.codes:
            return None
        local = {"L": dict(zip(names, tensors))}
        for code, compiled in zip(self.codes, self._compiled):
            try:
                if not eval(compiled, _NAMESPACE, local):  # noqa: S307 (torch's own printed guard)
                    return code
            except Exception:  # an input the guard cannot read (another rank): not this graph
                return code
        return None

    def __bool__(self) -> bool:
        return bool(self.codes)

    def __repr__(self) -> str:
        return f"ShapeGuards({list(self.codes)})"
