"""Graph -> Graph passes, one per file, run in order by `manager.run_passes`."""
from .base import counters
from .manager import CLEANUP, FUSION, PIPELINE, TARGET_PASSES, pipeline, run_passes

__all__ = ["counters", "CLEANUP", "FUSION", "PIPELINE", "TARGET_PASSES", "pipeline", "run_passes"]
