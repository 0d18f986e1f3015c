"""Frontend: torch.export graphs -> fuselm IR."""
from .capture import capture

__all__ = ["capture"]
