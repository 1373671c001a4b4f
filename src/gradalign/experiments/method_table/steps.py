"""Training steps: view -> forward -> monitor -> update (the method forms p.grad) -> optimizer.

`Step.__call__` does what every arm shares; a method's step overrides `update` (form p.grad
and say how many samples to step on) and, when it needs other views or forwards (GVR),
`views` and `forward`. The GWA monitor is updated after the forward and before any
optimizer step, so it reads the pre-update head weight.

Each step class declares `columns`: the per-evaluation diagnostics its `window()` fills.
Inputs come from the data's pipeline (data/pipelines.py): `views` asks it for random training views
(or the plain model input), and the forward runs under the step's `autocast` context
(bf16 on a GPU, training/loop.py). `state_dict` / `load_state_dict` carry what a checkpoint needs
beyond the model, optimizer and generators.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradalign as ga
from gradalign.errors import ConfigError
from gradalign.experiments.data.pipelines import Pipeline1d

NAN = float("nan")


@dataclass
class Forward:
    """What a step's forward gives: the logits the monitor scores (B, C), detached; the sum
    of the batch's training losses; and what `update` differentiates."""

    logits: Tensor
    loss_sum: float
    graph: Tensor


class Step:
    """One training step of an arm on a batch; the baseline (mean loss, one backward).

    __call__(x, y, ids, samples_done) -> the sum of the batch's training losses.
    window() -> {column: value}: the diagnostics since the previous call.
    `optim` is the training loop's optimizer (training/optimizer.py): `step(samples_done)`.
    """

    columns: tuple[str, ...] = ()
    world: int = 1                  # ranks in a data-parallel run (the training loop sets it)

    def __init__(self, model: nn.Module, optim, monitor: ga.GWAMonitor, p: dict,
                 generators: dict[str, torch.Generator], pipeline=None):
        self.model, self.optim, self.monitor, self.p, self.generators = model, optim, monitor, p, generators
        self.pipeline = pipeline if pipeline is not None else Pipeline1d()
        self.autocast = contextlib.nullcontext          # the training loop sets bf16 autocast on a GPU
        self._step_sizes: list[int] = []
        self.batch_total = 0        # samples in the current global batch (all ranks)

    @property
    def batch_size(self) -> int:
        """Samples per call: the batch the loop draws."""
        return self.p["batch_size"]

    def __call__(self, x: Tensor, y: Tensor, ids: Tensor, samples_done: int, batch_total: int | None = None) -> float:
        """batch_total: samples of the global batch when x is one rank's shard (data parallel)."""
        self.batch_total = len(y) if batch_total is None else batch_total
        views = self.views(x)
        with self.autocast():
            out = self.forward(views, y)
        self.monitor.update(out.logits, y, ids)
        self._step_on(self.update(out), samples_done)
        return out.loss_sum

    def views(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.p["augment"]:
            return (self.pipeline.view(x, self.generators["augment"]),)
        return (self.pipeline.prepare(x),)

    def forward(self, views: tuple[Tensor, ...], y: Tensor) -> Forward:
        logits = self.model(views[0])
        losses = F.cross_entropy(logits, y, reduction="none")
        return Forward(logits.detach(), float(losses.detach().sum()), losses)

    def update(self, out: Forward) -> int:
        """Form p.grad from the forward; return how many samples to step on now (0: not yet)."""
        if self.world == 1:
            out.graph.mean().backward()
        else:   # DDP averages over ranks: scaled so that the average is the mean over the global batch
            (out.graph.sum() * (self.world / self.batch_total)).backward()
        return self.batch_total

    def flush(self) -> int:
        """At the end of the budget: form p.grad from whatever is accumulated, return its samples."""
        return 0

    def finish(self, samples_done: int) -> None:
        self._step_on(self.flush(), samples_done)

    def _step_on(self, n: int, samples_done: int) -> None:
        if n:
            self.optim.step(samples_done)
            self._step_sizes.append(n)

    def window(self) -> dict:
        sizes, self._step_sizes = self._step_sizes, []
        return {"samples_per_step": float(np.mean(sizes)) if sizes else NAN}

    def records(self) -> dict[str, np.ndarray]:
        """Per-sample records of the run so far (arrays) for the run folder; {} for none."""
        return {}

    def close(self) -> None:
        """Release hooks."""

    def state_dict(self) -> dict | None:
        """The step's own state for a checkpoint taken right after an evaluation (the window's
        lists are empty then); None when it holds state a checkpoint cannot carry now."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict gave."""


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else NAN


class WeightedStep(Step):
    """GASW/GDSW: one engine backward with per-sample weights from the gradient cosines."""

    columns = ("zero_weight_frac", "weight_entropy", "fallbacks")
    weighting_class: type = ga.GASW

    def __init__(self, *args):
        super().__init__(*args)
        self.weighting = self.weighting_class(self.p["gamma"], leave_one_out=self.p["leave_one_out"])
        self.engine = ga.PerSampleGradients(self.model)
        self._zero, self._entropy = [], []

    def update(self, out: Forward) -> int:
        # release: p.grad a layer at a time, each layer's factors freed after (nothing reads the
        # statistics afterwards: the weighting keeps what the columns need); DDP: the engine reduces
        self.engine.backward(out.graph, weights=self.weighting, release=True)
        self._zero.append(self.weighting.last_zero_fraction)
        self._entropy.append(self.weighting.last_entropy)
        return self.batch_total

    def window(self) -> dict:
        out = super().window()
        out.update(zero_weight_frac=_mean(self._zero), weight_entropy=_mean(self._entropy),
                   fallbacks=self.weighting.fallbacks)
        self._zero, self._entropy = [], []
        return out

    def close(self) -> None:
        self.engine.remove()

    def state_dict(self) -> dict:
        return self.weighting.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.weighting.load_state_dict(state)


class GDSWStep(WeightedStep):
    weighting_class = ga.GDSW


class AccumulateStep(Step):
    """GAGA: increments until the GSNR rule passes or max_samples; the engine writes the mean."""

    def __init__(self, *args):
        super().__init__(*args)
        p = self.p
        self.acc = ga.GSNRAccumulator(p["tau"], increment=p["increment"], max_samples=p["max_samples"], rule=p["rule"])
        self.engine = ga.PerSampleGradients(self.model)
        self.pending = 0                      # samples accumulated but not yet stepped on

    @property
    def batch_size(self) -> int:
        return self.acc.increment

    def update(self, out: Forward) -> int:
        self.pending += self.batch_total
        return self.flush() if self.acc.update(self.engine.backward(out.graph, write_grad=False)) else 0

    def flush(self) -> int:
        n, self.pending = self.pending, 0
        if n:
            self.engine.set_grad(self.acc.mean_grad())
        return n

    def close(self) -> None:
        self.engine.remove()

    def state_dict(self) -> dict | None:
        return None if self.pending else {}     # mid-accumulation: the running sums are not saved


def _gvr_layers(model: nn.Module, which: str) -> list[nn.Module]:
    """The modules of the model's group `which` (its module_groups(): "head", "last_stage")."""
    model = getattr(model, "module", model)          # inside a DDP wrapper
    groups = model.module_groups()
    if which not in groups:
        raise ConfigError(f"gvr_layers {which!r}: {type(model).__name__} declares {', '.join(groups)}")
    return groups[which]


class TwoViewStep(Step):
    """GVR (alpha > 0) or the two-view control (alpha = 0): CE(view1) + CE(view2) + alpha * penalty.

    The GWA monitor scores the second view, the head's latest training forward.
    """

    columns = ("penalty",)

    def __init__(self, *args):
        super().__init__(*args)
        p = self.p
        self.gvr = ga.GVR(p.get("alpha", 0.0), layers=_gvr_layers(self.model, p["gvr_layers"]),
                          subset=p["subset"], mode=p["gvr_mode"], generator=self.generators["gvr"],
                          subset_forward=p["subset_forward"])
        self._penalty = []

    def views(self, x: Tensor) -> tuple[Tensor, ...]:
        g = self.generators["augment"]
        return self.pipeline.view(x, g), self.pipeline.view(x, g)

    def forward(self, views: tuple[Tensor, ...], y: Tensor) -> Forward:
        total, info = self.gvr.loss(self.model, *views, y)
        self._penalty.append(info["penalty"])
        return Forward(info["logits2"], (info["loss1"] + info["loss2"]) * len(y), total)

    def update(self, out: Forward) -> int:
        out.graph.backward()            # data parallel: DDP averages each rank's loss and penalty
        return self.batch_total

    def window(self) -> dict:
        out = super().window()
        out["penalty"] = _mean(self._penalty)
        self._penalty = []
        return out
