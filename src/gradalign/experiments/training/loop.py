"""One training loop for every arm, evaluated by epochs or by samples consumed.

The loop is a small recipe (`TrainingRun`): setup (model, optimizer, monitor, step), resume
(from a checkpoint), the epochs (batches -> step), evaluate (one row), save (a checkpoint) and
finish (the summary and records); `train_run` runs it.

    result = train_run(config, arm, params, seed, splits, eval_split="test")
    result.rows      # one dict per evaluation (method_table.evaluation_columns())
    result.summary   # params, final metrics, GWA epoch choice, label noise and memorisation, timings
    result.records   # per-sample records of steps that keep them (method_table/recording.py), else {}

Arms differ only in their step (method_table/steps.py, chosen by the method table): baseline
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
there by its pipeline (data/pipelines.py); the model is built on the CPU from ``seed`` and moved, in
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

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

import gradalign as ga
from gradalign.errors import GradAlignError
from gradalign.experiments.config import ArmConfig, ExperimentConfig, resolve_params
from gradalign.experiments.data import batches, pipeline_for
from gradalign.experiments.label_noise import label_records, memorisation
from gradalign.experiments.method_table import METHODS, evaluation_columns
from gradalign.experiments.models import build_model
from gradalign.experiments.training import checkpoint as ckpt_mod
from gradalign.experiments.training import device as device_mod
from gradalign.experiments.training.evaluation import evaluate, logits_of
from gradalign.experiments.training.optimizer import Optimizer
from gradalign.experiments.training.parallel import Parallel, wrap
from gradalign.experiments.training.summary import run_summary

NAN = float("nan")


class TrainingDiverged(GradAlignError):
    """The loss or the parameters became non-finite (usually: the learning rate is too high)."""


@dataclass
class RunResult:
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)


def generators(seed: int) -> dict[str, torch.Generator]:
    """Independent generators for data order, augmentation and GVR subsets, all from `seed`."""
    states = np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)
    return {k: torch.Generator().manual_seed(int(s) & (2**63 - 1)) for k, s in zip(("order", "augment", "gvr"), states)}


def check_finite(model: nn.Module, where: str, parallel: Parallel | None = None) -> None:
    """Every parameter finite (a sharded one on every rank: the ranks decide together)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(ga.distributed.local_part(p)).all()]
    if parallel is not None and parallel.sharded and parallel.sum(len(bad)) and not bad:
        bad = ["on another rank"]
    if bad:
        raise TrainingDiverged(f"{where}: parameter {bad[0]} is no longer finite; lower the learning rate")


