"""matplotlib for the PNGs `fuselm inspect` writes: an optional dependency, asked for
only when a PNG is wanted. Figures are made without pyplot, so drawing one neither
needs a display nor changes the backend of a program that calls `plot_roofline`."""
from __future__ import annotations

from .source import InspectError


def new_figure(needed_by: str, alternative: str = "", **options):
    """A matplotlib Figure, or a one-line InspectError saying what to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        hint = f" ({alternative})" if alternative else ""
        raise InspectError(f"{needed_by} needs matplotlib: pip install matplotlib{hint}") from None
    return Figure(**options)
