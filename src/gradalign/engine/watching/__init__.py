"""Parameters and shared values watched at their point of use (modules without a rule): watch.py
follows the operations on a watched tensor, uses.py turns the gradient at a point of use into
per-sample gradients."""
from gradalign.engine.watching.watch import Watch, refuse_watched_input, watch_shared_output

__all__ = ["Watch", "refuse_watched_input", "watch_shared_output"]
