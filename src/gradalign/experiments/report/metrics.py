"""The report's numbers: each run's metrics, and per arm their mean, 95% interval over seeds and
paired difference to the reference arm; the test accuracy at each epoch choice (GWA, validation,
last). Run metrics (per seed):

    test_acc, test_loss, train_loss     at the end of the budget
    wall_time                           seconds per run
    samples_per_step                    mean samples per optimizer step (GAGA: adaptive)
    acc_std_last                        std of the test (val) accuracy over the last k evaluations
    zero_weight_frac, weight_entropy    mean over steps (GASW/GDSW)
    test_acc@gwa, test_acc@val, test_acc@last   test accuracy at the epoch chosen by GWA, by
                                        the validation split (arms trained on `train`), the last
    gwa_spearman, gwa_pearson           correlation of the GWA epoch score with test accuracy
    auroc_flipped                       AUROC of -alignment (mean over epochs) for flipped labels
    flipped_acc_noisy, flipped_acc_clean, clean_train_acc   final accuracy on the flipped training
                                        samples w.r.t. their noisy / clean labels, and on the others
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from gradalign.experiments.method_table import METHODS
from gradalign.experiments.stats import mean_ci, paired_difference

NAN = float("nan")


def _selected(rows: list[dict], summary: dict) -> dict:
    """Test accuracy at the GWA-, validation- and last-epoch choices, and GWA's correlation with it."""
    test = np.array([r["test_acc"] for r in rows], float)
    out = {"test_acc@last": test[-1]}
    if summary.get("gwa_epoch") is not None:
        out["test_acc@gwa"] = test[summary["gwa_epoch"]]
    val = np.array([r["val_acc"] for r in rows], float)
    if np.isfinite(val).all():
        out["test_acc@val"] = test[int(np.argmax(val))]        # ties: the earliest epoch
    gwa = np.array([r["gwa"] for r in rows], float)
    ok = np.isfinite(gwa) & np.isfinite(test)
    if ok.sum() >= 3 and np.ptp(gwa[ok]) > 0 and np.ptp(test[ok]) > 0:
        out["gwa_spearman"] = float(sps.spearmanr(gwa[ok], test[ok]).statistic)
        out["gwa_pearson"] = float(sps.pearsonr(gwa[ok], test[ok]).statistic)
    return out


def run_metrics(summary: dict, rows: list[dict], last_k: int, declared: tuple[str, ...] = ()) -> dict:
    """One run's metrics. `declared`: the metrics its method asks for (method_table.Method.report_metrics);
    those that are evaluation-row columns are averaged over the evaluations where they are finite."""
    last = rows[-1]
    acc_key = "val_acc" if math.isfinite(last["val_acc"]) else "test_acc"     # stability: val when held out
    out = {"test_acc": last["test_acc"], "test_loss": last["test_loss"], "train_loss": last["train_loss"],
           "wall_time": summary["wall_time"],
           "samples_per_step": summary["samples"] / max(summary["steps"], 1),
           "acc_std_last": float(np.std([r[acc_key] for r in rows[-last_k:]], ddof=1)) if len(rows) > 1 else NAN}
    for key in declared:
        if key in out:                                  # computed above (samples_per_step, acc_std_last)
            continue
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[key] = float(np.mean(values))
    out.update(_selected(rows, summary))
    if "auroc_flipped" in summary:
        out["auroc_flipped"] = summary["auroc_flipped"]["mean"]
    out.update(summary.get("memorisation") or {})
    return out


# Accuracies and rates: their t intervals are clipped to [0, 1], their paired differences' to [-1, 1]
# (with few seeds the t interval of an accuracy near 0 or 1 would reach below 0 or above 1).
RATES = {"test_acc", "test_acc@gwa", "test_acc@val", "test_acc@last", "flipped_acc_noisy", "flipped_acc_clean",
         "clean_train_acc", "auroc_flipped", "zero_weight_frac", "auroc", "precision", "auroc_best", "precision_best",
         "flipped_share"}


def _clipped(d: dict, low: float, high: float) -> dict:
    return {**d, "lo": min(max(d["lo"], low), high), "hi": min(max(d["hi"], low), high)} if math.isfinite(d["lo"]) else d


