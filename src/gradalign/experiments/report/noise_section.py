"""The label-noise section of the report: every method under noise, mislabel detection by each
signal, and clean-and-retrain. Everything is recomputed from the run folder's files.

    methods     test accuracy per arm and noise level, the paired difference to the reference
                arm, and the final model's accuracy on the flipped training samples w.r.t. their
                noisy labels (memorised) and their clean labels (recovered)
    detection   per noisy level and signal (label_noise/detection.py), from the signals arm's records
                (runs/<variant>/<arm>/seed<k>.npz): AUROC and precision at the noise rate of the
                value over training, and at the best epoch (max over epochs: an oracle), mean
                [95% CI] over seeds and the paired difference to [noise] reference_signal
    clean       per noisy level and rule (label_noise/dropping.py): test accuracy, minus all data (the signals
                arm's own run of the seed), minus the oracle, and the share of flipped samples
                among those dropped

Figures: detection_auroc.png (AUROC per signal and level, 95% CI), detection_epochs.png
(AUROC per epoch), clean_retrain.png (test accuracy per rule and level, 95% CI).
The per-seed statistics are metrics.py's, the formatting tables.py's, the figures figures.py's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gradalign.experiments import run_folder
from gradalign.experiments.data.label_noise import describe
from gradalign.experiments.label_noise import detection
from gradalign.experiments.report.figures import noise_figures, signals_of
from gradalign.experiments.report.metrics import paired, stat, stat_against
from gradalign.experiments.report.tables import difference_cell, estimate, table

MEMORISATION = ("flipped_acc_noisy", "flipped_acc_clean")


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

    acc = grid(arms, variants, lambda m: estimate(m.get("test_acc"), "test_acc"))
    diff = grid([a for a in arms if a != ref], variants, lambda m: difference_cell(m.get("test_acc", {}).get("diff"), "test_acc"))
    cfg = meta["config"]
    tuned = " (tuned arms are tuned on a validation split with the same noise as their training set)" if (
        cfg["tune"]["trials"] and any(a["search"] for a in cfg["arms"])) else ""
    out = ["## Label noise: every method", "", f"Test accuracy, mean [95% CI] over seeds{tuned}:", ""]
    out += table(["arm"] + heads, acc) + [""]
    out += [f"Paired difference to {label[ref]} [95% CI], p of the paired t-test:", ""]
    out += table(["arm"] + heads, diff) + [""]
    if noisy:
        cols = [describe(v) for v in noisy]
        for metric, text in (("flipped_acc_noisy", "Memorised: final training accuracy on the flipped samples "
                                                   "w.r.t. their noisy labels"),
                             ("flipped_acc_clean", "Recovered: the same samples w.r.t. their clean labels")):
            cells = grid(arms, noisy, lambda m: estimate(m.get(metric), metric))
            out += [f"{text} (mean [95% CI]):", ""] + table(["arm"] + cols, cells) + [""]
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
                path = run_folder.run_path(run_dir, variant, arm, seed).with_name(summary["records"])
                per_seed[seed] = detection.detect(run_folder.read_npz(path))
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
                entry[metric] = stat_against(values, reference, metric)
            entry["auroc_best_epoch"] = [d[name]["auroc_best_epoch"] for d in per_seed.values()]
            n = min(len(d[name]["auroc_epochs"]) for d in per_seed.values())
            curves = np.array([d[name]["auroc_epochs"][:n] for d in per_seed.values()], float)
            entry["auroc_epochs"] = {"mean": np.nanmean(curves, 0).tolist(), "std": np.nanstd(curves, 0).tolist()}
            result[name] = entry
        out[variant] = {"signals": result, "seeds": list(per_seed), "reference": ref}
    return out


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
    rows = [[sig[n].label, sig[n].suspect] + [estimate(results[v]["signals"].get(n, {}).get("auroc"), "auroc") for v in variants]
            for n in signals_of(results)]
    out += table(["signal", "suspect when"] + [describe(v) for v in variants], rows) + [""]
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
            rows.append([sig[n].label, estimate(e["auroc"], "auroc"),
                         "(reference)" if n == ref else difference_cell(e["auroc"].get("diff"), "auroc"),
                         estimate(e["precision"], "precision"),
                         "(reference)" if n == ref else difference_cell(e["precision"].get("diff"), "precision"),
                         estimate(e["auroc_best"], "auroc"),
                         ", ".join(str(x + 1) for x in e["auroc_best_epoch"] if x is not None),
                         estimate(e["precision_best"], "precision")])
        out += table(["signal", "AUROC, over training", "minus ref.", "precision, over training", "minus ref.",
                       "AUROC, best epoch", "best epochs", "precision, best epoch"], rows) + [""]
    return out


# ---------------------------------------------------------------- clean-and-retrain

def clean_results(run_dir: Path, meta: dict, runs: dict, noisy: list[str]) -> dict:
    """{variant: {"all data" | rule: stat of test acc with diffs to all data and to the oracle}}."""
    arm = (meta["config"].get("noise") or {}).get("signals_arm")
    out = {}
    for variant in noisy:
        sources = {seed: s for seed, (s, _) in runs[variant].get(arm, {}).items()} if arm else {}
        found = run_folder.load_retrained(run_dir, meta, variant, sources)
        if not found:
            continue
        base = {seed: s["final"]["test_acc"] for seed, s in sources.items()}
        oracle = {seed: s["final"]["test_acc"] for seed, s in found.get("oracle", {}).items()} or None
        by_rule = {"all data": {**stat_against(base, None, "test_acc"), "vs_oracle": paired(base, oracle, "test_acc"),
                                "flipped_share": None}}
        for rule, seeds in found.items():
            acc = {seed: s["final"]["test_acc"] for seed, s in seeds.items()}
            entry = stat_against(acc, base, "test_acc")
            entry["vs_oracle"] = None if rule == "oracle" else paired(acc, oracle, "test_acc")
            shares = [s["dropped_flipped"] / s["dropped"] for s in seeds.values() if s["dropped"]]
            entry["flipped_share"] = stat(shares, "flipped_share")
            entry["dropped"] = float(np.mean([s["dropped"] for s in seeds.values()]))
            by_rule[rule] = entry
        out[variant] = by_rule
    return out


def clean_section(results: dict) -> list[str]:
    if not results:
        return []
    out = ["## Clean-and-retrain", "",
           "Drop the samples a signal ranks most suspect (by its value over training in the seed's signals-arm run), "
           "retrain that arm's updates with the same seed, parameters and epochs, and test. 'all data' is the "
           "signals arm's own run; the oracle drops exactly the flipped samples. Test accuracy, mean [95% CI], and "
           "paired differences over seeds:", ""]
    for v, by_rule in results.items():
        rows = []
        for rule, e in by_rule.items():
            rows.append([rule, estimate(e, "test_acc"), difference_cell(e.get("diff"), "test_acc"),
                         difference_cell(e.get("vs_oracle"), "test_acc"), estimate(e.get("flipped_share"), "flipped_share"),
                         str(e["n"])])
        out += [f"### Clean-and-retrain, {describe(v)}", ""]
        out += table(["dropped by", "test acc", "minus all data", "minus oracle", "flipped among dropped", "seeds"],
                     rows) + [""]
    return out


# ---------------------------------------------------------------- figures and entry point

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
    names = noise_figures(run_dir, detect, cleaned)
    lines += [f"![{n}]({n})\n" for n in names]
    return lines, {"variants": noisy, "detection": detect, "clean": cleaned}, names
