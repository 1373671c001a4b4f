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

import warnings
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from gradalign.engine.capture import PerSampleGradients, Weights
from gradalign.engine.distributed import active_group
from gradalign.engine.gradient_stats import GradientStats
from gradalign.errors import GradAlignError
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
        sample_ids: a function batch -> (B,) sample ids (default batch[2]; without ids, each
            sample's position in the epoch (a running count per rank from 0 at every epoch's
            start), which identifies samples only for a loader that does not shuffle, and is
            meaningless for sample_scores() under DDP).

    Attributes:
        monitor: the GWAMonitor (epoch_scores, epoch_mean_alignment, sample_scores()).
        best_epoch: the selected epoch (0-based, the trainer's numbering), None before the
            first epoch ends.
        stopped_epoch: the epoch after which training was stopped, None if it was not.
        first_epoch: the trainer's epoch at which the monitor's history starts (0 unless the
            callback joined a run resumed without its state): monitor epoch k is trainer epoch
            first_epoch + k.
        previous_fits: the results of earlier fits with this callback that started afresh
            (below), as dicts of epoch_scores, best_epoch, stopped_epoch, first_epoch and
            sample_scores.

    Checkpoints and repeated fits: the callback's state (the monitor's history, best and
    stopped epochs, the selected weights when restore_best) is saved in Lightning's checkpoints
    and restored by `fit(ckpt_path=...)`, so a resumed run selects and stops as an
    uninterrupted one (a checkpoint taken in the middle of an epoch holds the finished epochs;
    the resumed epoch's GWA_T is over the batches after the resume). A later `fit` with the same
    callback continues its history when the trainer continues where it ended (the same trainer
    with a larger max_epochs); a fit that starts again at epoch 0 starts a new history and keeps
    the previous one in `previous_fits`, with a warning.
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
        self.first_epoch = 0
        self.previous_fits: list[dict] = []
        self._best_state: dict | None = None
        self._loaded: dict | None = None     # a checkpoint's state, until on_fit_start has a monitor
        self._finished: dict | None = None   # the state at the last epoch's end (what a checkpoint saves)
        self._batch: tuple[Tensor, Tensor] | None = None
        self._seen = 0

    def _head(self, module: nn.Module) -> nn.Linear:
        if not isinstance(self.head, str):
            return self.head(module)
        try:
            return module.get_submodule(self.head)
        except AttributeError:
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            hint = f"; pass its classifier head's name, e.g. GWAEarlyStopping({linears[-1]!r})" if linears else ""
            raise GradAlignError(f"GWAEarlyStopping: the module has no submodule {self.head!r}; its nn.Linear modules "
                                 f"are {linears}{hint}, or a function module -> head") from None

    def _skip(self, trainer: pl.Trainer) -> int:
        if self.skip is not None:
            return self.skip
        planned = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 0
        return int(0.1 * planned + 1e-9) if self.mode == "scratch" else 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        old, previous = self.monitor, self._finished
        self.monitor = GWAMonitor(self._head(pl_module), process_group=ddp_process_group())
        if self._loaded is not None:                 # fit(ckpt_path=...): restored before the monitor existed
            state, self._loaded = self._loaded, None
            self.load_state_dict(state)
        elif previous is not None and trainer.current_epoch == self.first_epoch + len(old.epoch_scores):
            self.load_state_dict(previous)           # the same trainer continues where the history ends
        else:
            if previous is not None:
                self.previous_fits.append({"epoch_scores": list(old.epoch_scores), "best_epoch": self.best_epoch,
                                           "stopped_epoch": self.stopped_epoch, "first_epoch": self.first_epoch,
                                           "sample_scores": old.sample_scores()})
                warnings.warn(f"GWAEarlyStopping: a new fit starts at epoch {trainer.current_epoch}, not where this "
                              f"callback's history of {len(old.epoch_scores)} epochs ends; it starts a new history "
                              "(the previous one is in callback.previous_fits)", RuntimeWarning, stacklevel=2)
            self.best_epoch = self.stopped_epoch = self._best_state = self._finished = None
            self.first_epoch = None                  # set at the first epoch's start (after any resume)
        if old is not None:
            old.remove()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch
        self._seen = 0                               # ids without given ids: positions within the epoch

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
        index = len(self.monitor.epoch_scores) - 1
        # the same value on every rank (gathered); sync_dist only keeps Lightning's DDP check quiet
        sync = self.monitor.process_group is not None
        pl_module.log("gwa", score, on_epoch=True, sync_dist=sync)
        pl_module.log("gwa_mean_alignment", self.monitor.epoch_mean_alignment[-1], on_epoch=True, sync_dist=sync)
        skip = self._skip(trainer)
        try:
            best = self.monitor.best_epoch(self.mode, skip_epochs=skip)
        except Exception:                    # noqa: BLE001 - no selectable epoch yet (nan scores)
            best = None
        self.best_epoch = None if best is None else self.first_epoch + best
        if self.restore_best and best == index:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        if self.patience is not None and self.monitor.should_stop(self.patience, skip_epochs=skip):
            trainer.should_stop = True       # the same decision on every rank (gathered scores)
            self.stopped_epoch = self.first_epoch + index
        self._finished = self._state()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_best and self._best_state is not None:
            pl_module.load_state_dict(self._best_state)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.remove()

    def _state(self) -> dict:
        return {"monitor": self.monitor.state_dict(), "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch, "first_epoch": self.first_epoch, "best_state": self._best_state}

    def state_dict(self) -> dict:
        """The state at the end of the last finished epoch (the monitor's history, best and
        stopped epochs, the selected weights): what `fit(ckpt_path=...)` restores; loads with
        torch.load(weights_only=True)."""
        if self._finished is not None:
            return self._finished
        return self._loaded or {}

    def load_state_dict(self, state: dict) -> None:
        if "monitor" not in state:                   # a checkpoint of an older version: no history to restore
            warnings.warn("GWAEarlyStopping: the checkpoint's state has no GWA history (an older version); this "
                          "callback starts a new one", RuntimeWarning, stacklevel=2)
            return
        if self.monitor is None:                     # restored before on_fit_start: applied there
            self._loaded = state
            return
        self.monitor.load_state_dict(state["monitor"])
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
        self.first_epoch, self._best_state = state.get("first_epoch", 0), state.get("best_state")
        self._finished = state


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
        if getattr(module, "automatic_optimization", False):
            raise GradAlignError(
                "PerSampleTraining needs manual optimisation (the engine writes p.grad, no loss is returned for "
                "Lightning to backpropagate): set self.automatic_optimization = False in the module's __init__ "
                "and step the optimizer in training_step (see gradalign.integrations.lightning)")
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
