"""Splits of a data set: `Split` (inputs, labels, sample ids), `Splits` (train / val / test /
train_full, the label noise applied), `assemble` (arrays -> Splits: label noise on the training
part, then a validation split stratified by the clean class), and shuffled `batches`.

Every sample carries an integer id so that per-sample records (GWA scores, flipped labels)
can be joined later: training samples are numbered ``0 .. N_train - 1`` in the source's
order and test samples ``N_train .. N_train + N_test - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from gradalign.experiments.data.label_noise import flip_labels


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` (N, ...) (mnist1d: (N, 40) float32; CIFAR: (N, 3, 32, 32) uint8,
    prepared for the model by pipelines.py), labels ``y`` (N,) long, sample ids (N,) long."""

    x: Tensor
    y: Tensor
    ids: Tensor

    def __post_init__(self):
        n = self.x.shape[0]
        if self.x.ndim < 2 or self.y.shape != (n,) or self.ids.shape != (n,):
            raise ValueError(f"Split expects x (N, ...), y (N,), ids (N,); got x {tuple(self.x.shape)}, "
                             f"y {tuple(self.y.shape)}, ids {tuple(self.ids.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "Split":
        """The same split on `device` (self when it is already there)."""
        if self.x.device == torch.device(device):
            return self
        return Split(self.x.to(device), self.y.to(device), self.ids.to(device))


@dataclass(frozen=True)
class Splits:
    """All splits of one data set.

    ``train_full`` is the generator's whole training part (for final runs); ``train`` and
    ``val`` partition it (for tuning). Label noise is applied to ``train_full`` before the
    partition, so ``train`` and ``val`` carry the same noisy labels; ``test`` is never noisy.
    ``flipped_ids`` (K,) long, sorted: ids whose label was replaced; ``noise_rate``: the rate asked for;
    ``noise_kind``: the noise model (label_noise.NOISE_KINDS); ``flipped_clean`` (K,) long: the clean
    labels of ``flipped_ids``. ``dataset``: its name; ``num_classes``: the number of classes.
    """

    train: Split
    val: Split
    test: Split
    train_full: Split
    flipped_ids: Tensor
    noise_rate: float
    noise_kind: str = "symmetric"
    flipped_clean: Tensor | None = None
    dataset: str = "mnist1d"
    num_classes: int = 10                  # mnist1d's digits

    def to(self, device) -> "Splits":
        """Every split on `device` (flipped_ids stay on the CPU); splits that share a tensor
        are moved once, so train and train_full do not both take device memory twice."""
        moved: dict[int, Split] = {}

        def move(split: Split) -> Split:
            if id(split) not in moved:
                moved[id(split)] = split.to(device)
            return moved[id(split)]
        return replace(self, train=move(self.train), val=move(self.val), test=move(self.test),
                       train_full=move(self.train_full))


def assemble(x_train: np.ndarray, y_clean: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, num_classes: int,
             seed: int, val_fraction: float, label_noise: float, noise_seed: int, dataset: str,
             noise_kind: str = "symmetric", train_ids: np.ndarray | None = None,
             test_ids: np.ndarray | None = None) -> Splits:
    """Splits from arrays: label noise on the training part (drawn from ``noise_seed``), then a
    validation partition stratified by the clean class (drawn from ``seed``).

    train_ids, test_ids: the samples' ids (default ``0 .. N_train - 1`` and ``N_train ..``).
    """
    n_train = len(y_clean)
    y_noisy, flipped = flip_labels(y_clean, label_noise, np.random.default_rng(noise_seed), noise_kind, num_classes)
    train_ids = np.arange(n_train) if train_ids is None else train_ids
    test_ids = np.arange(n_train, n_train + len(y_test)) if test_ids is None else test_ids
    train_full = _split(x_train, y_noisy, train_ids)
    val_mask = stratified_mask(y_clean, val_fraction, np.random.default_rng(seed))
    return Splits(
        train=_split(x_train[~val_mask], y_noisy[~val_mask], train_ids[~val_mask]),
        val=_split(x_train[val_mask], y_noisy[val_mask], train_ids[val_mask]),
        test=_split(x_test, y_test, test_ids),
        train_full=train_full,
        flipped_ids=torch.from_numpy(train_ids[flipped]),
        noise_rate=float(label_noise),
        noise_kind=noise_kind,
        flipped_clean=torch.from_numpy(y_clean[flipped]),
        dataset=dataset,
        num_classes=num_classes,
    )


def batches(split: Split, batch_size: int, generator: torch.Generator, *,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One epoch of shuffled mini-batches ``(x (b, L), y (b,), ids (b,))``.

    The order is a ``torch.randperm`` drawn from ``generator`` (a CPU generator), so the same
    generator state gives the same batches on any device (the indices are moved to the
    split's). Every sample appears exactly once per epoch; the last batch is smaller unless
    ``drop_last`` is True, which drops it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    order = torch.randperm(len(split), generator=generator).to(split.x.device)
    stop = len(split) - len(split) % batch_size if drop_last else len(split)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield split.x[idx], split.y[idx], split.ids[idx]


def stratified_mask(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (N,) selecting exactly round(fraction * N) samples, stratified by class.

    Each class gets floor(fraction * n_c) samples; the remaining slots go to the classes with
    the largest fractional parts (ties to the lower class index).
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    extra = round(fraction * len(y)) - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    mask = np.zeros(len(y), dtype=bool)
    for c, k in zip(classes, take):
        mask[rng.permutation(np.flatnonzero(y == c))[:k]] = True
    return mask


def _split(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.copy()),
                 torch.from_numpy(ids.copy()))
