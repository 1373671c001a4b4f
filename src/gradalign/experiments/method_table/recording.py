"""The step of the "signals" method: the baseline with the engine attached, recording per-sample
signals for mislabel detection (label_noise/detection.py).

``engine.backward(losses)`` writes the same p.grad as ``losses.mean().backward()`` (the
baseline's update) and gives the per-sample gradient norms and cosines to the batch mean
from the same backward. For every sample of every batch, before the update on it, the step
keeps its training-forward loss (w.r.t. its assigned, possibly noisy, label), gradient norm,
cosine to the batch mean (GASW's signal) and to the mean of the OTHER samples of the batch
(GASW's leave-one-out option: no self-alignment), margin (assigned logit minus the largest
other logit) and correctness; the GWA alignment comes from the run's GWAMonitor
(``sample_scores()``).

``records()`` returns them as dense matrices, one row per training sample and one column
per pass over it (the t-th time a sample is drawn is its epoch t; a pass it missed, e.g. in
a budget that ends mid-epoch, is nan, or -1 for ``correct``)::

    sample_id (N,) int64     sorted training ids
    label (N,) int64         the assigned (possibly noisy) label
    loss, grad_norm, cosine, cosine_loo, margin, gwa (N, E) float32
    correct (N, E) int8      1 correct, 0 not, -1 not visited

The training loop adds ``flipped`` (N,) bool and ``clean_label`` (N,) (label_noise.label_records);
the runner stores them as ``runs/<variant>/<arm>/seed<k>.npz`` beside the run
(run_folder.write_run); label_noise/detection.py turns them into rankings.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

import gradalign as ga
from gradalign.errors import ConfigError
from gradalign.experiments.method_table.steps import Forward, Step
from gradalign.methods.gasw import leave_one_out_cosines

FLOAT_RECORDS = ("loss", "grad_norm", "cosine", "cosine_loo", "margin")


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) logit of the assigned label minus the largest other logit (negative: misclassified)."""
    assigned = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return assigned - others.max(dim=1).values


def dense(ids: np.ndarray, columns: dict[str, np.ndarray], fill: dict) -> tuple[np.ndarray, dict]:
    """Per-visit values in visit order -> (sorted unique ids (N,), {name: (N, E)}).

    The k-th occurrence of an id is its pass k; E is the most passes any id had; missing
    passes hold fill[name].
    """
    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids, kind="stable")
    uniq, start, counts = np.unique(ids[order], return_index=True, return_counts=True)
    visit = np.empty(len(ids), np.int64)
    visit[order] = np.arange(len(ids)) - np.repeat(start, counts)
    row = np.searchsorted(uniq, ids)
    out = {}
    for name, values in columns.items():
        m = np.full((len(uniq), int(counts.max()) if len(ids) else 0), fill[name], dtype=values.dtype)
        m[row, visit] = values
        out[name] = m
    return uniq, out


class RecordingStep(Step):
    """Baseline update through the engine, keeping per-sample records (see the module docstring)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.engine = ga.PerSampleGradients(self.model)
        self._batch: tuple[Tensor, Tensor] | None = None
        self._kept: dict[str, list[Tensor]] = {k: [] for k in ("ids", "label", "correct") + FLOAT_RECORDS}

    def __call__(self, x: Tensor, y: Tensor, ids: Tensor, samples_done: int, **kw) -> float:
        if self.world > 1:
            raise ConfigError("the 'signals' method records every training sample's signals in one process; "
                              "run its arm without --nproc")
        self._batch = (y, ids)
        return super().__call__(x, y, ids, samples_done, **kw)

    def update(self, out: Forward) -> int:
        stats = self.engine.backward(out.graph)                  # p.grad = mean gradient, as the baseline
        y, ids = self._batch
        logits = out.logits
        kept = {"ids": ids, "label": y, "loss": out.graph.detach(), "grad_norm": stats.norms,
                "cosine": stats.cosines, "cosine_loo": leave_one_out_cosines(stats), "margin": margins(logits, y),
                "correct": logits.argmax(1) == y}
        for k, v in kept.items():
            self._kept[k].append(v.detach().to("cpu"))
        return len(logits)

    def state_dict(self) -> dict:
        """The records so far, one tensor per record (a run resumed from a checkpoint keeps the
        epochs before it); the lists are compacted too, so each checkpoint saves a few tensors."""
        self._kept = {k: [torch.cat(v)] if len(v) > 1 else v for k, v in self._kept.items()}
        return {"kept": {k: list(v) for k, v in self._kept.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._kept = {k: list(v) for k, v in state["kept"].items()}

    def records(self) -> dict[str, np.ndarray]:
        if not self._kept["ids"]:
            return {}
        cat = {k: torch.cat(v).numpy() for k, v in self._kept.items()}
        columns = {k: cat[k].astype(np.float32) for k in FLOAT_RECORDS}
        columns["correct"] = cat["correct"].astype(np.int8)
        fill = {**{k: np.nan for k in FLOAT_RECORDS}, "correct": -1}
        sample_id, out = dense(cat["ids"], columns, fill)
        label = np.empty(len(sample_id), np.int64)
        label[np.searchsorted(sample_id, cat["ids"])] = cat["label"]
        scores = self.monitor.sample_scores()
        gwa_ids, gwa = dense(scores["sample_id"], {"gwa": scores["score"].astype(np.float32)}, {"gwa": np.nan})
        if not np.array_equal(gwa_ids, sample_id):
            raise RuntimeError("the GWA monitor scored other samples than the step recorded")
        out["gwa"] = np.full_like(out["loss"], np.nan)
        width = min(gwa["gwa"].shape[1], out["gwa"].shape[1])
        out["gwa"][:, :width] = gwa["gwa"][:, :width]
        return {"sample_id": sample_id, "label": label, **out}

    def close(self) -> None:
        self.engine.remove()
