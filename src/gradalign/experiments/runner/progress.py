"""Progress of an experiment: one bar for the experiment (trials + runs), one for the current run."""
from __future__ import annotations

from tqdm.auto import tqdm


def unit(config) -> str:
    """The unit a run's bar counts: samples (mnist1d) or images."""
    return "sample" if config.data.dataset == "mnist1d" else "img"


def label(config) -> str:
    """'name' or 'name [variant]' for log lines."""
    return config.name + (f" [{config.variant}]" if config.variant else "")


class Bars:
    """One bar for the experiment (trials + runs), one for the current run (samples)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.enabled = enabled
        self.outer = tqdm(total=total, initial=initial, desc=desc, unit="job", position=0,
                          disable=not enabled, dynamic_ncols=True)

    def inner(self, desc: str, total: int, unit: str = "sample"):
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, position=1, leave=False,
                    disable=not self.enabled, dynamic_ncols=True)

    def tick(self, *_):
        self.outer.update(1)

    def close(self):
        self.outer.close()
