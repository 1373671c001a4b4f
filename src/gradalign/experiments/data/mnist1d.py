"""mnist1d, generated procedurally by the ``mnist1d`` package from a seed (same seed, same bytes;
nothing is downloaded or cached on disk), and its 1-D augmentation.

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

import numpy as np
import torch
from torch import Tensor

from gradalign.experiments.data.splits import Splits, assemble

NUM_CLASSES = 10  # mnist1d digits; the generator makes num_samples // 10 samples per class


def split_sizes(num_samples: int, val_fraction: float) -> tuple[int, int, int]:
    """mnist1d's (train_full, train, val) sizes: the generator keeps 80% for training (the rest
    is the test set) and ``round(val_fraction * train_full)`` of those are held out for validation."""
    n_full = int(num_samples * 0.8)
    n_val = round(val_fraction * n_full)
    return n_full, n_full - n_val, n_val


def make_mnist1d(num_samples: int = 4000, seed: int = 42, *, val_fraction: float = 0.2,
                 label_noise: float = 0.0, noise_seed: int = 0, noise_kind: str = "symmetric") -> Splits:
    """Generate mnist1d and split it into train / val / test, with optional label noise.

    Args:
        num_samples: total samples given to the generator, a positive multiple of 10 (it makes
            ``num_samples // 10`` per class) and at least 20; 80% go to ``train_full``, 20% to
            ``test`` (the generator's own split: 4000 -> 3200 / 800, not stratified).
        seed: the generator's seed, in [0, 2**32); it also seeds the train/val partition.
        val_fraction: fraction of ``train_full`` held out as ``val``, in (0, 1). The partition is
            stratified by the CLEAN class (largest-remainder quotas, exactly
            ``round(val_fraction * N_train)`` samples), so it is the same at every noise rate.
        label_noise: noise rate r in [0, 1]: exactly ``round(r * N_train)`` training samples
            (Python ``round``) get another label, as ``noise_kind`` says.
        noise_seed: seeds which samples are flipped and their new labels.
        noise_kind: "symmetric" (a label drawn uniformly from the 9 other classes) or "pair"
            (class c becomes c + 1 mod 10; needs r < 0.5); see label_noise.py.

    Returns:
        Splits with float32 x of shape (N, 40), long y and long ids.

    The generator reseeds the global ``random`` and ``numpy.random`` RNGs; their states are
    saved and restored around it, so calling this leaves the caller's randomness untouched.
    """
    _check_args(num_samples, seed, val_fraction, label_noise, noise_seed)
    raw = _generate(num_samples, seed)
    return assemble(raw["x"].astype(np.float32), raw["y"].astype(np.int64), raw["x_test"].astype(np.float32),
                    raw["y_test"].astype(np.int64), num_classes=NUM_CLASSES, seed=seed, val_fraction=val_fraction,
                    label_noise=label_noise, noise_seed=noise_seed, noise_kind=noise_kind, dataset="mnist1d")


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
