"""CIFAR-10 and CIFAR-100 from the standard "python version" archives; never downloaded.

    data_dir/cifar-10-python.tar.gz    or  data_dir/cifar-10-batches-py/  (data_batch_1..5, test_batch)
    data_dir/cifar-100-python.tar.gz   or  data_dir/cifar-100-python/     (train, test)

from https://www.cs.toronto.edu/~kriz/cifar.html. ``data_dir`` may also be the extracted
folder itself. The extracted folder wins over the archive when both are there. Anything
missing or malformed raises DataError (a ConfigError: the CLI exits with code 2) naming the
files expected and where they come from, before anything is written.

The archives are Python pickles. They are read with an unpickler that accepts only what a
CIFAR batch holds (dicts, lists, strings, numpy arrays), so a tampered file cannot run code.
Images are kept as uint8 (N, 3, 32, 32) in the archives' order: training ids 0..49,999
(data_batch_1 first), test ids 50,000..59,999; pipelines.py turns them into model inputs.
CIFAR-100 uses its 100 fine labels.

``[data] train_size`` / ``test_size`` (0: all) keep a class-stratified random subset (drawn
from ``[data] seed``; the ids stay those of the full set), for quick runs on a CPU.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from gradalign.errors import ConfigError
from gradalign.experiments.data.splits import Splits, assemble, stratified_mask

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
DEFAULT_DATA_DIR = "data"

# dataset -> (archive, folder inside it, training members, test member, label key, classes)
LAYOUT = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch", "labels", 10),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "fine_labels", 100),
}


class DataError(ConfigError):
    """The data set's files are missing or malformed."""


def expected_files(dataset: str, data_dir) -> str:
    """One line naming what `load` looks for, for error messages and the README."""
    archive, folder, train, test, _, _ = LAYOUT[dataset]
    return (f"{Path(data_dir) / archive} or the extracted folder {Path(data_dir) / folder}/ "
            f"(with {', '.join(train + (test,))}); the 'CIFAR python version' archive from {URL} "
            "(gradalign never downloads it)")


class _SafeUnpickler(pickle.Unpickler):
    """Only the globals a CIFAR batch needs: numpy arrays and dtypes (and bytes, for protocol 2)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")


def _unpickle(raw: bytes) -> dict:
    obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()   # latin1: the archives are Python 2 pickles
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _source(dataset: str, data_dir) -> tuple[str, Path]:
    """("folder" | "archive", path) of the data, or DataError."""
    archive, folder, *_ = LAYOUT[dataset]
    root = Path(data_dir)
    for kind, path in (("folder", root / folder), ("folder", root), ("archive", root / archive)):
        if kind == "folder" and path.is_dir() and path.name == folder:
            return kind, path
        if kind == "archive" and path.is_file():
            return kind, path
    where = "does not exist" if not root.exists() else "has neither"
    raise DataError(f"{dataset}: {root} {where}: expected {expected_files(dataset, root)}; "
                    "pass its folder with --data-dir")


def _members(dataset: str, kind: str, path: Path) -> dict[str, bytes]:
    """The raw bytes of every member `load` needs."""
    _, folder, train, test, _, _ = LAYOUT[dataset]
    names = train + (test,)
    if kind == "folder":
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise DataError(f"{dataset}: {path} lacks {', '.join(missing)}: expected {expected_files(dataset, path.parent)}")
        return {n: (path / n).read_bytes() for n in names}
    out = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for n in names:
                try:
                    member = tar.getmember(f"{folder}/{n}")
                except KeyError:
                    raise DataError(f"{dataset}: archive {path} has no {folder}/{n}: expected "
                                    f"{expected_files(dataset, path.parent)}") from None
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{dataset}: {folder}/{n} in {path} is not a file")
                out[n] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{dataset}: {path} is not a readable tar.gz archive ({e}): expected "
                        f"{expected_files(dataset, path.parent)}") from None
    return out


def _batch(dataset: str, name: str, raw: bytes, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one member, checked."""
    try:
        d = _unpickle(raw)
        x, y = d["data"], d[label_key]
        x = np.asarray(x)
        y = np.asarray(y, dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"{dataset}: member {name} is not a CIFAR python batch ({type(e).__name__}: {e}); "
                        f"get the archive from {URL}") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],) or not len(y):
        raise DataError(f"{dataset}: member {name} holds data {x.dtype} {x.shape} and {y.shape} labels; expected "
                        f"uint8 (N, 3072) images and N labels; get the archive from {URL}")
    if y.min() < 0 or y.max() >= classes:
        raise DataError(f"{dataset}: member {name} has labels outside 0..{classes - 1}")
    return x.reshape(-1, 3, 32, 32), y


