"""GWA: gradient-weight alignment of each training sample with the classifier head.

For a head logits = W z + b (W: (C, D)), sample i with embedding z_i, p_i = softmax(logits_i)
and one-hot or soft label y_i (Hoelzl et al. 2025, below; the authors' code: github.com/hlzl/gwa):

    g_i = -(p_i - y_i) z_i^T                       the NEGATIVE gradient of CE_i wrt W
    a_i = <g_i, W>_F / (|g_i|_F |W|_F)              in [-1, 1]; 0 where |g_i| |W| = 0
    <g_i, W> = -(p_i - y_i) . (W z_i),   |g_i| = |z_i| |p_i - y_i|

Epoch score over every a_i collected during the epoch's update steps:

    GWA_T = mean(a) / (kurt(a) + 1.2),   kurt = m4 / m2^2 - 3   (biased excess kurtosis)

W is read BEFORE the optimizer step (the authors' JAX code). Everything is computed under
no_grad in float64; the head bias is excluded. Guards the authors' code lacks: kurt + 1.2
<= 0 (bimodal scores) or undefined kurtosis (all a_i equal, e.g. a zero-initialised head)
give GWA_T = nan, and such an epoch is never selected.

Reference: Hoelzl, Rueckert, Kaissis, "Gradient-Weight Alignment as a Train-Time Proxy for
Generalization in Classification Tasks", NeurIPS 2025 (arXiv:2510.25480).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gradalign.engine.distributed import WeakGroup, all_gather_rows, full_norm, full_value, mesh_group
from gradalign.errors import GradAlignError
from gradalign.methods.head import HeadRecorder, is_head_output, label_distribution, residual

SELECTION_MODES = ("scratch", "finetune")  # best_epoch(mode=...): training from scratch or fine-tuning


def _check_targets(targets: Tensor, B: int, C: int) -> None:
    if targets.shape == (B,) and not targets.is_floating_point() and targets.dtype != torch.bool:
        if targets.device.type == "cpu":          # elsewhere end_epoch() checks, to avoid a sync per step
            check_classes(targets, C)
        return
    if targets.shape == (B, C) and targets.is_floating_point():
        return
    raise ValueError(f"targets must be (B,) = ({B},) class indices or ({B}, {C}) probabilities, "
                     f"got shape {tuple(targets.shape)} and dtype {targets.dtype}")


def check_classes(targets: Tensor, C: int) -> None:
    """Class indices must lie in [0, C)."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= C):
        raise ValueError(f"targets must be class indices in [0, {C}) for this head, got values from "
                         f"{int(targets.min())} to {int(targets.max())}")


def _sample_ids(sample_ids, device: torch.device) -> Tensor:
    """(B,) int64 ids from a tensor or sequence of integers; refuses floats, bools and strings."""
    if isinstance(sample_ids, Tensor):
        ids = sample_ids
    else:
        array = np.asarray(sample_ids)
        if array.dtype.kind not in "iu":
            raise ValueError(f"sample_ids must be integers, got {array.dtype} values such as {array.flat[0]!r}"
                             if array.size else "sample_ids must be integers")
        ids = torch.from_numpy(array.astype(np.int64))
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be integers, got {ids.dtype} (floats would be truncated)")
    return ids.to(device=device, dtype=torch.long).flatten()


def _alignment(Wz: Tensor, z_norm: Tensor, w_norm: Tensor, r: Tensor) -> Tensor:
    """a_i from W z_i (B, C), |z_i| (B,), |W| (scalar or (B,)) and r_i = p_i - y_i (B, C) float64."""
    dot = -(r * Wz.double()).sum(dim=1)                            # (B,) <g_i, W>
    denom = z_norm.double() * r.norm(dim=1) * w_norm.double()      # (B,) |g_i| |W|
    return torch.where(denom > 0, dot / denom, 0.0).clamp(-1.0, 1.0)


