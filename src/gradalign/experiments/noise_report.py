"""The label-noise section of the report: every method under noise, mislabel detection by each
signal, and clean-and-retrain. Everything is recomputed from the run folder's files.

    methods     test accuracy per arm and noise level, the paired difference to the reference
                arm, and the final model's accuracy on the flipped training samples w.r.t. their
                noisy labels (memorised) and their clean labels (recovered)
    detection   per noisy level and signal (detection.py), from the signals arm's records
                (runs/<variant>/<arm>/seed<k>.npz): AUROC and precision at the noise rate of the
                value over training, and at the best epoch (max over epochs: an oracle), mean
                [95% CI] over seeds and the paired difference to [noise] reference_signal
    clean       per noisy level and rule (clean.py): test accuracy, minus all data (the signals
                arm's own run of the seed), minus the oracle, and the share of flipped samples
                among those dropped

Figures: detection_auroc.png (AUROC per signal and level, 95% CI), detection_epochs.png
(AUROC per epoch), clean_retrain.png (test accuracy per rule and level, 95% CI).
The per-seed statistics are report.py's (this module is imported by it, on use).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gradalign.experiments import clean, detection, intervals, rundir
from gradalign.experiments.noise import describe
from gradalign.experiments.report import _stat, _stat_against, _table

MEMORISATION = ("flipped_acc_noisy", "flipped_acc_clean")


def est(stat: dict | None, pct: bool = False) -> str:
    """'64.10% [62.02, 66.18]' (pct) or '0.904 [0.895, 0.912]': mean [95% CI]; '-' when empty."""
    if not stat or not stat.get("n"):
        return "-"
    f = (lambda v: f"{100 * v:.2f}") if pct else (lambda v: f"{v:.3f}")
    text = f(stat["mean"]) + ("%" if pct else "")
    return text + (f" [{f(stat['lo'])}, {f(stat['hi'])}]" if math.isfinite(stat["lo"]) else "")


def dif(d: dict | None, pct: bool = False) -> str:
    """'+0.7 pp [-1.2, +2.6], p 0.36' (pct) or '+0.012 [-0.004, +0.028], p 0.12'; '-' when empty."""
    if not d or not d.get("n"):
        return "-"
    f = (lambda v: f"{round(100 * v, 1) + 0.0:+.1f}") if pct else (lambda v: f"{round(v, 3) + 0.0:+.3f}")
    text = f(d["mean"]) + (" pp" if pct else "")
    if math.isfinite(d["lo"]):
        text += f" [{f(d['lo'])}, {f(d['hi'])}]"
    return text + (f", p {d['p_value']:.2g}" if math.isfinite(d["p_value"]) else "")


def _noisy(runs: dict) -> list[str]:
    """The variants whose runs trained on flipped labels."""
    return [v for v, arms in runs.items()
            if any(s.get("noise", {}).get("flipped") for seeds in arms.values() for s, _ in seeds.values())]


# ---------------------------------------------------------------- methods under noise

def methods_section(meta: dict, summaries: dict, noisy: list[str]) -> list[str]:
    """Test accuracy, paired difference to the reference arm, memorised and recovered, per level."""
    variants = list(summaries)
    ref = meta["config"]["final"]["reference"]
    arms = [a["name"] for a in meta["config"]["arms"]]
    label = {name: e["label"] for name, e in next(iter(summaries.values()))["arms"].items()}
    heads = [describe(v) for v in variants]

    def grid(names, cols, cell):
        return [[label[a]] + [cell(summaries[v]["arms"][a]["metrics"]) for v in cols] for a in names]

    acc = grid(arms, variants, lambda m: est(m.get("test_acc"), pct=True))
    diff = grid([a for a in arms if a != ref], variants, lambda m: dif(m.get("test_acc", {}).get("diff"), pct=True))
    cfg = meta["config"]
    tuned = " (tuned arms are tuned on a validation split with the same noise as their training set)" if (
        cfg["tune"]["trials"] and any(a["search"] for a in cfg["arms"])) else ""
    out = ["## Label noise: every method", "", f"Test accuracy, mean [95% CI] over seeds{tuned}:", ""]
    out += _table(["arm"] + heads, acc) + [""]
    out += [f"Paired difference to {label[ref]} [95% CI], p of the paired t-test:", ""]
    out += _table(["arm"] + heads, diff) + [""]
    if noisy:
        cols = [describe(v) for v in noisy]
        for metric, text in (("flipped_acc_noisy", "Memorised: final training accuracy on the flipped samples "
                                                   "w.r.t. their noisy labels"),
                             ("flipped_acc_clean", "Recovered: the same samples w.r.t. their clean labels")):
            cells = grid(arms, noisy, lambda m: est(m.get(metric), pct=True))
            out += [f"{text} (mean [95% CI]):", ""] + _table(["arm"] + cols, cells) + [""]
    return out


# ---------------------------------------------------------------- detection

def detection_results(run_dir: Path, meta: dict, runs: dict, noisy: list[str]) -> dict:
    """{variant: {signal: {metric: stat with paired diff to the reference signal}, "epochs": ...}}."""
    arm = (meta["config"].get("noise") or {}).get("signals_arm")
    ref = (meta["config"].get("noise") or {}).get("reference_signal", "loss")
    out = {}
    for variant in noisy:
        seeds = runs[variant].get(arm, {}) if arm else {}
        per_seed = {}
        for seed, (summary, _) in seeds.items():
            if summary.get("records"):
                path = rundir.run_path(run_dir, variant, arm, seed).with_name(summary["records"])
                per_seed[seed] = detection.detect(rundir.read_npz(path))
        per_seed = {s: d for s, d in per_seed.items() if d}
        if not per_seed:
            continue
        result = {}
        names = [n for n in detection.SIGNAL_NAMES if all(n in d for d in per_seed.values())]   # older records: fewer
        for name in names:
            entry = {}
            for metric in ("auroc", "precision", "auroc_best", "precision_best"):
                values = {s: d[name][metric] for s, d in per_seed.items()}
                paired = name != ref and ref in names
                reference = {s: d[ref][metric] for s, d in per_seed.items()} if paired else None
                entry[metric] = _stat_against(values, reference)
            entry["auroc_best_epoch"] = [d[name]["auroc_best_epoch"] for d in per_seed.values()]
            n = min(len(d[name]["auroc_epochs"]) for d in per_seed.values())
            curves = np.array([d[name]["auroc_epochs"][:n] for d in per_seed.values()], float)
            entry["auroc_epochs"] = {"mean": np.nanmean(curves, 0).tolist(), "std": np.nanstd(curves, 0).tolist()}
            result[name] = entry
        out[variant] = {"signals": result, "seeds": list(per_seed), "reference": ref}
    return out


def _signals(results: dict) -> list[str]:
    """The signals any level has results for, in the table's order."""
    return [n for n in detection.SIGNAL_NAMES if any(n in r["signals"] for r in results.values())]


