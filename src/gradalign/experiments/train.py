"""One training loop for every arm, evaluated by epochs or by samples consumed.

    result = train_run(config, arm, params, seed, splits, eval_split="test")
    result.rows      # one dict per evaluation (rundir.columns())
    result.summary   # params, final metrics, GWA epoch choice, label noise and memorisation, timings
    result.records   # per-sample records of steps that keep them (signals.py), else {}

Arms differ only in their step (steps.py, chosen by the method table in arms.py): baseline
(mean loss backward), gasw/gdsw (engine.backward with GASW/GDSW weights), gaga (increments
fed to a GSNRAccumulator; the optimizer steps when it says so), gvr/two_view (two augmented
views and the GVR loss; two_view is alpha = 0). The GWA monitor is on in every run and
reads the head weight before each optimizer step.

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

Device (device.py): the data set is moved to the device once and every batch is transformed
there by its pipeline (augment.py); the model is built on the CPU from ``seed`` and moved, in
channels_last for convnets on a GPU; the forward runs under bf16 autocast where [train]
precision says so. Generators stay on the CPU.

Checkpoints (checkpoint.py, final runs only): after every evaluation the run's whole state
is saved; ``train_run`` given a checkpoint that holds a state resumes from it: the data
order of the epoch in progress is replayed from its generator state and the batches already
trained on are skipped, so on the CPU a resumed run ends with the same numbers as an
uninterrupted one. A GAGA step in the middle of an accumulation is not saved (the next
evaluation's is).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradalign as ga
from gradalign.errors import GradAlignError
from gradalign.experiments import checkpoint as ckpt_mod
from gradalign.experiments import data as data_mod
from gradalign.experiments import device as device_mod
from gradalign.experiments import noise
from gradalign.experiments.arms import METHODS
from gradalign.experiments.augment import pipeline_for
from gradalign.experiments.config import ArmConfig, ExperimentConfig, resolve_params
from gradalign.experiments.intervals import auroc
from gradalign.experiments.models import build_model
from gradalign.experiments.parallel import Parallel
from gradalign.experiments.rundir import columns
from gradalign.experiments.steps import Optimizer
NAN = float("nan")


class TrainingDiverged(GradAlignError):
    """The loss or the parameters became non-finite (usually: the learning rate is too high)."""


@dataclass
class RunResult:
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def logits_of(model: nn.Module, split, batch_size: int = 2048, *, prepare=None,
              autocast=None) -> Iterator[tuple[Tensor, Tensor]]:
    """(logits, y) of a whole split, batch by batch, in eval mode without gradients (the
    model's mode is restored once the split is done).

    prepare: stored inputs -> model inputs (a pipeline's prepare; default: as stored);
    autocast: a callable giving the forward's context (default: none).
    """
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(split), batch_size):
            x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
            if prepare is not None:
                x = prepare(x)
            with (autocast or contextlib.nullcontext)():
                logits = model(x)
            yield logits, y
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, split, batch_size: int = 2048, *, prepare=None, autocast=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on a whole split (see logits_of)."""
    loss, correct = 0.0, 0
    for logits, y in logits_of(model, split, batch_size, prepare=prepare, autocast=autocast):
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
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
              progress=None, device=None, checkpoint: ckpt_mod.RunCheckpoint | None = None,
              parallel: Parallel | None = None) -> RunResult:
    """Train one arm with one seed and evaluate it along the way.

    Args:
        config, arm: the experiment and the arm (method and fixed parameters).
        params: tuned values (lr, gamma, ...) that override the arm's; None for none.
        seed: decides initialisation, data order, augmentations and GVR subsets.
        splits: a data.Splits (moved to the device here unless it is there already).
        eval_split: "val" (tuning: train on splits.train, never look at test) or "test".
        on_eval: called with each evaluation row as it is made; it may raise (e.g.
            optuna.TrialPruned) to stop the run.
        progress: a tqdm-like bar; it is advanced by the samples consumed.
        device: "cpu" (default), "cuda", "auto" or a torch.device (device.py).
        checkpoint: saved after every evaluation; when it holds a state, the run resumes from it.
        parallel: data parallel (parallel.py): every rank trains on its shard of the same
            global batches; the rows and summary are the same on every rank.
    Returns:
        RunResult(rows, summary); summary["resumed_from"] is the sample count it resumed at (0: none).
    Raises:
        TrainingDiverged: a non-finite loss or parameter.
    """
    if eval_split not in ("val", "test"):
        raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    dev = device_mod.resolve_device(device)
    p = resolve_params(config, arm, params)
    splits = splits.to(dev)
    train_set = splits.train if eval_split == "val" else getattr(splits, arm.train_split)
    evals = {"train": train_set,
             "val": splits.val if eval_split == "val" or arm.train_split == "train" else None,
             "test": splits.test if eval_split == "test" else None}
    n = len(train_set)
    budget, interval = config.train.budget(n), config.train.eval_interval(n)
    gens = _generators(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config.model.kind, hidden=config.model.hidden, num_classes=splits.num_classes,
                            **config.model.options)
    channels_last = dev.type == "cuda" and getattr(model, "channels_last", False)
    model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    model.train()
    net = model                                  # what the step trains: the model, or its DDP wrapper
    if parallel is not None:
        net = nn.parallel.DistributedDataParallel(model, process_group=parallel.group, broadcast_buffers=False)
    optim = Optimizer(net, config.train.optimizer, config.train.schedule, p, budget, epoch_size=n)
    monitor = ga.GWAMonitor(model.head, process_group=parallel.group if parallel is not None else None)
    pipeline = pipeline_for(config.data, channels_last=channels_last)
    step = METHODS[arm.method].step(net, optim, monitor, p, gens, pipeline)
    step.world = parallel.world if parallel is not None else 1
    step.autocast = device_mod.autocast(dev, config.train.precision)
    bs = step.batch_size
    cols = columns()
    where = f"arm {arm.name!r} seed {seed} ({', '.join(f'{k}={v:.4g}' for k, v in p.items() if isinstance(v, float))})"
    rows: list[dict] = []
    samples, next_eval, skip, elapsed = 0, interval, 0, 0.0
    state = checkpoint.load(dev) if checkpoint is not None else None
    if state is not None:                  # resume: everything as it was right after that evaluation
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        step.load_state_dict(state["step"])
        monitor.load_state_dict(state["monitor"])
        for name, g in gens.items():
            g.set_state(state["generators"][name])
        gens["order"].set_state(state["order_epoch_start"])     # replay this epoch's order ...
        ckpt_mod.set_rng_state(state["rng"])
        rows, samples, next_eval = state["rows"], state["samples"], state["next_eval"]
        skip, elapsed = state["epoch_pos"], state["elapsed"]    # ... skipping what was trained on
        if progress is not None:
            progress.update(samples)
    resumed_from = samples
    t0 = time.perf_counter() - elapsed

    def record() -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # unselectable GWA epochs are nan, kept in the row
            gwa = monitor.end_epoch()
        row = dict.fromkeys(cols, NAN)
        row.update(arm=arm.name, seed=seed, samples=samples, step=optim.steps, gwa=gwa,
                   epoch=samples // n if samples % n == 0 else samples / n, mean_alignment=monitor.epoch_mean_alignment[-1], lr=optim.lr)
        row.update(step.window())
        _check_finite(model, where)
        for name, split in evals.items():
            if split is not None:
                row[f"{name}_loss"], row[f"{name}_acc"] = evaluate(model, split, prepare=pipeline.prepare,
                                                                   autocast=step.autocast)
        if not math.isfinite(row["train_loss"]):
            raise TrainingDiverged(f"{where}: the training loss is {row['train_loss']}; lower the learning rate")
        row["wall_time"] = time.perf_counter() - t0
        rows.append(row)
        return row

    def save(order_epoch_start: torch.Tensor, epoch_pos: int) -> None:
        step_state = step.state_dict()
        if checkpoint is None or step_state is None or samples >= budget:
            return
        checkpoint.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step_state,
                         "generators": {k: g.get_state() for k, g in gens.items()},
                         "order_epoch_start": order_epoch_start, "epoch_pos": epoch_pos, "rng": ckpt_mod.rng_state(),
                         "rows": rows, "samples": samples, "next_eval": next_eval,
                         "elapsed": time.perf_counter() - t0}, monitor.state_dict())

    try:
        with device_mod.gpu_settings(dev):
            while samples < budget:
                order_epoch_start, epoch_pos = gens["order"].get_state(), 0
                for x, y, ids in data_mod.batches(train_set, bs, gens["order"]):
                    epoch_pos += len(y)
                    if skip:                    # resuming: this batch was trained on before the checkpoint
                        skip -= len(y)
                        continue
                    if samples + len(y) > budget:
                        x, y, ids = x[:budget - samples], y[:budget - samples], ids[:budget - samples]
                    n_batch = len(y)
                    if parallel is None:
                        loss_sum = step(x, y, ids, samples + n_batch)
                    else:                        # this rank's shard; the loss summed over ranks
                        x, y, ids = parallel.shard(x), parallel.shard(y), parallel.shard(ids)
                        loss_sum = parallel.sum(step(x, y, ids, samples + n_batch, batch_total=n_batch))
                    samples += n_batch
                    if not math.isfinite(loss_sum):
                        raise TrainingDiverged(f"{where}: the loss became {loss_sum} after {samples} samples; "
                                               "lower the learning rate")
                    if progress is not None:
                        progress.update(n_batch)
                    if samples >= budget:
                        step.finish(samples)
                    if samples >= next_eval or samples >= budget:   # GAGA: mid-accumulation is fine
                        row = record()
                        next_eval = (samples // interval + 1) * interval
                        if on_eval is not None:
                            on_eval(row)
                        save(order_epoch_start, epoch_pos)
                    if samples >= budget:
                        break
        summary = _summary(config, arm, p, seed, eval_split, rows, monitor, splits, train_set, optim, t0)
        pred = torch.cat([logits.argmax(1) for logits, _ in
                          logits_of(model, train_set, prepare=pipeline.prepare, autocast=step.autocast)])
        summary["memorisation"] = noise.memorisation(pred.cpu().numpy(), splits, train_set)
        summary["resumed_from"] = resumed_from
        records = step.records()
        if records:
            records.update(noise.label_records(records["sample_id"], splits))
    finally:
        step.close()
        monitor.remove()
    return RunResult(rows, summary, records)


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
    train_ids = train_set.ids.cpu().numpy()
    flipped = np.isin(train_ids, splits.flipped_ids.cpu().numpy())
    out["noise"] = {"kind": splits.noise_kind, "rate": splits.noise_rate, "flipped": int(flipped.sum())}
    if flipped.any() and not flipped.all():
        out["auroc_flipped"] = _flip_auroc(monitor.sample_scores(), train_ids, flipped)
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
            out[key] = auroc(-mean[ok], labels[ok])
        except ValueError:
            out[key] = NAN
    return out
