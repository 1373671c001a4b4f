"""Tiny LightningModules for test_lightning.py; run as a script it trains GASW with the GWA
callback under strategy="ddp" on 2 CPU processes and saves rank 0's results to argv[1]."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradalign as ga
from gradalign.integrations.lightning import GWAEarlyStopping, PerSampleTraining

N, BATCH, EPOCHS, LR = 32, 8, 3, 0.5


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 6, generator=g), torch.randint(0, 4, (N,), generator=g), torch.arange(N)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 4)


class Plain(pl.LightningModule):
    """Automatic optimisation, mean cross-entropy, SGD."""

    def __init__(self):
        super().__init__()
        self.body, self.head = net()

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class WithGASW(Plain):
    """Manual optimisation; the engine writes the GASW-weighted gradient."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gasw = ga.GASW(gamma=2.0)

    def on_fit_start(self):
        self.per_sample = PerSampleTraining(self)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        opt = self.optimizers()
        opt.zero_grad()
        self.per_sample.backward(F.cross_entropy(self(x), y, reduction="none"), weights=self.gasw,
                                  release=True)  # as the module docstring; the reference loop keeps
        opt.step()


def trainer(callbacks, max_epochs=EPOCHS, **kw):
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


def loader(batch=BATCH):
    return DataLoader(TensorDataset(*data()), batch_size=batch, shuffle=False)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.support
    from tests.support.gloo import end_process_group

    torch.set_num_threads(1)
    module, callback = WithGASW(), GWAEarlyStopping("head", restore_best=False)
    trainer([callback], devices=2, strategy="ddp").fit(module, loader())
    if module.global_rank == 0:
        torch.save({"state": module.state_dict(), "scores": callback.monitor.epoch_scores,
                    "sample_scores": callback.monitor.sample_scores(), "best": callback.best_epoch}, sys.argv[1])
    # Lightning destroys only NCCL groups at exit and leaves a gloo group to the interpreter's
    # shutdown, which aborts the process now and then (gloo.py): end it here. The module's engine
    # and the callback's monitor (still referenced) hold it weakly, so they do not keep it alive.
    end_process_group(f"rank {module.global_rank}")
