"""Data splits with optional symmetric label noise, shuffled batches, and 1-D augmentation.

``load_splits(config.data, data_dir)`` builds the splits of any supported data set
(``[data] dataset``): "mnist1d", generated procedurally by the ``mnist1d`` package from a
seed (same seed, same bytes; nothing is downloaded or cached on disk), or "cifar10" /
"cifar100", read from the standard archives in ``data_dir`` (cifar.py; never downloaded).
Every sample carries an integer id so that per-sample records (GWA scores, flipped labels)
can be joined later: training samples are numbered ``0 .. N_train - 1`` in the source's
order and test samples ``N_train .. N_train + N_test - 1``. Validation splits, label noise
and the Splits object are built the same way for every data set (``assemble``).
Image augmentation lives in augment.py.

Example:
    >>> splits = make_mnist1d(num_samples=4000, seed=42, label_noise=0.2)
    >>> len(splits.train_full), len(splits.train), len(splits.val), len(splits.test)
    (3200, 2560, 640, 800)
    >>> g = torch.Generator().manual_seed(0)
    >>> for x, y, ids in batches(splits.train, 32, g):
    ...     x1, x2 = augment(x, g), augment(x, g)   # two independent views
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

NUM_CLASSES = 10  # mnist1d digits; the generator makes num_samples // 10 samples per class


@dataclass(frozen=True)
class Split:
    """One split: inputs ``x`` (N, ...) (mnist1d: (N, 40) float32; CIFAR: (N, 3, 32, 32) uint8,
    prepared for the model by augment.py), labels ``y`` (N,) long, sample ids (N,) long."""

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
    ``flipped_ids`` (K,) long, sorted: ids whose label was replaced; ``noise_rate``: the rate asked for.
    ``dataset``: its name; ``num_classes``: the number of classes.
    """

    train: Split
    val: Split
    test: Split
    train_full: Split
    flipped_ids: Tensor
    noise_rate: float
    dataset: str = "mnist1d"
    num_classes: int = NUM_CLASSES

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


def split_sizes(num_samples: int, val_fraction: float) -> tuple[int, int, int]:
    """mnist1d's (train_full, train, val) sizes: the generator keeps 80% for training (the rest
    is the test set) and ``round(val_fraction * train_full)`` of those are held out for validation."""
    n_full = int(num_samples * 0.8)
    n_val = round(val_fraction * n_full)
    return n_full, n_full - n_val, n_val


def data_sizes(data) -> tuple[int, int, int]:
    """(train_full, train, val) sizes of an experiment's [data] table (a config.DataConfig),
    known without reading the data (CIFAR: 50,000 training images, or ``train_size``)."""
    if data.dataset == "mnist1d":
        return split_sizes(data.num_samples, data.val_fraction)
    from gradalign.experiments.cifar import TRAIN_IMAGES
    n_full = data.train_size or TRAIN_IMAGES
    n_val = round(data.val_fraction * n_full)
    return n_full, n_full - n_val, n_val


def load_splits(data, data_dir=None) -> Splits:
    """The splits an experiment's [data] table (a config.DataConfig) describes.

    data_dir: where the CIFAR archives are (cifar.py; unused for mnist1d). Raises
    cifar.DataError (a ConfigError) when they are missing or malformed.
    """
    if data.dataset == "mnist1d":
        return make_mnist1d(data.num_samples, data.seed, val_fraction=data.val_fraction,
                            label_noise=data.label_noise, noise_seed=data.noise_seed)
    from gradalign.experiments.cifar import make_cifar
    return make_cifar(data, data_dir)


def make_mnist1d(num_samples: int = 4000, seed: int = 42, *, val_fraction: float = 0.2,
                 label_noise: float = 0.0, noise_seed: int = 0) -> Splits:
    """Generate mnist1d and split it into train / val / test, with optional label noise.

    Args:
        num_samples: total samples given to the generator, a positive multiple of 10 (it makes
            ``num_samples // 10`` per class) and at least 20; 80% go to ``train_full``, 20% to
            ``test`` (the generator's own split: 4000 -> 3200 / 800, not stratified).
        seed: the generator's seed, in [0, 2**32); it also seeds the train/val partition.
        val_fraction: fraction of ``train_full`` held out as ``val``, in (0, 1). The partition is
            stratified by the CLEAN class (largest-remainder quotas, exactly
            ``round(val_fraction * N_train)`` samples), so it is the same at every noise rate.
        label_noise: symmetric noise rate r in [0, 1]: exactly ``round(r * N_train)`` training
            samples (Python ``round``) get a label drawn uniformly from the 9 other classes.
        noise_seed: seeds which samples are flipped and their new labels.

    Returns:
        Splits with float32 x of shape (N, 40), long y and long ids.

    The generator reseeds the global ``random`` and ``numpy.random`` RNGs; their states are
    saved and restored around it, so calling this leaves the caller's randomness untouched.
    """
    _check_args(num_samples, seed, val_fraction, label_noise, noise_seed)
    raw = _generate(num_samples, seed)
    return assemble(raw["x"].astype(np.float32), raw["y"].astype(np.int64), raw["x_test"].astype(np.float32),
                    raw["y_test"].astype(np.int64), num_classes=NUM_CLASSES, seed=seed, val_fraction=val_fraction,
                    label_noise=label_noise, noise_seed=noise_seed, dataset="mnist1d")