@torch.no_grad()
def gwa_alignment(head_weight: Tensor, embeddings: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample alignment a_i of the negative CE gradient wrt the head weight with W.

    Args:
        head_weight: (C, D) the head's weight W (bias excluded).
        embeddings: (B, D) the head's inputs z_i.
        logits: (B, C) the head's outputs.
        targets: (B,) class indices, or (B, C) probabilities (soft labels, e.g. mixup).

    Returns:
        (B,) float64 scores in [-1, 1]; 0 where |z_i| |p_i - y_i| |W| = 0.
    """
    if head_weight.dim() != 2:
        raise ValueError(f"head_weight must be (C, D), got shape {tuple(head_weight.shape)}")
    C, D = head_weight.shape
    B = embeddings.shape[0]
    if embeddings.shape != (B, D) or logits.shape != (B, C):
        raise ValueError(f"expected embeddings (B, {D}) and logits (B, {C}), got "
                         f"{tuple(embeddings.shape)} and {tuple(logits.shape)}")
    _check_targets(targets, B, C)
    W, z = head_weight.double(), embeddings.double()
    return _alignment(z @ W.T, z.norm(dim=1), W.norm(), residual(logits, targets, torch.float64))


class _BatchRecord(NamedTuple):
    """What update() keeps of one batch; the scores are computed at end_epoch, all at once.

    W z_i is recovered as logits_i - b (the forward used the pre-update W and b), so a step
    costs two norms and a copy of the bias, not the alignment's dozen small operations.
    """
    ids: Tensor          # (B,) int64
    logits: Tensor       # (B, C)
    targets: Tensor      # (B,) or (B, C)
    z_norm: Tensor       # (B,) |z_i|
    w_norm: Tensor       # () |W| before the update
    bias: Tensor | None  # (C,) b before the update


@torch.no_grad()
def step_scores(steps: list[_BatchRecord], C: int) -> Tensor:
    """(sum of B,) float64 alignment scores of the recorded steps (the monitor's per-update records), in
    one vectorised pass."""
    counts = torch.tensor([len(s.ids) for s in steps], device=steps[0].logits.device)
    logits = torch.cat([s.logits for s in steps])
    if all(not s.targets.is_floating_point() for s in steps):
        y = torch.cat([s.targets for s in steps])
    else:
        y = torch.cat([label_distribution(s.targets, C, torch.float64) for s in steps])
    Wz = logits.double()
    if steps[0].bias is not None:
        Wz = Wz - torch.stack([s.bias for s in steps]).double().repeat_interleave(counts, dim=0)
    w_norm = torch.stack([s.w_norm for s in steps]).repeat_interleave(counts)
    return _alignment(Wz, torch.cat([s.z_norm for s in steps]), w_norm, residual(logits, y, torch.float64))


def _mean_and_kurtosis(scores: Tensor) -> tuple[float, float]:
    """Mean and biased excess kurtosis m4/m2^2 - 3 in float64; kurtosis nan when m2 ~ 0.

    "m2 ~ 0" uses scipy.stats.kurtosis's test, m2 <= (resolution * mean)^2, so that
    scores equal up to rounding count as constant.
    """
    a = torch.as_tensor(scores).detach().double().flatten()
    if a.numel() == 0:
        raise ValueError("no scores: the epoch had no update() step")
    mean = a.mean()
    d = a - mean
    m2, m4 = d.pow(2).mean(), d.pow(4).mean()
    if m2 <= (1e-15 * mean) ** 2:
        return float(mean), math.nan
    return float(mean), float(m4 / m2 ** 2 - 3.0)


def _score(mean: float, kurtosis: float) -> tuple[float, str | None]:
    """GWA_T and, when it is nan, the reason the epoch cannot be selected."""
    if not math.isfinite(kurtosis):
        return math.nan, "kurtosis undefined (all scores equal, e.g. a zero head weight)"
    if kurtosis + 1.2 <= 0:
        return math.nan, f"denominator kurt + 1.2 = {kurtosis + 1.2:.4g} <= 0 (bimodal scores)"
    if not math.isfinite(mean):
        return math.nan, "non-finite scores"
    return mean / (kurtosis + 1.2), None


def gwa_score(scores: Tensor) -> float:
    """GWA_T = mean(a) / (kurt(a) + 1.2) of 1-D scores, in float64.

    kurt is the biased excess kurtosis (scipy.stats.kurtosis defaults). Returns nan when
    the denominator is <= 0 or the kurtosis is undefined (all scores equal).
    """
    return _score(*_mean_and_kurtosis(scores))[0]


class GWAMonitor:
    """Per-sample GWA during training, the epoch score GWA_T, and early-stopping choices.

    A forward hook on `head` records its input (detached) on every forward run with grad
    enabled, so evaluation under torch.no_grad() leaves the record alone.

    Example:
        ```python
        monitor = GWAMonitor(model.head)
        for epoch in range(epochs):
            for x, y, ids in batches:
                logits = model(x)
                F.cross_entropy(logits, y).backward()
                monitor.update(logits, y, ids)        # BEFORE optimizer.step(): W pre-update
                optimizer.step(); optimizer.zero_grad()
            monitor.end_epoch()
        best = monitor.best_epoch("scratch")
        monitor.remove()
        ```

    Args:
        head: the classifier's final nn.Linear (inside a DDP wrapper: `ddp.module.head`).
        process_group: data parallel: at end_epoch() every rank's scores and sample ids are
            gathered (two all_gathers per epoch: the counts, then an (n, 2) float64 table),
            so GWA_T, the best epoch and sample_scores() are those of the whole data set and
            the same on every rank. None: this process's samples only, or, for a head sharded
            with FSDP2 (a DTensor weight), its mesh's group (every rank then calls update() in
            step: |W| of a sharded head is one scalar all-reduce, its bias one all-gather).

    Attributes:
        epoch_scores: GWA_T per epoch (nan: not selectable, see `unselectable`).
        epoch_mean_alignment: mean a_i per epoch (the paper compares runs by its maximum).
        epoch_kurtosis: biased excess kurtosis per epoch (nan when undefined).
        unselectable: {epoch: reason} for every epoch whose GWA_T is nan.
    """
    process_group = WeakGroup()  # held weakly: never keeps a group alive past destroy_process_group

    def __init__(self, head: nn.Linear, *, process_group=None):
        self._recorder = HeadRecorder(head, detach=True, grad_only=True)
        self.head = head
        self.process_group = process_group if process_group is not None else mesh_group(head.weight)
        self.epoch_scores: list[float] = []
        self.epoch_mean_alignment: list[float] = []
        self.epoch_kurtosis: list[float] = []
        self.unselectable: dict[int, str] = {}
        self._pending: list[_BatchRecord] = []                          # this epoch's steps, not yet scored
        self._ids: list[np.ndarray] = []                        # per finished epoch, int64
        self._scores: list[np.ndarray] = []                     # per finished epoch, float32

    def update(self, logits: Tensor, targets: Tensor, sample_ids) -> None:
        """Record the batch of the latest training forward; call before optimizer.step().

        Cheap: the scores are computed at end_epoch() (or by last_scores()) from what is
        kept here, namely the logits, |z_i| and the pre-update |W| and bias.

        Args:
            logits: (B, C) the model's output for that forward.
            targets: (B,) class indices or (B, C) soft labels.
            sample_ids: (B,) integer ids (tensor or sequence), kept with each score.
        """
        z, output, _ = self._recorder.take()
        if z is None:
            raise GradAlignError("update() found no recorded head input: call it after the training "
                                 "forward (with grad enabled) and before the next one")
        if z.dim() != 2:
            raise ValueError(f"GWAMonitor needs a head whose input is (B, D), got {tuple(z.shape)}")
        if z.dtype in (torch.float16, torch.bfloat16):       # under autocast: |z_i| in float32
            z = z.float()
        ids = _sample_ids(sample_ids, z.device)
        B, C = z.shape[0], self.head.out_features
        if ids.numel() != B or logits.shape[0] != B:
            raise ValueError(f"batch sizes disagree: head input {B}, logits {logits.shape[0]}, "
                             f"sample_ids {ids.numel()}")
        if logits.shape != (B, C):
            raise ValueError(f"logits must be (B, {C}) for this head, got {tuple(logits.shape)}")
        if not is_head_output(logits, output):
            raise GradAlignError(
                "the logits given to update() are not the head's output in its latest training forward: "
                "another forward with grad enabled ran in between (run it under torch.no_grad(), or call "
                "update() right after the training forward), or the model changes the head's output before "
                "returning it (pass the head's own output)")
        _check_targets(targets, B, C)
        if B == 0:  # an empty batch: nothing to score (everything below is detached: no autograd bookkeeping)
            return
        bias = self.head.bias
        # a sharded head (FSDP2, resharded after its forward): |W| from its shards, the bias gathered
        self._pending.append(_BatchRecord(ids, logits.detach(), targets.detach(), torch.linalg.vector_norm(z, dim=1),
                                   full_norm(self.head.weight.detach()),
                                   None if bias is None else full_value(bias.detach()).clone()))

    def update_recorded(self, targets: Tensor, sample_ids) -> bool:
        """update() with the head's own recorded output as the logits (for callbacks that see
        the batch but not the model's output, e.g. Lightning's). False when no training
        forward was recorded since the last update (nothing to do)."""
        z, logits = self._recorder.peek()
        if z is None:
            return False
        self.update(logits, targets, sample_ids)
        return True

    def last_scores(self) -> Tensor:
        """(B,) float64 alignment scores of the latest update() of the current epoch."""
        if not self._pending:
            raise GradAlignError("last_scores() needs an update() since the last end_epoch()")
        return step_scores(self._pending[-1:], self.head.out_features)

    def end_epoch(self) -> float:
        """Close the epoch: GWA_T over every score since the previous end_epoch() (with a
        process group: over every rank's scores; a rank without updates contributes none)."""
        if not self._pending and self.process_group is None:
            raise GradAlignError("end_epoch() with no update() since the previous epoch")
        for k, step in enumerate(self._pending):
            if not step.targets.is_floating_point():
                try:
                    check_classes(step.targets, self.head.out_features)
                except ValueError as e:
                    self._pending = []               # the epoch is lost, the monitor is not stuck
                    raise ValueError(f"update() #{k + 1} of this epoch: {e}; the epoch's scores are dropped") from None
        if self._pending:
            ids = torch.cat([step.ids for step in self._pending])
            scores = step_scores(self._pending, self.head.out_features)
        else:
            ids, scores = (torch.zeros(0, dtype=t, device=self.head.weight.device) for t in (torch.long, torch.float64))
        self._pending = []
        if self.process_group is not None:          # the whole data set's scores, in rank order
            table = all_gather_rows(torch.stack([ids.to(scores.device, torch.float64), scores], 1),
                                    self.process_group)
            ids, scores = table[:, 0].round().long(), table[:, 1].contiguous()
            if ids.numel() == 0:
                raise GradAlignError("end_epoch() with no update() on any rank since the previous epoch")
        ids = ids.cpu().numpy()
        mean, kurtosis = _mean_and_kurtosis(scores)
        score, reason = _score(mean, kurtosis)
        epoch = len(self.epoch_scores)
        if reason is not None:
            self.unselectable[epoch] = reason
            warnings.warn(f"GWA epoch {epoch} is not selectable: {reason}", RuntimeWarning, stacklevel=2)
        self.epoch_scores.append(score)
        self.epoch_mean_alignment.append(mean)
        self.epoch_kurtosis.append(kurtosis)
        self._ids.append(ids)
        self._scores.append(scores.float().cpu().numpy())
        return score

    def state_dict(self) -> dict:
        """For a checkpoint (torch.load(weights_only=True) loads it): per-epoch sample ids and scores (CPU tensors,
        one per epoch), "pending": the open epoch's records ([] between epochs; resumed, it closes the same)."""
        pending = [{k: None if v is None else v.detach().cpu() for k, v in step._asdict().items()}
                   for step in self._pending]
        ids, scores = ([torch.from_numpy(a) for a in arrays] for arrays in (self._ids, self._scores))
        return {"epoch_scores": list(self.epoch_scores), "epoch_mean_alignment": list(self.epoch_mean_alignment),
                "epoch_kurtosis": list(self.epoch_kurtosis), "unselectable": dict(self.unselectable),
                "sample_ids": ids, "sample_scores": scores, "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() gave (continues as if never stopped), on the head's device; ids, scores: tensors or numpy."""
        self.epoch_scores, self.epoch_mean_alignment, self.epoch_kurtosis = (
            list(state[k]) for k in ("epoch_scores", "epoch_mean_alignment", "epoch_kurtosis"))
        self.unselectable = {int(k): v for k, v in state["unselectable"].items()}
        self._ids, self._scores = ([torch.as_tensor(a).cpu().numpy().astype(dtype) for a in state[k]]
                                   for k, dtype in (("sample_ids", np.int64), ("sample_scores", np.float32)))
        self._pending = [_BatchRecord(**{k: None if v is None else v.to(self.head.weight.device)
                                         for k, v in step.items()}) for step in state.get("pending", [])]

    def sample_scores(self) -> dict[str, np.ndarray]:
        """Every finished epoch's per-sample scores: {"sample_id", "epoch", "score"}, equal lengths."""
        counts = [len(i) for i in self._ids]
        return {
            "sample_id": np.concatenate(self._ids) if counts else np.zeros(0, np.int64),
            "epoch": np.repeat(np.arange(len(counts), dtype=np.int64), counts),
            "score": np.concatenate(self._scores) if counts else np.zeros(0, np.float32),
        }

    def best_epoch(self, mode: str = "scratch", skip_fraction: float | None = None, *,
                   skip_epochs: int | None = None) -> int:
        """The 0-based epoch the paper's early-stopping rule selects; nan epochs never count.

        mode="scratch": skip the first `skip_fraction` (default 0.1) of epochs, i.e. the
            floor(skip_fraction * E) epochs that end within that fraction of training (at
            least one epoch stays), and take the argmax of GWA_T.
        mode="finetune": skip the first `skip_fraction` (default 0) of epochs, find the first
            local minimum j of GWA_T (the first epoch followed by a larger score, or the last
            epoch if the scores never rise) and take the argmax over epochs >= j.
        skip_epochs: skip this many epochs instead of a fraction (e.g. 10% of the PLANNED
            epochs while training is still running; at least one epoch stays).
        Ties go to the earliest epoch.
        """
        if mode not in SELECTION_MODES:
            raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
        if skip_fraction is None:
            skip_fraction = 0.1 if mode == "scratch" else 0.0
        if not 0.0 <= skip_fraction < 1.0:
            raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction!r}")
        n = len(self.epoch_scores)
        if n == 0:
            raise GradAlignError("best_epoch() before any end_epoch()")
        skip = int(math.floor(skip_fraction * n + 1e-9)) if skip_epochs is None else int(skip_epochs)
        skip = min(skip, n - 1)
        epochs = [e for e in range(skip, n) if math.isfinite(self.epoch_scores[e])]
        if not epochs:
            raise GradAlignError(f"no selectable epoch after skipping {skip} of {n}: "
                                 f"{self.unselectable or 'every GWA_T is nan'}")
        values = [self.epoch_scores[e] for e in epochs]
        start = 0
        if mode == "finetune":
            start = next((k for k in range(len(values) - 1) if values[k + 1] > values[k]), len(values) - 1)
        best = max(range(start, len(values)), key=lambda k: (values[k], -k))
        return epochs[best]

    def should_stop(self, patience: int = 5, *, skip_epochs: int = 0) -> bool:
        """Online rule: True when GWA_T has not improved on its best for `patience` epochs.

        Epochs before `skip_epochs` are ignored (set it to about 10% of the planned epochs,
        the paper's warm-up). Nan epochs count as epochs without improvement. False while
        no selectable epoch exists yet, since there is no best to compare with.
        """
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        if not (isinstance(skip_epochs, int) and skip_epochs >= 0):
            raise ValueError(f"skip_epochs must be a non-negative integer, got {skip_epochs!r}")
        finite = [e for e in range(skip_epochs, len(self.epoch_scores)) if math.isfinite(self.epoch_scores[e])]
        if not finite:
            return False
        best = max(finite, key=lambda e: (self.epoch_scores[e], -e))
        return len(self.epoch_scores) - 1 - best >= patience

    def remove(self) -> None:
        """Detach the hook and drop the recorded input; the head is as it was. Idempotent."""
        self._recorder.remove()
