"""The splits an experiment's [data] table names, whatever the data set: ``load_splits`` reads
mnist1d (generated, mnist1d.py) or CIFAR (read from the archives in ``data_dir``, cifar.py);
``data_sizes`` gives the split sizes without reading anything."""
from __future__ import annotations

from gradalign.experiments.data.cifar import LAYOUT, TRAIN_IMAGES, make_cifar
from gradalign.experiments.data.mnist1d import make_mnist1d, split_sizes
from gradalign.experiments.data.splits import Splits

DATASETS = ("mnist1d",) + tuple(LAYOUT)


def data_sizes(data) -> tuple[int, int, int]:
    """(train_full, train, val) sizes of an experiment's [data] table (a config.DataConfig),
    known without reading the data (CIFAR: 50,000 training images, or ``train_size``)."""
    if data.dataset == "mnist1d":
        return split_sizes(data.num_samples, data.val_fraction)
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
                            label_noise=data.label_noise, noise_seed=data.noise_seed, noise_kind=data.noise_kind)
    return make_cifar(data, data_dir)
