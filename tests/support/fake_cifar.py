"""Tiny CIFAR archives in the real "python version" format, for tests (nothing is downloaded).

    write_fake_cifar(root, "cifar10", n_train=100, n_test=50)           # root/cifar-10-python.tar.gz
    write_fake_cifar(root, "cifar100", form="folder")                   # root/cifar-100-python/{train,test}

Each member is a pickle (protocol 2, as the real ones) of a dict with "data" (N, 3072) uint8
and the label list ("labels"; CIFAR-100: "fine_labels" and "coarse_labels"). Labels cycle
through the classes, so every class has samples; images carry a faint class-dependent
pattern so that tiny models can learn something.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

LAYOUT = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", 10),
          "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", 100)}


def batch(n: int, classes: int, rng: np.random.Generator, offset: int = 0, label_key: str = "labels") -> dict:
    labels = [(i + offset) % classes for i in range(n)]
    pattern = (np.arange(3072) % 17 == 0)[None, :] * (np.array(labels)[:, None] * 7 % 64)
    data = (rng.integers(0, 192, size=(n, 3072)) + pattern).astype(np.uint8)
    out = {"data": data, label_key: labels, "batch_label": "fake"}
    if label_key == "fine_labels":
        out["coarse_labels"] = [label % 20 for label in labels]
    return out


def members(dataset: str, n_train: int, n_test: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    if dataset == "cifar10":
        per = [n_train // 5 + (i < n_train % 5) for i in range(5)]
        out = {f"data_batch_{i + 1}": batch(k, 10, rng, offset=sum(per[:i])) for i, k in enumerate(per)}
        out["test_batch"] = batch(n_test, 10, rng)
    else:
        out = {"train": batch(n_train, 100, rng, label_key="fine_labels"),
               "test": batch(n_test, 100, rng, label_key="fine_labels")}
    return {name: pickle.dumps(d, protocol=2) for name, d in out.items()}


def write_fake_cifar(root, dataset: str = "cifar10", *, n_train: int = 100, n_test: int = 50, form: str = "tar",
                     seed: int = 0, replace: dict[str, bytes] | None = None) -> Path:
    """Write the archive (form "tar") or the extracted folder ("folder") under root; return its path.

    replace: {member name: raw bytes} written instead of the generated member (malformed-data tests).
    """
    archive, folder, _ = LAYOUT[dataset]
    raw = {**members(dataset, n_train, n_test, seed), **(replace or {})}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if form == "folder":
        (root / folder).mkdir(exist_ok=True)
        for name, data in raw.items():
            (root / folder / name).write_bytes(data)
        return root / folder
    with tarfile.open(root / archive, "w:gz") as tar:
        for name, data in raw.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root / archive
