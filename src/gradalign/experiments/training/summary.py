"""The summary of a finished run: final metrics, the GWA epoch choice and, under label noise, how
well the GWA alignment flags the flipped labels."""
from __future__ import annotations

import time

import numpy as np

from gradalign.errors import GradAlignError
from gradalign.experiments.stats import auroc

NAN = float("nan")


def run_summary(config, arm, p, seed, eval_split, rows, monitor, splits, train_set, optim, t0) -> dict:
    """Final metrics, the GWA epoch choice and, under label noise, how well alignment flags flips."""
    last = rows[-1]
    out = {"arm": arm.name, "method": arm.method, "seed": seed, "params": p, "eval_split": eval_split,
           "train_split": "train" if eval_split == "val" else arm.train_split, "train_size": len(train_set),
           "steps": optim.steps, "samples": last["samples"], "wall_time": time.perf_counter() - t0,
           "final": {k: last[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")}}
    try:
        out["gwa_epoch"] = monitor.best_epoch(config.experiment.gwa_mode, config.experiment.gwa_skip_fraction)
    except GradAlignError:
        out["gwa_epoch"] = None                 # no selectable epoch (every GWA_T nan)
    train_ids = train_set.ids.cpu().numpy()
    flipped = np.isin(train_ids, splits.flipped_ids.cpu().numpy())
    out["noise"] = {"kind": splits.noise_kind, "rate": splits.noise_rate, "flipped": int(flipped.sum())}
    if flipped.any() and not flipped.all():
        out["auroc_flipped"] = flip_auroc(monitor.sample_scores(), train_ids, flipped)
    return out


def flip_auroc(scores: dict, ids: np.ndarray, flipped: np.ndarray) -> dict:
    """AUROC of -alignment for 'label was flipped': mean score over all epochs, and last epoch."""
    order = np.argsort(ids)
    is_flipped = dict(zip(ids[order], flipped[order]))
    out = {}
    for key, keep in (("mean", np.ones(len(scores["epoch"]), bool)),
                      ("last", scores["epoch"] == scores["epoch"].max())):
        sid, sc = scores["sample_id"][keep], scores["score"][keep].astype(np.float64)
        uniq, inverse = np.unique(sid, return_inverse=True)
        mean = np.bincount(inverse, weights=sc) / np.bincount(inverse)
        labels = np.array([is_flipped[i] for i in uniq])
        ok = np.isfinite(mean)
        try:
            out[key] = auroc(-mean[ok], labels[ok])
        except ValueError:
            out[key] = NAN
    return out
