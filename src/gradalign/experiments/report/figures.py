"""The report's figures, written as PNG files into the run folder.

    comparison[_<variant>].png      test accuracy and training loss over training, every arm
    gaga_dynamics[_<variant>].png   samples per optimizer step and accuracy stability (GAGA arms)
    gwa[_<variant>].png             GWA_T and test accuracy per epoch, selected epochs marked
    detection_auroc.png, detection_epochs.png, clean_retrain.png   the label-noise section's

Curves are the mean over seeds with a band of one standard deviation, clipped to the range
the seeds reached.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from gradalign.experiments.data.label_noise import describe
from gradalign.experiments.label_noise.detection import SIGNAL_NAMES, SIGNALS

NAN = float("nan")


def _curves(runs: dict, column: str, x: str):
    """{arm: (x (E,), mean (E,), lo (E,), hi (E,))} aligned by evaluation index over seeds.

    The band is mean -/+ one std, clipped to the range the seeds reached, so that it stays
    positive on a log scale (a loss never goes below its smallest seed).
    """
    out = {}
    for arm, seeds in runs.items():
        if not seeds:
            continue
        n = min(len(rows) for _, rows in seeds.values())
        ys = np.array([[r[column] for r in rows[:n]] for _, rows in seeds.values()], float)
        if not np.isfinite(ys).any():
            continue
        xs = np.array([r[x] for r in next(iter(seeds.values()))[1][:n]], float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # evaluations with no value (nan)
            mean, std = np.nanmean(ys, 0), np.nanstd(ys, 0)
            out[arm] = (xs, mean, np.maximum(mean - std, np.nanmin(ys, 0)), np.minimum(mean + std, np.nanmax(ys, 0)))
    return out


def _panel(ax, runs, column, x, labels, title):
    for arm, (xs, mean, lo, hi) in _curves(runs, column, x).items():
        ax.plot(xs, mean, label=labels[arm])
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)


def x_axis(cfg: dict) -> str:
    """The column curves are plotted against: samples on a sample budget, else epochs."""
    return "samples" if cfg["train"]["budget_samples"] else "epoch"


def plot_variant(run_dir: Path, meta: dict, variant: str, runs: dict, extra: list[str]) -> list[str]:
    """Draw the comparison figure and the `extra` figures (names in EXTRA) of one variant;
    return the file names written into run_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = meta["config"]
    labels = {a["name"]: a["label"] or a["name"] for a in cfg["arms"]}
    x = x_axis(cfg)
    suffix = f"_{variant}" if variant else ""
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _panel(axes[0], runs, "test_acc", x, labels, "test accuracy")
    _panel(axes[1], runs, "train_loss", x, labels, "training loss")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg['name']} {variant} (mean; band: one std over seeds, within their range)".strip())
    fig.tight_layout()
    names.append(f"comparison{suffix}.png")
    fig.savefig(Path(run_dir) / names[-1], dpi=110)
    plt.close(fig)
    for name in extra:
        names.append(f"{name}{suffix}.png")
        EXTRA[name](plt, Path(run_dir) / names[-1], runs, cfg, labels, variant)
    return names


