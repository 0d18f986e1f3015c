"""Package attributes imported on first use, so `import fuselm` (and the command line's
first line) stays light: `__getattr__ = lazy_attributes(__name__, globals(), {name: module})`."""
import importlib


def lazy_attributes(package: str, namespace: dict, table: dict):
    """A module `__getattr__` that imports `table[name]` (a submodule of `package`) at the
    first access of `name`, and keeps the attribute in `namespace` after it."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
