"""Frontend: torch.export graphs -> fuselm IR.

`capture` is imported on first use: it brings torch.export, which a process that only
loads a built artifact (frontend/signature.py) never needs.
"""
__all__ = ["capture"]


def __getattr__(name: str):
    if name == "capture":
        from .capture import capture

        globals()["capture"] = capture  # the import bound the submodule under this name
        return capture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
