"""Evaluating a model on a whole split: its logits batch by batch, and mean loss and accuracy."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def logits_of(model: nn.Module, split, batch_size: int = 2048, *, prepare=None,
              autocast=None) -> Iterator[tuple[Tensor, Tensor]]:
    """(logits, y) of a whole split, batch by batch, in eval mode without gradients (the
    model's mode is restored once the split is done).

    prepare: stored inputs -> model inputs (a pipeline's prepare; default: as stored);
    autocast: a callable giving the forward's context (default: none).
    """
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(split), batch_size):
            x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
            if prepare is not None:
                x = prepare(x)
            with (autocast or contextlib.nullcontext)():
                logits = model(x)
            yield logits, y
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, split, batch_size: int = 2048, *, prepare=None, autocast=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on a whole split (see logits_of)."""
    loss, correct = 0.0, 0
    for logits, y in logits_of(model, split, batch_size, prepare=prepare, autocast=autocast):
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss / len(split), correct / len(split)
