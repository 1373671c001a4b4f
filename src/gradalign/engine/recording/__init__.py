"""The forward side of the engine: what each training forward leaves for the backward.

recorder.py (`Recorder`: the hooks on every served module, the records of the last
`max_pending_forwards` training forwards, the survey again when parameters are unfrozen);
calls.py (`Call`, `Hooked`: the records themselves); hooks.py (what every hook shares);
parametrized.py (weights computed from other parameters). `PerSampleGradients.backward` consumes them.
"""
from gradalign.engine.recording.calls import Call, Hooked
from gradalign.engine.recording.recorder import Recorder

__all__ = ["Call", "Hooked", "Recorder"]