def stat(values: list[float], metric: str | None = None) -> dict:
    """Mean, 95% interval (lo, hi), count and the values themselves of a list of numbers (None
    skipped); for a metric in RATES the interval is clipped to [0, 1]."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": NAN, "lo": NAN, "hi": NAN, "n": 0, "values": []}
    mean, lo, hi = mean_ci(v)
    out = {"mean": mean, "lo": lo, "hi": hi, "n": len(v), "values": v}
    return _clipped(out, 0.0, 1.0) if metric in RATES else out


def column(per_seed: dict, metric: str) -> dict:
    """{seed: value} of one metric over the seeds that have it."""
    return {s: m[metric] for s, m in per_seed.items() if metric in m}


def stat_against(values: dict, ref: dict | None, metric: str | None = None) -> dict:
    """stat of per-seed `values` ({seed: value}), plus "diff": the paired difference to
    `ref` ({seed: value}) over their common seeds (none when ref is None or nothing is shared)."""
    out = stat(list(values.values()), metric)
    diff = paired(values, ref, metric)
    if diff is not None:
        out["diff"] = diff
    return out


def summarise_variant(meta: dict, runs: dict) -> dict:
    """Per arm: parameters, per-seed metrics, mean/CI and paired difference to the reference."""
    cfg = meta["config"]
    reference = cfg["final"]["reference"]
    k = cfg["experiment"]["stability_last"]
    declared = {a["name"]: getattr(METHODS.get(a["method"]), "report_metrics", ()) for a in cfg["arms"]}
    per_seed = {arm: {seed: run_metrics(s, rows, k, declared[arm]) for seed, (s, rows) in seeds.items()}
                for arm, seeds in runs.items()}
    ref = per_seed.get(reference, {})
    out = {}
    for arm in cfg["arms"]:
        name = arm["name"]
        seeds = per_seed.get(name, {})
        first = next(iter(runs[name].values()), None)
        entry = {"label": arm["label"] or name, "method": arm["method"], "seeds": list(seeds),
                 "params": first[0]["params"] if first else {}, "tuned": first[0]["tuned_params"] if first else {},
                 "metrics": {}}
        keys = sorted({m for values in seeds.values() for m in values})
        for metric in keys:
            entry["metrics"][metric] = stat_against(column(seeds, metric),
                                                    None if name == reference else column(ref, metric), metric)
        out[name] = entry
    return {"reference": reference, "arms": out, "selection": selection(cfg, per_seed, reference)}


EPOCH_CHOICES = (("test_acc@gwa", "GWA epoch"), ("test_acc@val", "validation epoch"), ("test_acc@last", "last epoch"))


def selection(cfg: dict, per_seed: dict, reference: str) -> dict:
    """Test accuracy at each epoch choice (GWA, validation, last) of each arm, paired against one of them.

    The reference is the validation-selected epoch of the first arm that has a validation
    split (the usual practice GWA is meant to replace), else the last epoch of the reference arm.
    """
    items = [(arm["name"], metric, choice) for arm in cfg["arms"] for metric, choice in EPOCH_CHOICES
             if any(metric in m for m in per_seed.get(arm["name"], {}).values())]
    val = [(a, m) for a, m, _ in items if m == "test_acc@val"]
    ref = val[0] if val else (reference, "test_acc@last")
    ref_values = column(per_seed.get(ref[0], {}), ref[1])
    rows = [{"arm": arm, "rule": choice, "metric": metric,
             **stat_against(column(per_seed[arm], metric), None if (arm, metric) == ref else ref_values, metric)}
            for arm, metric, choice in items]
    return {"reference": {"arm": ref[0], "metric": ref[1]}, "rows": rows}




def paired(values: dict, ref: dict | None, metric: str | None = None) -> dict | None:
    """The paired difference of per-seed `values` to `ref` ({seed: value}) over their common seeds
    (its interval clipped to [-1, 1] for a metric in RATES), or None when nothing is shared."""
    common = [s for s in values if ref and s in ref]
    if not common:
        return None
    diff = paired_difference([values[s] for s in common], [ref[s] for s in common])
    return _clipped(diff, -1.0, 1.0) if metric in RATES else diff
