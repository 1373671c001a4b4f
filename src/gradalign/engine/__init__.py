"""The per-sample gradient engine: statistics of g_i from one forward and one backward."""
from gradalign.engine.capture import PerSampleGradients
from gradalign.engine.reference import check_model, per_sample_gradients, reference_statistics
from gradalign.engine.rules import Rule, RuleRegistry, default_registry
from gradalign.engine.stats import GradientStats

__all__ = [
    "GradientStats", "PerSampleGradients", "Rule", "RuleRegistry", "check_model", "default_registry",
    "per_sample_gradients", "reference_statistics",
]