def _plot_gaga(plt, path, runs, cfg, labels, variant):
    """Samples per optimizer step and accuracy stability over training (GAGA)."""
    x, k = x_axis(cfg), cfg["experiment"]["stability_last"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _panel(axes[0], runs, "samples_per_step", x, labels, "samples per optimizer step")
    column = "val_acc" if any(math.isfinite(rows[-1]["val_acc"]) for seeds in runs.values()
                              for _, rows in seeds.values()) else "test_acc"
    for arm, seeds in runs.items():
        if not seeds:
            continue
        rolling = []
        for _, rows in seeds.values():
            acc = np.array([r[column] for r in rows], float)
            rolling.append([np.std(acc[max(0, i - k + 1):i + 1], ddof=1) if i else NAN for i in range(len(acc))])
        n = min(map(len, rolling))
        xs = [r[x] for r in next(iter(seeds.values()))[1][:n]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # the first evaluation has no std
            axes[1].plot(xs, np.nanmean([r[:n] for r in rolling], 0), label=labels[arm])
    axes[1].set_title(f"{column.replace('_', ' ')} stability: std over the last {k} evaluations")
    axes[1].set_xlabel(x)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gwa(plt, path, runs, cfg, labels, variant):
    """Per arm: test accuracy and GWA_T per epoch, with the GWA-, validation- and last-selected epochs."""
    arms = [a for a, seeds in runs.items() if seeds]
    fig, axes = plt.subplots(1, max(len(arms), 1), figsize=(5.5 * max(len(arms), 1), 4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        seeds = runs[arm]
        n = min(len(rows) for _, rows in seeds.values())
        ep = np.arange(1, n + 1)
        acc = np.array([[r["test_acc"] for r in rows[:n]] for _, rows in seeds.values()])
        gwa = np.array([[r["gwa"] for r in rows[:n]] for _, rows in seeds.values()])
        ax.plot(ep, acc.mean(0), color="C0", label="test acc")
        ax2 = ax.twinx()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # epochs with no selectable GWA_T (nan)
            ax2.plot(ep, np.nanmean(gwa, 0), color="C1", label="GWA score")
        ax2.set_ylabel("GWA_T", color="C1")
        for i, (summary, rows) in enumerate(seeds.values()):
            picks = [("gwa", summary.get("gwa_epoch"), "^", "C3")]
            val = np.array([r["val_acc"] for r in rows[:n]], float)
            if np.isfinite(val).all():
                picks.append(("val", int(np.argmax(val)), "s", "C2"))
            picks.append(("last", n - 1, "o", "C7"))
            for name, e, marker, color in picks:
                if e is not None and e < n:
                    ax.scatter(e + 1, acc[i, e], marker=marker, color=color, zorder=3,
                               label=f"{name}-selected" if i == 0 else None)
        ax.set_title(f"{labels[arm]} {variant}".strip())
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXTRA = {"gaga_dynamics": _plot_gaga, "gwa": _plot_gwa}   # figure name -> drawing function


def signals_of(results: dict) -> list[str]:
    """The detection signals any level has results for, in the table's order."""
    return [n for n in SIGNAL_NAMES if any(n in r["signals"] for r in results.values())]


def noise_figures(run_dir: Path, detect: dict, cleaned: dict) -> list[str]:
    """The label-noise section's figures (noise_section.py's results): detection_auroc.png,
    detection_epochs.png, clean_retrain.png; returns the names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if detect:
        variants, sig = list(detect), signals_of(detect)
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sig)), 4))
        width = 0.8 / len(variants)
        for j, v in enumerate(variants):
            nan = {"mean": np.nan, "lo": np.nan, "hi": np.nan}
            st = [detect[v]["signals"].get(n, {}).get("auroc", nan) for n in sig]
            mean = np.array([s["mean"] for s in st])
            err = np.array([[s["mean"] - s["lo"] if math.isfinite(s["lo"]) else 0 for s in st],
                            [s["hi"] - s["mean"] if math.isfinite(s["hi"]) else 0 for s in st]])
            ax.bar(np.arange(len(sig)) + (j - (len(variants) - 1) / 2) * width, mean, width, yerr=err, capsize=3,
                   label=describe(v))
        ax.set_xticks(np.arange(len(sig)), [SIGNALS[n].label.split(" (")[0] for n in sig], rotation=20,
                      ha="right", fontsize=8)
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("AUROC, signal averaged over training")
        ax.set_title("Mislabel detection (mean, 95% CI over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        names.append("detection_auroc.png")
        fig.savefig(run_dir / names[-1], dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants) + 2.5, 4), squeeze=False)
        for ax, v in zip(axes[0], variants):
            for n in detect[v]["signals"]:
                curve = detect[v]["signals"][n]["auroc_epochs"]
                mean, std = np.array(curve["mean"]), np.array(curve["std"])
                ep = np.arange(1, len(mean) + 1)
                ax.plot(ep, mean, label=SIGNALS[n].label.split(" (")[0])
                ax.fill_between(ep, mean - std, mean + std, alpha=0.15)
            ax.axhline(0.5, color="k", lw=0.5)
            ax.set_title(f"AUROC per epoch, {describe(v)}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
        names.append("detection_epochs.png")
        fig.savefig(run_dir / names[-1], dpi=110)
        plt.close(fig)
    if cleaned:
        variants = list(cleaned)
        height = 0.6 + 0.3 * max(map(len, cleaned.values()))
        fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), height), squeeze=False)
        for ax, v in zip(axes[0], variants):
            rules = list(cleaned[v])
            for i, rule in enumerate(rules):
                e = cleaned[v][rule]
                lo, hi = (e["lo"], e["hi"]) if math.isfinite(e["lo"]) else (e["mean"], e["mean"])
                ax.errorbar(100 * e["mean"], i, xerr=[[100 * (e["mean"] - lo)], [100 * (hi - e["mean"])]], fmt="o",
                            color="C3" if rule in ("all data", "oracle") else "C0", capsize=3)
            ax.set_yticks(range(len(rules)), rules, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("test accuracy (%)")
            ax.set_title(f"clean-and-retrain, {describe(v)}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        names.append("clean_retrain.png")
        fig.savefig(run_dir / names[-1], dpi=110)
        plt.close(fig)
    return names