def detection_section(results: dict) -> list[str]:
    if not results:
        return []
    variants = list(results)
    ref = next(iter(results.values()))["reference"]
    sig = detection.SIGNALS
    out = ["## Which signal finds the mislabelled samples", "",
           "Each training sample is ranked by a signal recorded in the signals arm's own runs (one run per seed; "
           "suspect = the direction below). AUROC for 'label was flipped' of the signal averaged over training "
           "(forgetting: events over training), mean [95% CI] over seeds:", ""]
    rows = [[sig[n].label, sig[n].suspect] + [est(results[v]["signals"].get(n, {}).get("auroc")) for v in variants]
            for n in _signals(results)]
    out += _table(["signal", "suspect when"] + [describe(v) for v in variants], rows) + [""]
    for v in variants:
        r = results[v]["signals"]
        out += [f"### Detection, {describe(v)} ({len(results[v]['seeds'])} seeds)", "",
                "Precision: the share of flipped samples among the K most suspect, K = the number of flipped "
                "samples. Best epoch: the maximum over epochs of the per-epoch value (an oracle choice: it uses "
                f"the true flips), with the epochs it picked. Differences are paired over seeds, to {sig[ref].label}.",
                ""]
        rows = []
        for n in r:
            e = r[n]
            rows.append([sig[n].label, est(e["auroc"]), "(reference)" if n == ref else dif(e["auroc"].get("diff")),
                         est(e["precision"]), "(reference)" if n == ref else dif(e["precision"].get("diff")),
                         est(e["auroc_best"]), ", ".join(str(x + 1) for x in e["auroc_best_epoch"] if x is not None),
                         est(e["precision_best"])])
        out += _table(["signal", "AUROC, over training", "minus ref.", "precision, over training", "minus ref.",
                       "AUROC, best epoch", "best epochs", "precision, best epoch"], rows) + [""]
    return out


