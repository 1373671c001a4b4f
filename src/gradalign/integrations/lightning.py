"""Lightning: GWA early stopping as a callback, GASW/GDSW and GAGA in a LightningModule.

`pip install "gradalign[lightning]"`. Both work on one device and under Lightning's DDP
strategies (`strategy="ddp"`): the process group is Lightning's (torch.distributed's WORLD).

GWA early stopping, no validation loader needed:

    callback = GWAEarlyStopping("head", patience=5)    # the module's final nn.Linear, by name
    trainer = L.Trainer(max_epochs=50, callbacks=[callback])
    trainer.fit(module, train_loader)                  # batches (x, y) or (x, y, sample_ids)
    callback.best_epoch, callback.monitor.epoch_scores, callback.monitor.sample_scores()

It scores every training sample by its gradient-weight alignment with the head (the head's
input and output recorded by a forward hook, the weight read before the optimizer step)
and closes a GWA epoch at every training epoch's end. Under DDP the scores and sample ids of
every rank are gathered, so GWA_T and the decision are those of the whole data set and the
same on every rank. `patience`: stop when GWA_T has not improved for that many epochs (after
`skip_epochs`). The selected epoch follows the paper's rule (`mode` "scratch": argmax of
GWA_T after the first 10% of the planned epochs; "finetune": argmax after the first local
minimum); with `restore_best` the module gets that epoch's weights back when training ends
(a CPU copy of the weights is kept at each new selection).

GASW / GAGA: manual optimisation, the engine forms p.grad (no `manual_backward`):

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.body, self.head = ..., nn.Linear(256, 10)
            self.gasw = ga.GASW(gamma=2.0)

        def on_fit_start(self):                        # after Lightning set up the processes
            self.per_sample = PerSampleTraining(self)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            losses = F.cross_entropy(self(x), y, reduction="none")
            self.per_sample.backward(losses, weights=self.gasw, release=True)   # p.grad = (1/B) sum_i w_i g_i
            opt.step()

Under DDP the engine reduces over the ranks itself (the cosines and weights of the global
batch, the same p.grad on every rank: see `ga.PerSampleGradients(process_group=)`); DDP's
own reducer does not run on the engine's backward, so nothing is reduced twice. For GAGA,
`self.per_sample.accumulate(losses, accumulator, opt)` returns True when it stepped.
"""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from gradalign.engine.capture import PerSampleGradients, Weights
from gradalign.engine.distributed import active_group
from gradalign.engine.gradient_stats import GradientStats
from gradalign.methods.gaga import GSNRAccumulator
from gradalign.methods.gwa import SELECTION_MODES, GWAMonitor


def ddp_process_group() -> Any:
    """torch.distributed's WORLD when several processes run (Lightning's DDP), else None."""
    return active_group()


def _targets(batch) -> Tensor:
    return batch[1]


def _ids(batch) -> Tensor | None:
    return batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None


