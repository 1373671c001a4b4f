"""Statistics of results over seeds: confidence intervals and paired differences (intervals.py),
ranking metrics such as the AUROC (ranking.py). Pure numpy/scipy."""
from gradalign.experiments.stats.intervals import mean_ci, paired_difference
from gradalign.experiments.stats.ranking import auroc

__all__ = ["auroc", "mean_ci", "paired_difference"]
