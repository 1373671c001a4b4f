"""The report of a run folder, computed from its files alone.

    metrics.py        each run's metrics; per arm the mean, 95% interval and paired difference
    tables.py         one formatter (estimate, difference) and the Markdown tables
    figures.py        every figure (comparison, GAGA dynamics, GWA, label-noise figures)
    noise_section.py  the label-noise section: methods under noise, detection, clean-and-retrain
    markdown.py       summary.md and write_report, the entry point
"""
from gradalign.experiments.report.markdown import write_report
from gradalign.experiments.report.metrics import run_metrics, summarise_variant
from gradalign.experiments.report.tables import main_table

__all__ = ["main_table", "run_metrics", "summarise_variant", "write_report"]
