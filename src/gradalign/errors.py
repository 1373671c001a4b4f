"""One exception family for the whole package."""


class GradAlignError(Exception):
    """Base class of every error gradalign raises on purpose."""


class UnsupportedModuleError(GradAlignError):
    """A module whose per-sample gradients the engine cannot compute.

    The message lists every offending module with its path, the reason, and the fix.
    """


class ConfigError(GradAlignError, ValueError):
    """A bad experiment configuration or command-line option."""


class RunFolderError(ConfigError):
    """A run folder that cannot be used as given: damaged files, results that do not belong
    together, or a folder another gradalign process is using. The message names the file
    and what to do."""
