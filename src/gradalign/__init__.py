"""gradalign: per-sample gradient geometry for training and diagnosing networks."""
from gradalign.engine import (
    GradientStats,
    PerSampleGradients,
    Rule,
    RuleRegistry,
    check_model,
    compare_with_reference,
    default_registry,
    per_sample_gradients,
    reference_statistics,
    replace_batchnorm,
    token_losses,
    validate,
)
from gradalign.engine import distributed  # ga.distributed.broadcast_parameters, all_reduce_flat
from gradalign.errors import ConfigError, GradAlignError, RunFolderError, UnsupportedModuleError
from gradalign.methods import GASW, GDSW, GVR, GSNRAccumulator, GWAMonitor, gwa_alignment, gwa_score

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "GASW", "GDSW", "GSNRAccumulator", "GVR", "GWAMonitor", "GradAlignError", "RunFolderError",
    "GradientStats", "PerSampleGradients", "Rule", "RuleRegistry", "UnsupportedModuleError",
    "check_model", "compare_with_reference", "default_registry", "distributed", "gwa_alignment", "gwa_score",
    "per_sample_gradients", "reference_statistics", "replace_batchnorm", "token_losses", "validate",
]