class TrainingRun:
    """One arm trained with one seed: the recipe `train_run` runs (see the module docstring).

    State: the model (and `net`, its DDP wrapper in a data-parallel run), the optimizer, the GWA
    monitor, the method's step and the generators; `rows` so far, `samples` consumed, the sample
    count of the next evaluation, and `skip` (samples of the epoch in progress already trained
    on before a checkpoint: skipped when resuming).
    """

    def __init__(self, config: ExperimentConfig, arm: ArmConfig, params: dict | None, seed: int, splits, *,
                 eval_split: str, device=None, parallel: Parallel | None = None):
        if eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
        self.config, self.arm, self.seed, self.eval_split, self.parallel = config, arm, seed, eval_split, parallel
        self.device = dev = device_mod.resolve_device(device)
        self.p = p = resolve_params(config, arm, params)
        self.splits = splits = splits.to(dev)
        self.train_set = splits.train if eval_split == "val" else getattr(splits, arm.train_split)
        self.evals = {"train": self.train_set,
                      "val": splits.val if eval_split == "val" or arm.train_split == "train" else None,
                      "test": splits.test if eval_split == "test" else None}
        self.n = n = len(self.train_set)
        self.budget, self.interval = config.train.budget(n), config.train.eval_interval(n)
        self.generators = generators(seed)
        self.model, self.net, channels_last = self._build_model()
        self.optim = Optimizer(self.net, config.train.optimizer, config.train.schedule, p, self.budget, epoch_size=n)
        self.monitor = ga.GWAMonitor(self.model.head, process_group=parallel.group if parallel is not None else None)
        self.pipeline = pipeline_for(config.data, channels_last=channels_last)
        self.step = METHODS[arm.method].step(self.net, self.optim, self.monitor, p, self.generators, self.pipeline)
        self.step.world = parallel.world if parallel is not None else 1
        self.step.autocast = device_mod.autocast(dev, config.train.precision)
        self.columns = evaluation_columns()
        self.where = f"arm {arm.name!r} seed {seed} ({', '.join(f'{k}={v:.4g}' for k, v in p.items() if isinstance(v, float))})"
        self.rows: list[dict] = []
        self.samples, self.next_eval, self.skip, self.elapsed = 0, self.interval, 0, 0.0
        self.resumed_from = 0
        self.t0 = time.perf_counter()

    def _build_model(self) -> tuple[nn.Module, nn.Module, bool]:
        """The model from the seed (on the CPU, then moved), and what the step trains: the model or
        its DDP wrapper; channels_last for convnets on a GPU."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_model(self.config.model.kind, hidden=self.config.model.hidden,
                                num_classes=self.splits.num_classes, **self.config.model.options)
        channels_last = self.device.type == "cuda" and getattr(model, "channels_last", False)
        model.to(self.device, memory_format=torch.channels_last) if channels_last else model.to(self.device)
        model.train()
        net = model if self.parallel is None else wrap(model, self.parallel)  # DDP, or FSDP2 in place
        return model, net, channels_last

    def resume(self, state: dict | None, progress=None) -> None:
        """Everything as it was right after the checkpointed evaluation: this epoch's data order
        is replayed from its generator state, skipping the batches already trained on."""
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optim.load_state_dict(state["optim"])
            self.step.load_state_dict(state["step"])
            self.monitor.load_state_dict(state["monitor"])
            for name, g in self.generators.items():
                g.set_state(state["generators"][name])
            self.generators["order"].set_state(state["order_epoch_start"])
            ckpt_mod.set_rng_state(state["rng"])
            self.rows, self.samples, self.next_eval = state["rows"], state["samples"], state["next_eval"]
            self.skip, self.elapsed = state["epoch_pos"], state["elapsed"]
            if progress is not None:
                progress.update(self.samples)
        self.resumed_from = self.samples
        self.t0 = time.perf_counter() - self.elapsed

    def evaluate(self) -> dict:
        """The evaluation row at the current sample count (GWA epoch closed, every split evaluated)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # unselectable GWA epochs are nan, kept in the row
            gwa = self.monitor.end_epoch()
        samples, n = self.samples, self.n
        row = dict.fromkeys(self.columns, NAN)
        row.update(arm=self.arm.name, seed=self.seed, samples=samples, step=self.optim.steps, gwa=gwa,
                   epoch=samples // n if samples % n == 0 else samples / n,
                   mean_alignment=self.monitor.epoch_mean_alignment[-1], lr=self.optim.lr)
        row.update(self.step.window())
        check_finite(self.model, self.where, self.parallel)
        for name, split in self.evals.items():
            if split is not None:
                row[f"{name}_loss"], row[f"{name}_acc"] = evaluate(self.model, split, prepare=self.pipeline.prepare,
                                                                   autocast=self.step.autocast)
        if not math.isfinite(row["train_loss"]):
            raise TrainingDiverged(f"{self.where}: the training loss is {row['train_loss']}; lower the learning rate")
        row["wall_time"] = time.perf_counter() - self.t0
        self.rows.append(row)
        return row

    def save(self, checkpoint, order_epoch_start: torch.Tensor, epoch_pos: int) -> None:
        """The whole state, right after an evaluation (nothing when the step cannot be saved now,
        or at the end of the budget)."""
        step_state = self.step.state_dict()
        if checkpoint is None or step_state is None or self.samples >= self.budget:
            return
        checkpoint.save({"model": self.model.state_dict(), "optim": self.optim.state_dict(), "step": step_state,
                         "generators": {k: g.get_state() for k, g in self.generators.items()},
                         "order_epoch_start": order_epoch_start, "epoch_pos": epoch_pos,
                         "rng": ckpt_mod.rng_state(), "rows": self.rows, "samples": self.samples,
                         "next_eval": self.next_eval, "elapsed": time.perf_counter() - self.t0},
                        self.monitor.state_dict())

    def train_step(self, x, y, ids) -> None:
        """One batch of the global batch: the step (on this rank's shard in a data-parallel run)."""
        n_batch = len(y)
        if self.parallel is None:
            loss_sum = self.step(x, y, ids, self.samples + n_batch)
        else:                        # this rank's shard; the loss summed over ranks
            par = self.parallel
            loss_sum = par.sum(self.step(par.shard(x), par.shard(y), par.shard(ids), self.samples + n_batch,
                                         batch_total=n_batch))
        self.samples += n_batch
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"{self.where}: the loss became {loss_sum} after {self.samples} samples; "
                                   "lower the learning rate")

    def train(self, *, on_eval=None, progress=None, checkpoint=None) -> None:
        """Epochs until the budget is spent, evaluating (and saving) at every evaluation point."""
        bs = self.step.batch_size
        with device_mod.gpu_settings(self.device):
            while self.samples < self.budget:
                order_epoch_start, epoch_pos = self.generators["order"].get_state(), 0
                for x, y, ids in batches(self.train_set, bs, self.generators["order"]):
                    epoch_pos += len(y)
                    if self.skip:                    # resuming: this batch was trained on before the checkpoint
                        self.skip -= len(y)
                        continue
                    left = self.budget - self.samples
                    if len(y) > left:
                        x, y, ids = x[:left], y[:left], ids[:left]
                    self.train_step(x, y, ids)
                    if progress is not None:
                        progress.update(len(y))
                    if self.samples >= self.budget:
                        self.step.finish(self.samples)
                    if self.samples >= self.next_eval or self.samples >= self.budget:   # GAGA: mid-accumulation is fine
                        row = self.evaluate()
                        self.next_eval = (self.samples // self.interval + 1) * self.interval
                        if on_eval is not None:
                            on_eval(row)
                        self.save(checkpoint, order_epoch_start, epoch_pos)
                    if self.samples >= self.budget:
                        break

    def finish(self) -> RunResult:
        """The rows, the summary (final metrics, GWA epoch, label noise, memorisation) and records."""
        summary = run_summary(self.config, self.arm, self.p, self.seed, self.eval_split, self.rows, self.monitor,
                              self.splits, self.train_set, self.optim, self.t0)
        pred = torch.cat([logits.argmax(1) for logits, _ in
                          logits_of(self.model, self.train_set, prepare=self.pipeline.prepare,
                                    autocast=self.step.autocast)])
        summary["memorisation"] = memorisation(pred.cpu().numpy(), self.splits, self.train_set)
        summary["resumed_from"] = self.resumed_from
        records = self.step.records()
        if records:
            records.update(label_records(records["sample_id"], self.splits))
        return RunResult(self.rows, summary, records)

    def close(self) -> None:
        self.step.close()
        self.monitor.remove()


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
    run = TrainingRun(config, arm, params, seed, splits, eval_split=eval_split, device=device, parallel=parallel)
    state = checkpoint.load(run.device) if checkpoint is not None else None
    rng = ckpt_mod.rng_state()
    try:
        run.resume(state, progress)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        if state is None:
            raise
        checkpoint.discard(f"{checkpoint.folder / ckpt_mod.STATE} does not fit this run ({type(e).__name__}: {e})")
        run.close()                               # partly loaded: start again from the seed, RNGs as before
        ckpt_mod.set_rng_state(rng)
        run = TrainingRun(config, arm, params, seed, splits, eval_split=eval_split, device=device, parallel=parallel)
        run.resume(None, progress)
    try:
        run.train(on_eval=on_eval, progress=progress, checkpoint=checkpoint)
        return run.finish()
    finally:
        run.close()
