"""The training methods, each a small object on top of the engine, in a module named after it:
gasw.py (GASW, GDSW), gaga.py (GAGA's GSNRAccumulator), gwa.py (GWAMonitor), gvr.py (GVR);
head.py records a classifier head's inputs for GWA and GVR."""
from gradalign.methods.gaga import GSNRAccumulator
from gradalign.methods.gasw import GASW, GDSW, leave_one_out_cosines, normalised_entropy
from gradalign.methods.gvr import GVR
from gradalign.methods.gwa import GWAMonitor, gwa_alignment, gwa_score

__all__ = ["GASW", "GDSW", "GSNRAccumulator", "GVR", "GWAMonitor", "gwa_alignment", "gwa_score",
           "leave_one_out_cosines", "normalised_entropy"]