@functools.lru_cache(maxsize=2)
def _read(dataset: str, kind: str, path: str, stamp: tuple) -> tuple[np.ndarray, ...]:
    _, _, train, test, label_key, classes = LAYOUT[dataset]
    raw = _members(dataset, kind, Path(path))
    parts = [_batch(dataset, n, raw[n], label_key, classes) for n in train]
    x_test, y_test = _batch(dataset, test, raw[test], label_key, classes)
    arrays = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test)
    for a in arrays:
        a.setflags(write=False)                        # shared by the cache: never modified
    return arrays


def clear_cache() -> None:
    """Forget the archives read so far (the next `load` reads the files again)."""
    _read.cache_clear()


def load(dataset: str, data_dir=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train (N, 3, 32, 32) uint8, y_train (N,) int64, x_test, y_test) of "cifar10" or "cifar100".

    Read once per process and kept (read-only) for the next call with the same files.
    Raises DataError naming the expected files when they are missing or malformed.
    """
    if dataset not in LAYOUT:
        raise ConfigError(f"unknown CIFAR data set {dataset!r}; valid: {', '.join(LAYOUT)}")
    kind, path = _source(dataset, DEFAULT_DATA_DIR if data_dir is None else data_dir)
    files = [path] if kind == "archive" else sorted(path.iterdir())
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return _read(dataset, kind, os.fspath(path.resolve()), stamp)


def make_cifar(data, data_dir=None) -> Splits:
    """The Splits of an experiment's [data] table (config.DataConfig) with dataset cifar10/cifar100."""
    x_train, y_train, x_test, y_test = load(data.dataset, data_dir)
    classes = LAYOUT[data.dataset][5]
    train_ids, test_ids = np.arange(len(y_train)), np.arange(len(y_train), len(y_train) + len(y_test))
    rng = np.random.default_rng(data.seed)
    for size, name in ((data.train_size, "train_size"), (data.test_size, "test_size")):
        n = len(y_train) if name == "train_size" else len(y_test)
        if size > n:
            raise DataError(f"{data.dataset}: [data] {name} = {size} but the files hold {n} images")
    if data.train_size:
        keep = stratified_mask(y_train, data.train_size / len(y_train), rng)
        x_train, y_train, train_ids = x_train[keep], y_train[keep], train_ids[keep]
    if data.test_size:
        keep = stratified_mask(y_test, data.test_size / len(y_test), rng)
        x_test, y_test, test_ids = x_test[keep], y_test[keep], test_ids[keep]
    n_val = round(data.val_fraction * len(y_train))
    if not 1 <= n_val < len(y_train):
        raise DataError(f"{data.dataset}: val_fraction {data.val_fraction} leaves {n_val} of {len(y_train)} "
                        "training images for validation")
    return assemble(np.array(x_train), y_train.copy(), np.array(x_test), y_test.copy(),   # writable copies
                    num_classes=classes, seed=data.seed, val_fraction=data.val_fraction,
                    label_noise=data.label_noise, noise_seed=data.noise_seed, noise_kind=data.noise_kind,
                    dataset=data.dataset, train_ids=train_ids, test_ids=test_ids)
