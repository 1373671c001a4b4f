"""The report of a run folder: summary.md, summary.json, evaluations.csv and PNG plots.

``write_report(run_dir)`` reads only the folder (rundir.load_runs), so it works on a
finished run, on an interrupted one (whatever seeds exist), and from ``gradalign report DIR``.
Which extra metrics and figures an arm gets is declared by its method (arms.METHODS).

Statistics are over the final seeds: mean and 95% Student t interval; each arm against the
reference arm (``[final] reference``, default the first) as the paired difference over the
seeds both have (same seed = same initialisation and data order), with its 95% interval
and the paired t-test p-value. Curves show the mean over seeds with a band of one standard
deviation. Run metrics (per seed):

    test_acc, test_loss, train_loss     at the end of the budget
    wall_time                           seconds per run
    samples_per_step                    mean samples per optimizer step (GAGA: adaptive)
    acc_std_last                        std of the test (val) accuracy over the last k evaluations
    zero_weight_frac, weight_entropy    mean over steps (GASW/GDSW)
    test_acc@gwa, test_acc@val, test_acc@last   test accuracy at the epoch chosen by GWA, by
                                        the validation split (arms trained on `train`), the last
    gwa_spearman, gwa_pearson           correlation of the GWA epoch score with test accuracy
    auroc_flipped                       AUROC of -alignment (mean over epochs) for flipped labels
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats as sps

from gradalign.experiments import intervals, rundir
from gradalign.experiments.arms import METHODS
from gradalign.experiments.plots import plot_variant

log = logging.getLogger("gradalign")
NAN = float("nan")

LABELS = {
    "test_acc": "test acc", "test_loss": "test loss", "train_loss": "final train loss",
    "wall_time": "wall time (s)", "samples_per_step": "samples per step", "acc_std_last": "acc std, last evals",
    "zero_weight_frac": "zero-weight fraction", "weight_entropy": "weight entropy",
    "test_acc@gwa": "test acc at GWA epoch", "test_acc@val": "test acc at val epoch",
    "test_acc@last": "test acc at last epoch", "gwa_spearman": "Spearman(GWA, test acc)",
    "gwa_pearson": "Pearson(GWA, test acc)", "auroc_flipped": "AUROC flipped labels",
}
PERCENT = {"test_acc", "test_acc@gwa", "test_acc@val", "test_acc@last", "acc_std_last"}


# ---------------------------------------------------------------- per-run metrics

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
    """One run's metrics. `declared`: the metrics its method asks for (arms.Method.report_metrics);
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
    return out


def _stat(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": NAN, "lo": NAN, "hi": NAN, "n": 0, "values": []}
    mean, lo, hi = intervals.mean_ci(v)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(v), "values": v}


def _column(per_seed: dict, metric: str) -> dict:
    """{seed: value} of one metric over the seeds that have it."""
    return {s: m[metric] for s, m in per_seed.items() if metric in m}


def _stat_against(values: dict, ref: dict | None) -> dict:
    """_stat of per-seed `values` ({seed: value}), plus "diff": the paired difference to
    `ref` ({seed: value}) over their common seeds (none when ref is None or nothing is shared)."""
    out = _stat(list(values.values()))
    common = [s for s in values if s in ref] if ref is not None else []
    if common:
        out["diff"] = intervals.paired_difference([values[s] for s in common], [ref[s] for s in common])
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
            entry["metrics"][metric] = _stat_against(_column(seeds, metric),
                                                     None if name == reference else _column(ref, metric))
        out[name] = entry
    return {"reference": reference, "arms": out, "selection": _selection(cfg, per_seed, reference)}


EPOCH_CHOICES = (("test_acc@gwa", "GWA epoch"), ("test_acc@val", "validation epoch"), ("test_acc@last", "last epoch"))


def _selection(cfg: dict, per_seed: dict, reference: str) -> dict:
    """Test accuracy at each epoch choice (GWA, validation, last) of each arm, paired against one of them.

    The reference is the validation-selected epoch of the first arm that has a validation
    split (the usual practice GWA is meant to replace), else the last epoch of the reference arm.
    """
    items = [(arm["name"], metric, choice) for arm in cfg["arms"] for metric, choice in EPOCH_CHOICES
             if any(metric in m for m in per_seed.get(arm["name"], {}).values())]
    val = [(a, m) for a, m, _ in items if m == "test_acc@val"]
    ref = val[0] if val else (reference, "test_acc@last")
    ref_values = _column(per_seed.get(ref[0], {}), ref[1])
    rows = [{"arm": arm, "rule": choice, "metric": metric,
             **_stat_against(_column(per_seed[arm], metric), None if (arm, metric) == ref else ref_values)}
            for arm, metric, choice in items]
    return {"reference": {"arm": ref[0], "metric": ref[1]}, "rows": rows}