class GWAEarlyStopping(pl.Callback):
    """Early stopping and epoch selection by gradient-weight alignment, with no validation loader.

    Args:
        head: the classifier's final nn.Linear: its name in the LightningModule ("head",
            "model.fc") or a function module -> nn.Linear.
        mode: "scratch" or "finetune", the paper's selection rule for `best_epoch`.
        patience: stop after this many epochs without a better GWA_T (None: never stop early).
        skip_epochs: epochs ignored at the start (default: 10% of max_epochs for "scratch",
            0 for "finetune").
        restore_best: load the selected epoch's weights into the module when training ends.
        targets: a function batch -> (B,) labels (default batch[1]).
        sample_ids: a function batch -> (B,) sample ids (default batch[2]; without ids, a
            running count per rank, which is meaningless for sample_scores() under DDP).

    Attributes:
        monitor: the GWAMonitor (epoch_scores, epoch_mean_alignment, sample_scores()).
        best_epoch: the selected epoch (0-based), None before the first epoch ends.
        stopped_epoch: the epoch after which training was stopped, None if it was not.
    """

    def __init__(self, head: str | Callable[[nn.Module], nn.Linear] = "head", *, mode: str = "scratch",
                 patience: int | None = None, skip_epochs: int | None = None, restore_best: bool = True,
                 targets: Callable[[Any], Tensor] = _targets, sample_ids: Callable[[Any], Tensor | None] = _ids):
        if mode not in SELECTION_MODES:
            raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
        if patience is not None and not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
        self.head, self.mode, self.patience, self.skip = head, mode, patience, skip_epochs
        self.restore_best, self._targets, self._ids = restore_best, targets, sample_ids
        self.monitor: GWAMonitor | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._best_state: dict | None = None
        self._batch: tuple[Tensor, Tensor] | None = None
        self._seen = 0

    def _head(self, module: nn.Module) -> nn.Linear:
        return module.get_submodule(self.head) if isinstance(self.head, str) else self.head(module)

    def _skip(self, trainer: pl.Trainer) -> int:
        if self.skip is not None:
            return self.skip
        planned = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 0
        return int(0.1 * planned + 1e-9) if self.mode == "scratch" else 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.remove()
        self.monitor = GWAMonitor(self._head(pl_module), process_group=ddp_process_group())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        y = self._targets(batch)
        ids = self._ids(batch)
        if ids is None:
            ids = torch.arange(self._seen, self._seen + len(y), device=y.device)
        self._seen += len(y)
        self._batch = (y, ids)

    def _record(self) -> None:
        if self._batch is not None and self.monitor.update_recorded(*self._batch):
            self._batch = None

    def on_after_backward(self, trainer, pl_module) -> None:           # automatic optimisation
        self._record()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:   # manual, engine backward
        self._record()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record()                       # a manual step that never called optimizer.step()
        score = self.monitor.end_epoch()     # under DDP: gathers every rank's scores
        epoch = len(self.monitor.epoch_scores) - 1
        # the same value on every rank (gathered); sync_dist only keeps Lightning's DDP check quiet
        sync = self.monitor.process_group is not None
        pl_module.log("gwa", score, on_epoch=True, sync_dist=sync)
        pl_module.log("gwa_mean_alignment", self.monitor.epoch_mean_alignment[-1], on_epoch=True, sync_dist=sync)
        skip = self._skip(trainer)
        try:
            self.best_epoch = self.monitor.best_epoch(self.mode, skip_epochs=skip)
        except Exception:                    # noqa: BLE001 - no selectable epoch yet (nan scores)
            self.best_epoch = None
        if self.restore_best and self.best_epoch == epoch:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        if self.patience is not None and self.monitor.should_stop(self.patience, skip_epochs=skip):
            trainer.should_stop = True       # the same decision on every rank (gathered scores)
            self.stopped_epoch = epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best and self._best_state is not None:
            pl_module.load_state_dict(self._best_state)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.remove()

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
                "epoch_scores": list(self.monitor.epoch_scores) if self.monitor else []}


class PerSampleTraining:
    """The per-sample gradient engine on a LightningModule with manual optimisation.

    Create it in `on_fit_start` (Lightning has set up the processes by then); it hooks the
    module's layers (`ga.PerSampleGradients`) with the DDP process group when there is one.

    Args:
        module: the LightningModule (`self`).
        process_group: default: torch.distributed's WORLD under DDP, None on one device.
        **engine_kwargs: passed to ga.PerSampleGradients (registry, verify).
    """

    def __init__(self, module: nn.Module, *, process_group: Any = "auto", **engine_kwargs):
        group = ddp_process_group() if process_group == "auto" else process_group
        self.engine = PerSampleGradients(module, process_group=group, **engine_kwargs)

    def backward(self, losses: Tensor, weights: Weights = None, *, write_grad: bool = True,
                 release: bool = False) -> GradientStats:
        """engine.backward: p.grad += (1/B) sum_i w_i g_i over the global batch; the statistics
        (release=True: only those the weighting read; each layer's factors freed once written)."""
        return self.engine.backward(losses, weights, write_grad=write_grad, release=release)

    def accumulate(self, losses: Tensor, accumulator: GSNRAccumulator, optimizer) -> bool:
        """GAGA: add this batch to `accumulator`; when it says so, write its mean gradient,
        step `optimizer` (e.g. `self.optimizers()`) and zero the gradients. True when stepped."""
        if not accumulator.update(self.engine.backward(losses, write_grad=False)):
            return False
        self.engine.set_grad(accumulator.mean_grad())
        optimizer.step()
        optimizer.zero_grad()
        return True

    def remove(self) -> None:
        self.engine.remove()


__all__ = ["GWAEarlyStopping", "PerSampleTraining", "ddp_process_group"]
