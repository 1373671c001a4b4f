"""What a trained model did with the flipped labels, and the per-sample label records.

    memorisation(pred, splits, train_set)   accuracy on the flipped training samples w.r.t. their
                                            noisy and clean labels, and on the others
    label_records(sample_ids, splits)       per training sample: flipped or not, its clean label
"""
from __future__ import annotations

import numpy as np


def memorisation(pred: np.ndarray, splits, train_set) -> dict:
    """How the final model classifies the training samples it trained on, flipped or not.

    pred: (N,) the model's predicted classes of `train_set`, in its order. flipped_acc_noisy:
    accuracy on the flipped samples w.r.t. their NOISY labels (how much noise was memorised);
    flipped_acc_clean: w.r.t. their CLEAN labels (how much was recovered); clean_train_acc:
    accuracy on the samples that were not flipped. Empty when the training set holds no
    flipped sample.
    """
    if splits.flipped_clean is None or not len(splits.flipped_ids):
        return {}
    ids = train_set.ids.cpu().numpy()
    flipped_ids = splits.flipped_ids.cpu().numpy()
    is_flipped = np.isin(ids, flipped_ids)
    if not is_flipped.any():
        return {}
    y = train_set.y.cpu().numpy()
    clean_of = dict(zip(flipped_ids.tolist(), splits.flipped_clean.cpu().numpy().tolist()))
    clean = np.array([clean_of[i] for i in ids[is_flipped]])
    out = {"flipped_acc_noisy": float(np.mean(pred[is_flipped] == y[is_flipped])),
           "flipped_acc_clean": float(np.mean(pred[is_flipped] == clean))}
    if (~is_flipped).any():
        out["clean_train_acc"] = float(np.mean(pred[~is_flipped] == y[~is_flipped]))
    return out


def label_records(sample_ids: np.ndarray, splits) -> dict[str, np.ndarray]:
    """{"flipped" (N,) bool, "clean_label" (N,) int64} of training samples given by id (N,)."""
    ids = np.asarray(sample_ids, np.int64)
    full = splits.train_full
    label = np.empty(int(full.ids.max()) + 1, np.int64)
    label[full.ids.cpu().numpy()] = full.y.cpu().numpy()
    flipped_ids = splits.flipped_ids.cpu().numpy()
    if len(flipped_ids) and splits.flipped_clean is not None:
        label[flipped_ids] = splits.flipped_clean.cpu().numpy()
    return {"flipped": np.isin(ids, flipped_ids), "clean_label": label[ids]}
