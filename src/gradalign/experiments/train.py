"""One training loop for every arm, evaluated by epochs or by samples consumed.

    result = train_run(config, arm, params, seed, splits, eval_split="test")
    result.rows      # one dict per evaluation (COLUMNS)
    result.summary   # params, final metrics, GWA epoch choice, label-noise AUROC, timings

Arms differ only in their step (one small class each): baseline (mean loss backward),
gasw/gdsw (engine.backward with GASW/GDSW weights), gaga (increments fed to a
GSNRAccumulator; the optimizer steps when it says so), gvr/two_view (two augmented views
and the GVR loss; two_view is alpha = 0). The GWA monitor is on in every run and reads the
head weight before each optimizer step.

Seeds are paired across arms: ``seed`` alone decides the initialisation, the data order
(a generator used for nothing else), the augmentations and GVR's subsets (one generator
each), so arms with the same seed start from the same weights and see the same batches.
GAGA consumes the same order in increments, so it sees the same samples in the same order.

eval_split="val" (tuning): train on ``splits.train``, evaluate train and val; the test set
is never touched. eval_split="test" (final runs): train on the arm's ``train_split``
(``train_full`` by default), evaluate train and test, and val too when training on ``train``.
A GWA "epoch" is the stretch of training between two evaluations: one epoch when
evaluating every epoch. An evaluation happens after the first batch that reaches a
multiple of the interval in samples consumed (exactly at the multiple when the interval is
a multiple of the batch size, as in the bundled experiments), and at the end of the
budget; for GAGA the samples of an unfinished accumulation count as consumed (the model
has not stepped on them yet), so every arm is evaluated at the same points.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from gradalign.errors import GradAlignError
from gradalign.experiments import data as data_mod
from gradalign.experiments import stats as stats_mod
from gradalign.experiments.config import ArmConfig, ExperimentConfig
from gradalign.experiments.models import build_model

COLUMNS = ("arm", "seed", "epoch", "samples", "step", "train_loss", "train_acc", "val_loss", "val_acc",
           "test_loss", "test_acc", "gwa", "mean_alignment", "samples_per_step", "zero_weight_frac",
           "weight_entropy", "fallbacks", "penalty", "lr", "wall_time")
NAN = float("nan")


class TrainingDiverged(GradAlignError):
    """The loss or the parameters became non-finite (usually: the learning rate is too high)."""


@dataclass
class RunResult:
    rows: list[dict]
    summary: dict = field(default_factory=dict)


def resolve_params(config: ExperimentConfig, arm: ArmConfig, params: dict | None = None) -> dict:
    """Every setting a run uses: [train] defaults < arm params < tuned params."""
    t = config.train
    out = {"lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay, "batch_size": t.batch_size,
           "augment": arm.method in ("gvr", "two_view")}
    if arm.method in ("gasw", "gdsw"):
        out.update(gamma=2.0, leave_one_out=False)
    elif arm.method == "gaga":
        out.update(tau=1.0, increment=32, max_samples=512, rule="mean_snr")
    elif arm.method in ("gvr", "two_view"):
        out.update(alpha=0.01 if arm.method == "gvr" else 0.0, gvr_mode="auto", gvr_layers="head", subset=32)
    out.update(arm.params)
    out.update(params or {})
    return out


# ---------------------------------------------------------------- steps, one class per method

class _Optim:
    """The base optimizer with an optional cosine schedule over the sample budget."""

    def __init__(self, model: nn.Module, config: ExperimentConfig, p: dict, budget: int):
        kw = dict(lr=p["lr"], weight_decay=p["weight_decay"])
        if config.train.optimizer == "sgd":
            self.opt = torch.optim.SGD(model.parameters(), momentum=p["momentum"], **kw)
        else:
            self.opt = torch.optim.Adam(model.parameters(), **kw)
        self.base_lr, self.cosine, self.budget = p["lr"], config.train.schedule == "cosine", budget
        self.steps = 0
        self.lr = p["lr"]

    def step(self, samples_done: int) -> None:
        if self.cosine:
            self.lr = self.base_lr * 0.5 * (1 + math.cos(math.pi * min(samples_done / self.budget, 1.0)))
            for group in self.opt.param_groups:
                group["lr"] = self.lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1


class _Step:
    """One training step of an arm on a batch; subclasses differ in how p.grad is formed.

    __call__(x, y, ids, samples_done) -> sum of the batch's training losses (a float).
    window() -> the arm's diagnostics since the previous call (means over steps).
    """

    batch_size_key = "batch_size"

    def __init__(self, model, optim: _Optim, monitor, p: dict, aug_gen: torch.Generator):
        self.model, self.optim, self.monitor, self.p, self.aug_gen = model, optim, monitor, p, aug_gen
        self.pending = 0                      # samples accumulated but not yet stepped on
        self._step_sizes: list[int] = []

    def _view(self, x):
        return data_mod.augment(x, self.aug_gen) if self.p["augment"] else x

    def _stepped(self, n: int, samples_done: int) -> None:
        self.optim.step(samples_done)
        self._step_sizes.append(n)

    def flush(self, samples_done: int) -> None:
        """Step on whatever is accumulated at the end of the budget."""

    def window(self) -> dict:
        sizes, self._step_sizes = self._step_sizes, []
        return {"samples_per_step": float(np.mean(sizes)) if sizes else NAN}

    def close(self) -> None:
        pass


class _Plain(_Step):
    def __call__(self, x, y, ids, samples_done):
        logits = self.model(self._view(x))
        losses = F.cross_entropy(logits, y, reduction="none")
        losses.mean().backward()
        self.monitor.update(logits.detach(), y, ids)
        self._stepped(len(y), samples_done)
        return float(losses.detach().sum())


class _Weighted(_Step):
    """GASW/GDSW: one engine backward with per-sample weights from the gradient cosines."""

    def __init__(self, *args, method: str):
        super().__init__(*args)
        cls = ga.GASW if method == "gasw" else ga.GDSW
        self.weighting = cls(self.p["gamma"], leave_one_out=self.p["leave_one_out"])
        self.engine = ga.PerSampleGradients(self.model)
        self._zero, self._entropy = [], []

    def __call__(self, x, y, ids, samples_done):
        logits = self.model(self._view(x))
        losses = F.cross_entropy(logits, y, reduction="none")
        self.engine.backward(losses, weights=self.weighting)
        self._zero.append(self.weighting.last_zero_fraction)
        self._entropy.append(self.weighting.last_entropy)
        self.monitor.update(logits.detach(), y, ids)
        self._stepped(len(y), samples_done)
        return float(losses.detach().sum())

    def window(self):
        out = super().window()
        out.update(zero_weight_frac=float(np.mean(self._zero)) if self._zero else NAN,
                   weight_entropy=float(np.mean(self._entropy)) if self._entropy else NAN,
                   fallbacks=self.weighting.fallbacks)
        self._zero, self._entropy = [], []
        return out

    def close(self):
        self.engine.remove()


class _Accumulate(_Step):
    """GAGA: increments of `increment` samples until the GSNR rule passes or max_samples."""

    batch_size_key = "increment"

    def __init__(self, *args):
        super().__init__(*args)
        self.acc = ga.GSNRAccumulator(self.p["tau"], increment=self.p["increment"],
                                      max_samples=self.p["max_samples"], rule=self.p["rule"])
        self.engine = ga.PerSampleGradients(self.model)

    def __call__(self, x, y, ids, samples_done):
        logits = self.model(self._view(x))
        losses = F.cross_entropy(logits, y, reduction="none")
        stats = self.engine.backward(losses, write_grad=False)
        self.monitor.update(logits.detach(), y, ids)
        self.pending += len(y)
        if self.acc.update(stats):          # p.grad = mean over the accumulated samples
            self.engine.set_grad(self.acc.mean_grad())
            self._stepped(self.pending, samples_done)
            self.pending = 0
        return float(losses.detach().sum())

    def flush(self, samples_done):
        if self.pending:                    # step on the partial mean
            self.engine.set_grad(self.acc.mean_grad())
            self._stepped(self.pending, samples_done)
            self.pending = 0

    def close(self):
        self.engine.remove()


def _gvr_layers(model: nn.Module, which: str) -> list[nn.Module]:
    if which == "head":
        return [model.head]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-2:]                     # "last_stage": the last hidden Linear and the head


class _TwoView(_Step):
    """GVR (alpha > 0) or the two-view control (alpha = 0): CE(view1) + CE(view2) + alpha * penalty.

    The GWA monitor scores the second view, the head's latest training forward.
    """

    def __init__(self, *args, gvr_gen: torch.Generator):
        super().__init__(*args)
        p = self.p
        self.gvr = ga.GVR(p.get("alpha", 0.0), layers=_gvr_layers(self.model, p["gvr_layers"]),
                          subset=p["subset"], mode=p["gvr_mode"], generator=gvr_gen)
        self._penalty = []

    def __call__(self, x, y, ids, samples_done):
        x1, x2 = data_mod.augment(x, self.aug_gen), data_mod.augment(x, self.aug_gen)
        total, info = self.gvr.loss(self.model, x1, x2, y)
        total.backward()
        self.monitor.update(info["logits2"], y, ids)
        self._penalty.append(info["penalty"])
        self._stepped(len(y), samples_done)
        return (info["loss1"] + info["loss2"]) * len(y)

    def window(self):
        out = super().window()
        out["penalty"] = float(np.mean(self._penalty)) if self._penalty else NAN
        self._penalty = []
        return out


def _make_step(method, model, optim, monitor, p, gens) -> _Step:
    args = (model, optim, monitor, p, gens["augment"])
    if method in ("gasw", "gdsw"):
        return _Weighted(*args, method=method)
    if method == "gaga":
        return _Accumulate(*args)
    if method in ("gvr", "two_view"):
        return _TwoView(*args, gvr_gen=gens["gvr"])
    return _Plain(*args)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on a whole split (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return loss / len(split), correct / len(split)


def _generators(seed: int) -> dict[str, torch.Generator]:
    """Independent generators for data order, augmentation and GVR subsets, all from `seed`."""
    states = np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)
    return {k: torch.Generator().manual_seed(int(s) & (2**63 - 1)) for k, s in zip(("order", "augment", "gvr"), states)}


def _check_finite(model: nn.Module, where: str) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged(f"{where}: parameter {name} is no longer finite; lower the learning rate")


# ---------------------------------------------------------------- the loop

def train_run(config: ExperimentConfig, arm: ArmConfig, params: dict | None, seed: int, splits, *,
              eval_split: str = "test", on_eval: Callable[[dict], None] | None = None,
              progress=None) -> RunResult:
    """Train one arm with one seed and evaluate it along the way.

    Args:
        config, arm: the experiment and the arm (method and fixed parameters).
        params: tuned values (lr, gamma, ...) that override the arm's; None for none.
        seed: decides initialisation, data order, augmentations and GVR subsets.
        splits: a data.Splits.
        eval_split: "val" (tuning: train on splits.train, never look at test) or "test".
        on_eval: called with each evaluation row as it is made; it may raise (e.g.
            optuna.TrialPruned) to stop the run.
        progress: a tqdm-like bar; it is advanced by the samples consumed.
    Returns:
        RunResult(rows, summary).
    Raises:
        TrainingDiverged: a non-finite loss or parameter.
    """
    if eval_split not in ("val", "test"):
        raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    p = resolve_params(config, arm, params)
    train_set = splits.train if eval_split == "val" else getattr(splits, arm.train_split)
    evals = {"train": train_set,
             "val": splits.val if eval_split == "val" or arm.train_split == "train" else None,
             "test": splits.test if eval_split == "test" else None}
    n = len(train_set)
    budget, interval = config.train.budget(n), config.train.eval_interval(n)
    gens = _generators(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model.kind, hidden=config.model.hidden, **config.model.options)
    model.train()
    optim = _Optim(model, config, p, budget)
    monitor = ga.GWAMonitor(model.head)
    step = _make_step(arm.method, model, optim, monitor, p, gens)
    bs = p[step.batch_size_key]
    where = f"arm {arm.name!r} seed {seed} ({', '.join(f'{k}={v:.4g}' for k, v in p.items() if isinstance(v, float))})"
    rows: list[dict] = []
    samples, next_eval, epoch_count, t0 = 0, interval, 0, time.perf_counter()

    def record() -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # unselectable GWA epochs are nan, kept in the row
            gwa = monitor.end_epoch()
        row = dict.fromkeys(COLUMNS, NAN)
        row.update(arm=arm.name, seed=seed, samples=samples, step=optim.steps, gwa=gwa,
                   epoch=samples // n if samples % n == 0 else samples / n, mean_alignment=monitor.epoch_mean_alignment[-1], lr=optim.lr)
        row.update(step.window())
        _check_finite(model, where)
        for name, split in evals.items():
            if split is not None:
                row[f"{name}_loss"], row[f"{name}_acc"] = evaluate(model, split)
        if not math.isfinite(row["train_loss"]):
            raise TrainingDiverged(f"{where}: the training loss is {row['train_loss']}; lower the learning rate")
        row["wall_time"] = time.perf_counter() - t0
        rows.append(row)
        return row

    try:
        while samples < budget:
            epoch_count += 1
            for x, y, ids in data_mod.batches(train_set, bs, gens["order"]):
                if samples + len(y) > budget:
                    x, y, ids = x[:budget - samples], y[:budget - samples], ids[:budget - samples]
                loss_sum = step(x, y, ids, samples + len(y))
                samples += len(y)
                if not math.isfinite(loss_sum):
                    raise TrainingDiverged(f"{where}: the loss became {loss_sum} after {samples} samples; "
                                           "lower the learning rate")
                if progress is not None:
                    progress.update(len(y))
                if samples >= budget:
                    step.flush(samples)
                if samples >= next_eval or samples >= budget:   # GAGA: mid-accumulation is fine
                    row = record()
                    next_eval = (samples // interval + 1) * interval
                    if on_eval is not None:
                        on_eval(row)
                if samples >= budget:
                    break
        summary = _summary(config, arm, p, seed, eval_split, rows, monitor, splits, train_set, optim, t0)
    finally:
        step.close()
        monitor.remove()
    return RunResult(rows, summary)


def _summary(config, arm, p, seed, eval_split, rows, monitor, splits, train_set, optim, t0) -> dict:
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
    flipped = np.isin(train_set.ids.numpy(), splits.flipped_ids.numpy())
    if flipped.any() and not flipped.all():
        out["auroc_flipped"] = _flip_auroc(monitor.sample_scores(), train_set.ids.numpy(), flipped)
    return out


def _flip_auroc(scores: dict, ids: np.ndarray, flipped: np.ndarray) -> dict:
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
            out[key] = stats_mod.auroc(-mean[ok], labels[ok])
        except ValueError:
            out[key] = NAN
    return out
