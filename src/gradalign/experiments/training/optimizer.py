"""The base optimizer of a run (Adam or SGD) and its learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


class Optimizer:
    """The base optimizer (Adam or SGD) and its learning-rate schedule.

    schedule "none"; "cosine": per step, lr * (1 + cos(pi * samples_done / budget)) / 2;
    "cosine_epoch": constant within an epoch (epoch_size samples), lr * (1 + cos(pi * e / E)) / 2
    in epoch e of E = budget / epoch_size, i.e. torch's CosineAnnealingLR(T_max=E) stepped once
    per epoch (the GVR authors' schedule).
    """

    def __init__(self, model: nn.Module, kind: str, schedule: str, p: dict, budget: int, epoch_size: int | None = None):
        kw = dict(lr=p["lr"], weight_decay=p["weight_decay"])
        if kind == "sgd":
            self.opt = torch.optim.SGD(model.parameters(), momentum=p["momentum"], **kw)
        else:
            self.opt = torch.optim.Adam(model.parameters(), **kw)
        if schedule == "cosine_epoch" and not epoch_size:
            raise ValueError("schedule 'cosine_epoch' needs the epoch size")
        self.base_lr, self.schedule, self.budget, self.epoch_size = p["lr"], schedule, budget, epoch_size
        self.steps = 0
        self.lr = p["lr"]

    def step(self, samples_done: int) -> None:
        if self.schedule == "cosine":
            self._set_lr(self.base_lr * 0.5 * (1 + math.cos(math.pi * min(samples_done / self.budget, 1.0))))
        elif self.schedule == "cosine_epoch":
            epoch = (samples_done - 1) // self.epoch_size                   # the epoch this step belongs to
            self._set_lr(self.base_lr * 0.5 * (1 + math.cos(math.pi * epoch * self.epoch_size / self.budget)))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1

    def _set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.opt.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "steps": self.steps, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.steps, self.lr = state["steps"], state["lr"]
