"""The per-sample gradient engine: statistics of g_i from one forward and one backward."""
from gradalign.engine.batchnorm import Replacement, replace_batchnorm
from gradalign.engine.capture import PerSampleGradients
from gradalign.engine.gradient_stats import GradientStats
from gradalign.engine.losses import token_losses
from gradalign.engine.reference import check_model, compare_with_reference, reference_gradients, reference_statistics
from gradalign.engine.rules import Rule, RuleRegistry, default_registry
from gradalign.engine.validation import Validation, validate

__all__ = [
    "GradientStats", "PerSampleGradients", "Rule", "RuleRegistry", "check_model", "compare_with_reference",
    "default_registry", "reference_gradients", "reference_statistics", "replace_batchnorm", "token_losses",
    "Validation", "validate",
]
