"""gradalign: per-sample gradient geometry for training and diagnosing networks."""
from gradalign.engine import (
    GradientStats,
    PerSampleGradients,
    Rule,
    RuleRegistry,
    check_model,
    compare_with_reference,
    default_registry,
    reference_gradients,
    reference_statistics,
    replace_batchnorm,
    token_losses,
    Validation,
    validate,
)
from gradalign.engine import distributed  # ga.distributed.broadcast_parameters, all_reduce_flat
from gradalign.errors import (ConfigError, GradAlignError, LossesError, RunFolderError, ShardingError,
                              StatisticNotKeptError, UnsupportedModuleError)
from gradalign.methods import GASW, GDSW, GVR, GSNRAccumulator, GWAMonitor, gwa_alignment, gwa_score

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "GASW", "GDSW", "GSNRAccumulator", "GVR", "GWAMonitor", "GradAlignError", "LossesError",
    "RunFolderError", "GradientStats", "PerSampleGradients", "Rule", "RuleRegistry", "ShardingError",
    "StatisticNotKeptError", "UnsupportedModuleError",
    "check_model", "compare_with_reference", "default_registry", "distributed", "gwa_alignment", "gwa_score",
    "reference_gradients", "reference_statistics", "replace_batchnorm", "token_losses", "Validation", "validate",
]

_DEPRECATED = {"per_sample_gradients": ("reference_gradients", reference_gradients)}


def __getattr__(name: str):
    """Old public names, kept for one release with a DeprecationWarning that names the new one."""
    if name in _DEPRECATED:
        import warnings
        new, value = _DEPRECATED[name]
        warnings.warn(f"ga.{name} is deprecated and will be removed in the next release: use ga.{new} "
                      "(the torch.func reference that forms the per-sample gradients)", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module 'gradalign' has no attribute {name!r}")