def assemble(x_train: np.ndarray, y_clean: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, num_classes: int,
             seed: int, val_fraction: float, label_noise: float, noise_seed: int, dataset: str,
             train_ids: np.ndarray | None = None, test_ids: np.ndarray | None = None) -> Splits:
    """Splits from arrays: label noise on the training part (drawn from ``noise_seed``), then a
    validation partition stratified by the clean class (drawn from ``seed``).

    train_ids, test_ids: the samples' ids (default ``0 .. N_train - 1`` and ``N_train ..``).
    """
    n_train = len(y_clean)
    y_noisy, flipped = _flip_labels(y_clean, label_noise, np.random.default_rng(noise_seed), num_classes)
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


def augment(x: Tensor, generator: torch.Generator, *, max_shift: int = 3,
            scale: tuple[float, float] = (0.8, 1.2), noise_std: float = 0.05) -> Tensor:
    """A random view of a batch of 1-D signals ``x`` (B, L); returns a new (B, L) tensor.

    Applied in this order, each drawn independently per sample from ``generator``:
    1. translation: shift by an integer s uniform in [-max_shift, max_shift] positions
       (``out[t] = x[t - s]``), filling the vacated end with zeros (no wrap-around);
    2. amplitude scaling: multiply by a factor uniform in [scale[0], scale[1]];
    3. additive Gaussian noise with standard deviation ``noise_std`` per element.
    Each call draws fresh randomness, so two calls give two independent views (for GVR).
    """
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"augment expects a floating tensor of shape (B, L); got {x.dtype} {tuple(x.shape)}")
    b, length = x.shape
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift < length:
        raise ValueError(f"max_shift must be an int in [0, {length}); got {max_shift!r}")
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high; got {scale!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std!r}")
    dev = generator.device
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), generator=generator, device=dev).to(x.device)
    factor = torch.empty(b, 1, device=dev).uniform_(lo, hi, generator=generator).to(x)
    noise = torch.randn(b, length, generator=generator, device=dev).to(x)
    source = torch.arange(length, device=x.device) - shift                     # (B, L)
    inside = (source >= 0) & (source < length)
    shifted = torch.gather(x, 1, source.clamp(0, length - 1)) * inside
    return shifted * factor + noise_std * noise


def _check_args(num_samples, seed, val_fraction, label_noise, noise_seed) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(num_samples) or num_samples < 2 * NUM_CLASSES or num_samples % NUM_CLASSES:
        raise ValueError(f"num_samples must be a multiple of {NUM_CLASSES} and at least {2 * NUM_CLASSES} "
                         f"(the generator makes num_samples // {NUM_CLASSES} per class); got {num_samples!r}")
    for name, value in (("seed", seed), ("noise_seed", noise_seed)):
        if not is_int(value) or not 0 <= value < 2**32:
            raise ValueError(f"{name} must be an int in [0, 2**32); got {value!r}")
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    n_train, _, n_val = split_sizes(num_samples, val_fraction)
    if not 1 <= n_val < n_train:
        raise ValueError(f"val_fraction={val_fraction} leaves {n_val} of {n_train} training samples for "
                         "validation; choose it so that both train and val are non-empty")
    if not (isinstance(label_noise, (int, float)) and 0 <= label_noise <= 1):
        raise ValueError(f"label_noise must be a rate in [0, 1]; got {label_noise!r}")


def _generate(num_samples: int, seed: int) -> dict:
    """Run the mnist1d generator with the global RNG states saved and restored."""
    from mnist1d.data import get_dataset_args, make_dataset  # imports matplotlib and requests

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _flip_labels(y: np.ndarray, rate: float, rng: np.random.Generator,
                 num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Replace exactly round(rate * N) labels by a uniformly drawn different class.

    Returns the noisy labels (N,) and the sorted positions that were flipped (K,).
    """
    flipped = np.sort(rng.choice(len(y), size=round(rate * len(y)), replace=False))
    noisy = y.copy()
    offset = rng.integers(1, num_classes, size=len(flipped))  # 1..C-1: never the same class
    noisy[flipped] = (y[flipped] + offset) % num_classes
    return noisy, flipped


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
