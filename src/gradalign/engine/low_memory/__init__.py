"""memory="low": per-sample statistics reduced inside the backward (backward.py), the statistics
that keeps (reduced_stats.py); p.grad from a second backward of the weighted losses."""
from gradalign.engine.low_memory.backward import MEMORY_MODES, InBackward, check_memory
from gradalign.engine.low_memory.reduced_stats import ReducedStats

__all__ = ["MEMORY_MODES", "InBackward", "ReducedStats", "check_memory"]