# ---------------------------------------------------------------- clean-and-retrain

def clean_results(run_dir: Path, meta: dict, runs: dict, noisy: list[str]) -> dict:
    """{variant: {"all data" | rule: stat of test acc with diffs to all data and to the oracle}}."""
    arm = (meta["config"].get("noise") or {}).get("signals_arm")
    out = {}
    for variant in noisy:
        sources = {seed: s for seed, (s, _) in runs[variant].get(arm, {}).items()} if arm else {}
        found = clean.load(run_dir, meta, variant, sources)
        if not found:
            continue
        base = {seed: s["final"]["test_acc"] for seed, s in sources.items()}
        oracle = {seed: s["final"]["test_acc"] for seed, s in found.get("oracle", {}).items()} or None
        table = {"all data": {**_stat_against(base, None), "vs_oracle": _against(base, oracle),
                              "flipped_share": None}}
        for rule, seeds in found.items():
            acc = {seed: s["final"]["test_acc"] for seed, s in seeds.items()}
            entry = _stat_against(acc, base)
            entry["vs_oracle"] = None if rule == "oracle" else _against(acc, oracle)
            shares = [s["dropped_flipped"] / s["dropped"] for s in seeds.values() if s["dropped"]]
            entry["flipped_share"] = _stat(shares)
            entry["dropped"] = float(np.mean([s["dropped"] for s in seeds.values()]))
            table[rule] = entry
        out[variant] = table
    return out


def _against(values: dict, ref: dict | None):
    common = [s for s in values if ref and s in ref]
    return intervals.paired_difference([values[s] for s in common], [ref[s] for s in common]) if common else None


def clean_section(results: dict) -> list[str]:
    if not results:
        return []
    out = ["## Clean-and-retrain", "",
           "Drop the samples a signal ranks most suspect (by its value over training in the seed's signals-arm run), "
           "retrain that arm's updates with the same seed, parameters and epochs, and test. 'all data' is the "
           "signals arm's own run; the oracle drops exactly the flipped samples. Test accuracy, mean [95% CI], and "
           "paired differences over seeds:", ""]
    for v, table in results.items():
        rows = []
        for rule, e in table.items():
            rows.append([rule, est(e, pct=True), dif(e.get("diff"), pct=True), dif(e.get("vs_oracle"), pct=True),
                         est(e.get("flipped_share"), pct=True), str(e["n"])])
        out += [f"### Clean-and-retrain, {describe(v)}", ""]
        out += _table(["dropped by", "test acc", "minus all data", "minus oracle", "flipped among dropped", "seeds"],
                      rows) + [""]
    return out


# ---------------------------------------------------------------- figures and entry point

def _plots(run_dir: Path, detect: dict, cleaned: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if detect:
        variants, sig = list(detect), _signals(detect)
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
        ax.set_xticks(np.arange(len(sig)), [detection.SIGNALS[n].label.split(" (")[0] for n in sig], rotation=20,
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
                ax.plot(ep, mean, label=detection.SIGNALS[n].label.split(" (")[0])
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


def write(run_dir, meta: dict, runs: dict, summaries: dict) -> tuple[list[str], dict, list[str]]:
    """(markdown lines, summary.json entry, figure names) of the label-noise section; nothing
    when no run trained on flipped labels and the config names no signals arm."""
    run_dir = Path(run_dir)
    noisy = _noisy(runs)
    if not noisy and not (meta["config"].get("noise") or {}).get("signals_arm"):
        return [], {}, []
    detect = detection_results(run_dir, meta, runs, noisy)
    cleaned = clean_results(run_dir, meta, runs, noisy)
    lines = methods_section(meta, summaries, noisy) + detection_section(detect) + clean_section(cleaned)
    names = _plots(run_dir, detect, cleaned)
    lines += [f"![{n}]({n})\n" for n in names]
    return lines, {"variants": noisy, "detection": detect, "clean": cleaned}, names
