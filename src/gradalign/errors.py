"""One exception family for the whole package."""


class GradAlignError(Exception):
    """Base class of every error gradalign raises on purpose."""


class UnsupportedModuleError(GradAlignError):
    """A module whose per-sample gradients the engine cannot compute.

    The message lists every offending module with its path, the reason, and the fix.
    """


class LossesError(GradAlignError, ValueError):
    """Losses the engine cannot take per sample: not one loss per sample in the order of the
    model's inputs, or losses that mix samples (a contrastive loss over the batch)."""


class ConfigError(GradAlignError, ValueError):
    """A bad experiment configuration or command-line option."""


class RunFolderError(ConfigError):
    """A run folder that cannot be used as given: damaged files, results that do not belong
    together, or a folder another gradalign process is using. The message names the file
    and what to do."""


class ShardingError(GradAlignError):
    """A distributed (sharded) model the engine cannot serve as it is: HSDP, tensor parallel,
    parameters on different meshes, FSDP1, a process group other than the mesh's. The message
    says what was found and what is supported."""


class StatisticNotKeptError(GradAlignError, AttributeError):
    """A statistic that the backward which made these statistics did not keep (memory="low"
    reduces each layer to norms and cosines in the backward). An AttributeError too, so
    getattr(stats, name, default) still falls back."""
