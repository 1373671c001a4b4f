"""TensorBoard scalars of a run's evaluations, so a long run can be watched while it trains:

    gradalign reproduce gasw --tensorboard        # <out>/tensorboard/[<variant>/]<arm>/seed<k>
    tensorboard --logdir runs/gasw/tensorboard

`ScalarLog(folder)` is an `on_eval` callback of the training loop: each evaluation row's numbers
(losses, accuracies, GWA, the learning rate and the method's diagnostics) become scalars at
step = samples consumed, under a group per kind ("loss/train", "acc/test", "gwa/score",
"method/weight_entropy", ...). Without the optional `tensorboard` package nothing changes unless
logging is asked for, which then says how to install it. A resumed run drops the scalars its
killed predecessor wrote after the checkpoint (purge_step), so each curve is drawn once.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from gradalign.errors import ConfigError

_GROUPS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test", "train_acc": "acc/train",
           "val_acc": "acc/val", "test_acc": "acc/test", "gwa": "gwa/score", "mean_alignment": "gwa/mean_alignment",
           "lr": "optimizer/lr", "samples_per_step": "optimizer/samples_per_step", "epoch": "progress/epoch"}
_SKIPPED = ("arm", "seed", "samples", "step", "variant", "wall_time")


def check_installed() -> None:
    """ConfigError naming the install command when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError('--tensorboard needs the tensorboard package: pip install "gradalign[tensorboard]"')


class ScalarLog:
    """Write each evaluation row to TensorBoard event files in `folder` (made on the first row)."""

    def __init__(self, folder: Path | str):
        check_installed()
        self.folder, self.writer = Path(folder), None

    def __call__(self, row: dict) -> None:
        step = int(row["samples"])
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder), purge_step=step)
        for key, value in row.items():
            if key in _SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(_GROUPS.get(key, f"method/{key}"), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
