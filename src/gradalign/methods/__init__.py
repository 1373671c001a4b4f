"""The training methods, each a small object on top of the engine."""
from gradalign.methods.accumulation import GSNRAccumulator
from gradalign.methods.gvr import GVR
from gradalign.methods.gwa import GWAMonitor, gwa_alignment, gwa_score
from gradalign.methods.weighting import GASW, GDSW, leave_one_out_cosines, normalised_entropy

__all__ = ["GASW", "GDSW", "GSNRAccumulator", "GVR", "GWAMonitor", "gwa_alignment", "gwa_score",
           "leave_one_out_cosines", "normalised_entropy"]