# ---------------------------------------------------------------- markdown

def _fmt(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.2f}%" if metric in PERCENT else f"{value:.4g}"


def _ci(s: dict, metric: str) -> str:
    if not s or s["n"] == 0:
        return "-"
    text = _fmt(s["mean"], metric)
    if math.isfinite(s["lo"]):
        text += f" [{_fmt(s['lo'], metric)}, {_fmt(s['hi'], metric)}]"
    return text


def _diff(d: dict | None, metric: str) -> tuple[str, str]:
    if not d:
        return "-", "-"
    scale = 100 if metric in PERCENT else 1
    unit = " pp" if metric in PERCENT else ""
    text = f"{scale * d['mean']:+.3g}{unit}"
    if math.isfinite(d["lo"]):
        text += f" [{scale * d['lo']:+.3g}, {scale * d['hi']:+.3g}]"
    return text, ("-" if not math.isfinite(d["p_value"]) else f"{d['p_value']:.3g}")


def _params_text(entry: dict) -> str:
    shown = entry["tuned"] or {k: v for k, v in entry["params"].items() if k in ("lr", "gamma", "tau", "alpha")}
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()) or "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main_table(summary: dict) -> list[str]:
    """The seeds' layout: mode, tuned parameters, test accuracy, final training loss."""
    rows = []
    for entry in summary["arms"].values():
        m = entry["metrics"]
        rows.append([entry["label"], _params_text(entry), _ci(m.get("test_acc"), "test_acc"),
                     _ci(m.get("train_loss"), "train_loss"), str(len(entry["seeds"]))])
    return _table(["mode", "tuned (or fixed)", "test acc", "final train loss", "seeds"], rows)


def stats_table(summary: dict, metrics: list[str]) -> list[str]:
    ref = summary["reference"]
    rows = []
    for metric in metrics:
        for name, entry in summary["arms"].items():
            s = entry["metrics"].get(metric)
            if not s or s["n"] == 0:
                continue
            d, p = _diff(s.get("diff"), metric)
            rows.append([LABELS.get(metric, metric), entry["label"], _ci(s, metric), d if name != ref else "(reference)", p])
    return _table(["metric", "arm", "mean [95% CI]", f"minus {summary['arms'][ref]['label']} [95% CI]", "p"], rows)


def selection_table(summary: dict) -> list[str]:
    sel = summary["selection"]
    ref = sel["reference"]
    labels = {name: e["label"] for name, e in summary["arms"].items()}
    ref_choice = dict(EPOCH_CHOICES)[ref["metric"]]
    rows = []
    for r in sel["rows"]:
        d, p = _diff(r.get("diff"), "test_acc")
        is_ref = (r["arm"], r["metric"]) == (ref["arm"], ref["metric"])
        rows.append([labels[r["arm"]], r["rule"], _ci(r, "test_acc"), "(reference)" if is_ref else d,
                     "-" if is_ref else p])
    return _table(["arm", "epoch chosen by", "test acc [95% CI]",
                   f"minus {labels[ref['arm']]}, {ref_choice} [95% CI]", "p"], rows)


def _available(summary: dict, metrics: list[str]) -> list[str]:
    return [m for m in metrics if any(m in e["metrics"] and e["metrics"][m]["n"] for e in summary["arms"].values())]


def _declared(cfg: dict, attribute: str) -> list[str]:
    """The union, in arm order, of what the arms' methods declare (unknown methods declare nothing)."""
    found = (getattr(METHODS.get(a["method"]), attribute, ()) for a in cfg["arms"])
    return list(dict.fromkeys(x for names in found for x in names))


def _gwa_study(cfg: dict) -> bool:
    """Whether the report has the GWA section: label-noise levels, or an arm that holds out a validation split."""
    return bool(cfg["experiment"]["noise_levels"]) or any(a.get("train_split") == "train" for a in cfg["arms"])


