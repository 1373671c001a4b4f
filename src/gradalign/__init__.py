"""gradalign: per-sample gradient geometry for training and diagnosing networks."""
from gradalign.errors import ConfigError, GradAlignError, UnsupportedModuleError

__version__ = "0.1.0"
__all__ = ["ConfigError", "GradAlignError", "UnsupportedModuleError"]
