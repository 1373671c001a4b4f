"""The report of a run folder: summary.md, summary.json, evaluations.csv and PNG figures.

``write_report(run_dir)`` reads only the folder (run_folder.load_runs), so it works on a
finished run, on an interrupted one (whatever seeds exist), and from ``gradalign report DIR``.
Which extra metrics and figures an arm gets is declared by its method (method_table.METHODS).

Statistics are over the final seeds: mean and 95% Student t interval; each arm against the
reference arm (``[final] reference``, default the first) as the paired difference over the
seeds both have (same seed = same initialisation and data order), with its 95% interval
and the paired t-test p-value (metrics.py). Curves show the mean over seeds with a band of one
standard deviation (figures.py). Under label noise noise_section.py adds a section: every method
across noise levels, which per-sample signal finds the flipped labels, and clean-and-retrain.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from gradalign.experiments import run_folder
from gradalign.experiments.data.label_noise import describe
from gradalign.experiments.method_table import METHODS, file_columns
from gradalign.experiments.report import noise_section
from gradalign.experiments.report.figures import plot_variant
from gradalign.experiments.report.metrics import summarise_variant
from gradalign.experiments.report.tables import main_table, selection_table, stats_table

log = logging.getLogger("gradalign")


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


def markdown(meta: dict, summaries: dict, plots: dict, extra: list[str] = ()) -> str:
    cfg = meta["config"]
    tune = cfg["tune"]
    subs = {v["variant"]: v for v in cfg.get("variant_configs", ())}
    out = [f"# {cfg['name']}", "", cfg["description"], "",
           f"- {_setup_line(cfg) if not subs else 'variants: ' + ', '.join(subs)}",
           f"- tuning: Optuna TPE, {tune['trials']} trials per tuned arm on the validation split, objective "
           f"{tune['objective']} validation accuracy; storage {meta['storage']}",
           f"- final runs: {cfg['final']['seeds']} seeds from {cfg['final']['first_seed']}, trained on the full "
           "training set unless stated, paired across arms; intervals are 95% Student t (for accuracies and "
           "rates clipped to [0, 1], their differences to [-1, 1]), p from the paired t-test",
           f"- quick mode: {'yes' if meta['quick'] else 'no'}", ""]
    main = ["test_acc", "train_loss", "test_loss", "wall_time", "flipped_acc_noisy", "flipped_acc_clean",
            "clean_train_acc"] + _declared(cfg, "report_metrics")
    for variant, summary in summaries.items():
        title = describe(variant)
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
    return "\n".join(out + list(extra))


def write_report(run_dir) -> dict:
    """Write evaluations.csv, summary.json, summary.md and the plots; return the summary dict."""
    run_dir = Path(run_dir)
    meta, runs = run_folder.load_runs(run_dir)
    all_rows = [row for variant in runs.values() for seeds in variant.values()
                for _, rows in seeds.values() for row in rows]
    run_folder.write_atomic(run_dir / "evaluations.csv", run_folder.rows_to_csv(all_rows, file_columns()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # scipy on near-identical pairs; degenerate cases are nan
        summaries = {v: summarise_variant(meta, runs[v]) for v in runs}
    extra = _declared(meta["config"], "plots") + (["gwa"] if _gwa_study(meta["config"]) else [])
    plots = {v: plot_variant(run_dir, meta, v, runs[v], extra) if any(runs[v].values()) else [] for v in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        noise_md, noise_json, noise_plots = noise_section.write(run_dir, meta, runs, summaries)
    tuning = run_folder.load_tuning(run_dir)
    result = {"experiment": meta["config"]["name"], "description": meta["config"]["description"],
              "quick": meta["quick"], "storage": meta["storage"], "tuning": tuning, "variants": summaries,
              "plots": [p for names in plots.values() for p in names] + noise_plots, "noise": noise_json}
    run_folder.write_json(run_dir / "summary.json", result)
    run_folder.write_atomic(run_dir / "summary.md", markdown(meta, summaries, plots, noise_md) + "\n")
    log.info("report written: %s", (run_dir / "summary.md").resolve())
    return result