def _setup_line(cfg: dict) -> str:
    """Data, model, optimizer and budget of one (sub-)experiment's config dict."""
    d, t, m = cfg["data"], cfg["train"], cfg["model"]
    budget = f"{t['budget_samples']} samples" if t["budget_samples"] else f"{t['epochs']} epochs"
    if d.get("dataset", "mnist1d") == "mnist1d":
        data, model = f"mnist1d, {d['num_samples']} samples", f"{m['kind']} (hidden {m['hidden']})"
    else:
        data = f"{d['dataset']}, {d['train_size'] or 'all'} training images"
        model = m["kind"] + (f" {m['options']}" if m["options"] else "")
    lr = "" if d.get("dataset", "mnist1d") == "mnist1d" else f" lr {t['lr']:g}"
    return f"data: {data} (seed {d['seed']}); model {model}; {t['optimizer']}{lr}, batch {t['batch_size']}, budget {budget}"


def markdown(meta: dict, summaries: dict, plots: dict) -> str:
    cfg = meta["config"]
    tune = cfg["tune"]
    subs = {v["variant"]: v for v in cfg.get("variant_configs", ())}
    out = [f"# {cfg['name']}", "", cfg["description"], "",
           f"- {_setup_line(cfg) if not subs else 'variants: ' + ', '.join(subs)}",
           f"- tuning: Optuna TPE, {tune['trials']} trials per tuned arm on the validation split, objective "
           f"{tune['objective']} validation accuracy; storage {meta['storage']}",
           f"- final runs: {cfg['final']['seeds']} seeds from {cfg['final']['first_seed']}, trained on the full "
           "training set unless stated, paired across arms; intervals are 95% Student t, p from the paired t-test",
           f"- quick mode: {'yes' if meta['quick'] else 'no'}", ""]
    main = ["test_acc", "train_loss", "test_loss", "wall_time"] + _declared(cfg, "report_metrics")
    for variant, summary in summaries.items():
        title = f"noise {variant[5:]}" if variant.startswith("noise") else variant
        out += [f"## Results{' (' + title + ')' if variant else ''}", ""]
        sub = next((c for name, c in subs.items() if variant == name or variant.startswith(name + "-")), None)
        out += ([f"- {_setup_line(sub)}", ""] if sub else []) + main_table(summary) + [""]
        out += ["### Statistics over seeds", ""] + stats_table(summary, _available(summary, main)) + [""]
        if _gwa_study(cfg):
            gwa = ["test_acc@gwa", "test_acc@val", "test_acc@last", "gwa_spearman", "gwa_pearson", "auroc_flipped"]
            out += ["### GWA: epoch selection, correlation with test accuracy, flipped labels", "",
                    f"GWA epoch: {cfg['experiment']['gwa_mode']} rule (skip the first "
                    f"{cfg['experiment']['gwa_skip_fraction']:.0%} of epochs, argmax of GWA_T); val epoch: argmax "
                    "of validation accuracy (arms trained on the carved training split only); AUROC of the negative "
                    "mean alignment over epochs for 'label was flipped' (noisy runs only).", ""]
            out += selection_table(summary) + [""]
            if _available(summary, gwa[3:]):
                out += stats_table(summary, _available(summary, gwa[3:])) + [""]
        for name in plots.get(variant, []):
            out += [f"![{name}]({name})", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- entry point

def write_report(run_dir) -> dict:
    """Write evaluations.csv, summary.json, summary.md and the plots; return the summary dict."""
    run_dir = Path(run_dir)
    meta, runs = rundir.load_runs(run_dir)
    all_rows = [row for variant in runs.values() for seeds in variant.values()
                for _, rows in seeds.values() for row in rows]
    rundir.write_atomic(run_dir / "evaluations.csv", rundir.rows_to_csv(all_rows, rundir.file_columns()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # scipy on near-identical pairs; degenerate cases are nan
        summaries = {v: summarise_variant(meta, runs[v]) for v in runs}
    extra = _declared(meta["config"], "plots") + (["gwa"] if _gwa_study(meta["config"]) else [])
    plots = {v: plot_variant(run_dir, meta, v, runs[v], extra) if any(runs[v].values()) else [] for v in runs}
    tuning = rundir.load_tuning(run_dir)
    result = {"experiment": meta["config"]["name"], "description": meta["config"]["description"],
              "quick": meta["quick"], "storage": meta["storage"], "tuning": tuning, "variants": summaries,
              "plots": [p for names in plots.values() for p in names]}
    rundir.write_json(run_dir / "summary.json", result)
    rundir.write_atomic(run_dir / "summary.md", markdown(meta, summaries, plots) + "\n")
    log.info("report written: %s", (run_dir / "summary.md").resolve())
    return result
