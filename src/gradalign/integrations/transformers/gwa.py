"""GWACallback: gradient-weight alignment per epoch in a transformers.Trainer, and early stopping
and epoch selection without a validation set (the paper's rules, `ga.GWAMonitor`).

Every training forward's head input and output are recorded by the monitor's hook on `head`,
its labels by a forward pre-hook on the model (the `labels` keyword the Trainer passes); each
micro-batch is scored with the head's weight before the optimizer step (recorded at the
Trainer's `on_substep_end` / `on_pre_optimizer_step`). An epoch closes at the step that ends
it (so a checkpoint taken at that step already holds the closed epoch), and its numbers go to
the Trainer's log:

    gwa                  GWA_T of the epoch (nan: not selectable)
    gwa_mean_alignment   the epoch's mean alignment a_i
    gwa_best_epoch       the epoch the selection rule picks so far (0-based; nan before any)

With PerSampleTrainer they go through `trainer.log`, so every `report_to` backend gets them;
with a plain Trainer call `callback.bind(trainer)` for the same (otherwise they are appended to
`trainer.state.log_history` only). Checkpoints: each checkpoint folder
`<output_dir>/checkpoint-<step>` gets the monitor's state (also mid-epoch), the selection and
the selected epoch's weights (GWA_FILE; not under hyperparameter_search, whose trials write
elsewhere); resuming restores them (PerSampleTrainer.train tells the callback the folder;
otherwise it reads `<output_dir>/checkpoint-<global_step>`).

Sample ids are positions in the order samples were seen in the epoch (rank-interleaved under
data parallel), not data set indices: the Trainer's batches carry no ids.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import gradalign as ga
from gradalign.engine.distributed import active_group
from gradalign.errors import GradAlignError
from gradalign.methods.gwa import SELECTION_MODES

GWA_FILE = "gradalign_gwa.pt"


class GWACallback(TrainerCallback):
    """GWA per epoch in the Trainer's log, early stopping and epoch selection without a
    validation set, the selected epoch's weights restored at the end.

    Works with `PerSampleTrainer` and with a plain `transformers.Trainer` (call
    `bind(trainer)` so that the numbers reach every `report_to` backend). Each training
    micro-batch is scored with the head's weight before the optimizer step; an epoch closes at
    the step that completes it and logs `gwa`, `gwa_mean_alignment` and `gwa_best_epoch`.

    Args:
        head: the classifier's final nn.Linear (e.g. `model.classifier`), its name in the model
            ("classifier"), or a function model -> nn.Linear.
        mode: "scratch" or "finetune", the paper's selection rule for `best_epoch`.
        patience: stop after this many epochs without a better GWA_T (None: never stop early).
        skip_epochs: epochs ignored at the start (default: 10% of the planned epochs for
            "scratch", 0 for "finetune").
        restore_best: load the selected epoch's weights into the model when training ends (a
            CPU copy of the weights is kept at each new selection, and saved in checkpoints).
        label_key: the model keyword holding the class labels.
    Attributes:
        monitor: the ga.GWAMonitor (epoch_scores, epoch_mean_alignment, sample_scores()).
        best_epoch: the selected epoch (0-based), None before the first epoch closes.
        stopped_epoch: the epoch after which training was stopped, None if it was not.
    """

    def __init__(self, head: nn.Linear | str | Callable[[nn.Module], nn.Linear], *, mode: str = "scratch",
                 patience: int | None = None, skip_epochs: int | None = None, restore_best: bool = True,
                 label_key: str = "labels"):
        if mode not in SELECTION_MODES:
            raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
        if patience is not None and not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
        if skip_epochs is not None and not (isinstance(skip_epochs, int) and skip_epochs >= 0):
            raise ValueError(f"skip_epochs must be a non-negative integer or None, got {skip_epochs!r}")
        self.head, self.mode, self.patience, self.skip = head, mode, patience, skip_epochs
        self.restore_best, self.label_key = restore_best, label_key
        self.monitor: ga.GWAMonitor | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._best_state: dict[str, Tensor] | None = None
        self._labels: Tensor | None = None
        self._seen = 0                  # samples recorded in the current epoch on this rank
        self._hook = None
        self._log: Callable[[dict], None] | None = None
        self._resume: str | None = None

    def bind(self, trainer: Any, checkpoint: str | None = None) -> None:
        """Log through `trainer.log` (every report_to backend gets the numbers), and resume
        from `checkpoint` (a folder) when training resumes."""
        self._log, self._resume = trainer.log, checkpoint

    # ------------------------------------------------------------------ recording

    def _resolve_head(self, model: nn.Module) -> nn.Linear:
        if isinstance(self.head, nn.Module):
            return self.head
        return model.get_submodule(self.head) if isinstance(self.head, str) else self.head(model)

    def _keep_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and self.label_key in kwargs:
            self._labels = kwargs[self.label_key].detach()

    def _record(self) -> None:
        """Score the latest training forward's batch (with W before the optimizer step)."""
        labels = self._labels
        if labels is None:
            return
        group = self.monitor.process_group
        world, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
        ids = torch.arange(self._seen, self._seen + len(labels), device=labels.device) * world + rank
        if self.monitor.update_recorded(labels, ids):
            self._seen += len(labels)
            self._labels = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        self._remove_hooks()
        self.monitor = ga.GWAMonitor(self._resolve_head(model), process_group=active_group())
        self._hook = model.register_forward_pre_hook(self._keep_labels, with_kwargs=True)
        self._labels, self._seen = None, 0
        self.best_epoch = self.stopped_epoch = self._best_state = None
        if state.global_step > 0:
            self._load(self._resume or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_substep_end(self, args, state, control, **kwargs):
        self._record()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._record()

    # ------------------------------------------------------------------ epochs

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """Close the epoch at the step that completes it (state.epoch reaches a whole number)."""
        epoch = state.epoch
        if epoch is not None and abs(epoch - round(epoch)) < 1e-9 and round(epoch) > len(self.monitor.epoch_scores):
            self._close_epoch(args, state, control, model)

    def on_epoch_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """An epoch cut short (max_steps, a data set without a length) closes here."""
        self._record()
        if self._seen:                                   # samples recorded since the last close
            self._close_epoch(args, state, control, model)

    def _skip_epochs(self, state) -> int:
        if self.skip is not None:
            return self.skip
        planned = state.num_train_epochs or 0
        return int(0.1 * planned + 1e-9) if self.mode == "scratch" else 0

    def _close_epoch(self, args, state, control, model: nn.Module) -> None:
        if not self._seen and self.monitor.process_group is None:
            raise GradAlignError(f"GWACallback recorded no training batch this epoch: the model was never called "
                                 f"with a {self.label_key!r} keyword in a training forward (set label_key=...)")
        score = self.monitor.end_epoch()                 # data parallel: every rank's scores, gathered
        epoch = len(self.monitor.epoch_scores) - 1
        skip = self._skip_epochs(state)
        try:
            self.best_epoch = self.monitor.best_epoch(self.mode, skip_epochs=skip)
        except GradAlignError:                           # no selectable epoch yet (nan scores)
            self.best_epoch = None
        if self.restore_best and self.best_epoch == epoch:
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self._seen = 0
        logs = {"gwa": score, "gwa_mean_alignment": self.monitor.epoch_mean_alignment[-1],
                "gwa_best_epoch": math.nan if self.best_epoch is None else float(self.best_epoch)}
        if self._log is not None:
            should_log = control.should_log    # Trainer.log clears it: keep the Trainer's own step log due
            self._log(logs)
            control.should_log = should_log
        else:
            state.log_history.append({**logs, "epoch": state.epoch, "step": state.global_step})
        if self.patience is not None and self.monitor.should_stop(self.patience, skip_epochs=skip):
            control.should_training_stop = True          # the same decision on every rank (gathered scores)
            self.stopped_epoch = epoch

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self.restore_best and self._best_state is not None:
            model.load_state_dict(self._best_state)
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.remove()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The monitor's state (mid-epoch included; per-epoch arrays as tensors), the selection
        and the selected epoch's weights."""
        return {"monitor": self.monitor.state_dict(), "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
                "seen": self._seen, "best_state": self._best_state}

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state["monitor"])  # (per-epoch ids and scores: tensors)
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
        self._seen, self._best_state = state["seen"], state["best_state"]

    def on_save(self, args, state, control, **kwargs):
        """Write state_dict() into the checkpoint folder the Trainer just wrote (main process)."""
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            torch.save(self.state_dict(), os.path.join(folder, GWA_FILE))

    def _load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, GWA_FILE)
        if not os.path.isfile(path):
            raise GradAlignError(f"training resumes at a checkpoint without {GWA_FILE} ({checkpoint}): the GWA "
                                 "monitor cannot continue; with a plain Trainer, call callback.bind(trainer, "
                                 "checkpoint) before trainer.train(resume_from_checkpoint=checkpoint)")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
