"""The report's tables in Markdown: ONE formatter for an estimate with its interval and for a
paired difference (`estimate`, `difference`), and the tables built from them."""
from __future__ import annotations

import math

from gradalign.experiments.report.metrics import EPOCH_CHOICES

LABELS = {
    "test_acc": "test acc", "test_loss": "test loss", "train_loss": "final train loss",
    "wall_time": "wall time (s)", "samples_per_step": "samples per step", "acc_std_last": "acc std, last evals",
    "zero_weight_frac": "zero-weight fraction", "weight_entropy": "weight entropy",
    "test_acc@gwa": "test acc at GWA epoch", "test_acc@val": "test acc at val epoch",
    "test_acc@last": "test acc at last epoch", "gwa_spearman": "Spearman(GWA, test acc)",
    "gwa_pearson": "Pearson(GWA, test acc)", "auroc_flipped": "AUROC flipped labels",
    "flipped_acc_noisy": "flipped samples: acc w.r.t. noisy label", "flipped_acc_clean":
    "flipped samples: acc w.r.t. clean label", "clean_train_acc": "acc on the samples not flipped",
}
PERCENT = {"test_acc", "test_acc@gwa", "test_acc@val", "test_acc@last", "acc_std_last", "flipped_acc_noisy",
           "flipped_acc_clean", "clean_train_acc", "flipped_share"}




def _scaled(metric: str) -> tuple[float, str]:
    return (100.0, " pp") if metric in PERCENT else (1.0, "")


def fmt(value: float, metric: str) -> str:
    """One number: a percentage with two decimals for accuracies and rates, else 4 significant digits."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.2f}%" if metric in PERCENT else f"{value:.4g}"


def estimate(s: dict | None, metric: str) -> str:
    """'61.12% [59.00%, 63.24%]': the mean [95% interval] of a stat (metrics.stat); '-' when empty."""
    if not s or not s.get("n"):
        return "-"
    text = fmt(s["mean"], metric)
    if math.isfinite(s["lo"]):
        text += f" [{fmt(s['lo'], metric)}, {fmt(s['hi'], metric)}]"
    return text


def difference(d: dict | None, metric: str) -> tuple[str, str]:
    """('+1.5 pp [+0.3, +2.7]', p) of a paired difference (stats.paired_difference); ('-', '-') when empty."""
    if not d or not d.get("n"):
        return "-", "-"
    scale, unit = _scaled(metric)
    text = f"{scale * d['mean']:+.3g}{unit}"
    if math.isfinite(d["lo"]):
        text += f" [{scale * d['lo']:+.3g}, {scale * d['hi']:+.3g}]"
    return text, ("-" if not math.isfinite(d["p_value"]) else f"{d['p_value']:.3g}")


def params_text(entry: dict) -> str:
    shown = entry["tuned"] or {k: v for k, v in entry["params"].items() if k in ("lr", "gamma", "tau", "alpha")}
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()) or "-"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main_table(summary: dict) -> list[str]:
    """The seeds' layout: mode, tuned parameters, test accuracy, final training loss."""
    rows = []
    for entry in summary["arms"].values():
        m = entry["metrics"]
        rows.append([entry["label"], params_text(entry), estimate(m.get("test_acc"), "test_acc"),
                     estimate(m.get("train_loss"), "train_loss"), str(len(entry["seeds"]))])
    return table(["mode", "tuned (or fixed)", "test acc", "final train loss", "seeds"], rows)


def stats_table(summary: dict, metrics: list[str]) -> list[str]:
    ref = summary["reference"]
    rows = []
    for metric in metrics:
        for name, entry in summary["arms"].items():
            s = entry["metrics"].get(metric)
            if not s or not s.get("n"):
                continue
            d, p = difference(s.get("diff"), metric)
            rows.append([LABELS.get(metric, metric), entry["label"], estimate(s, metric), d if name != ref else "(reference)", p])
    return table(["metric", "arm", "mean [95% CI]", f"minus {summary['arms'][ref]['label']} [95% CI]", "p"], rows)


def selection_table(summary: dict) -> list[str]:
    sel = summary["selection"]
    ref = sel["reference"]
    labels = {name: e["label"] for name, e in summary["arms"].items()}
    ref_choice = dict(EPOCH_CHOICES)[ref["metric"]]
    rows = []
    for r in sel["rows"]:
        d, p = difference(r.get("diff"), "test_acc")
        is_ref = (r["arm"], r["metric"]) == (ref["arm"], ref["metric"])
        rows.append([labels[r["arm"]], r["rule"], estimate(r, "test_acc"), "(reference)" if is_ref else d,
                     "-" if is_ref else p])
    return table(["arm", "epoch chosen by", "test acc [95% CI]",
                  f"minus {labels[ref['arm']]}, {ref_choice} [95% CI]", "p"], rows)


def difference_cell(d: dict | None, metric: str) -> str:
    """A paired difference and its p in one cell: '+1.5 pp [+0.3, +2.7], p 0.012'."""
    text, p = difference(d, metric)
    return text if p == "-" else f"{text}, p {p}"
