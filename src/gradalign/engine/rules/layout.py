"""The batch contract: where the batch is on the model's input and on each hooked module's input.

B is the size of the batch dim of the model's first argument (a tensor, or a PackedSequence: its
number of sequences). That dim is 0, or 1 for a model declared sequence-first
(`PerSampleGradients(model, batch_first=False)`) or for a root module registered with a layout.
Modules can move the batch for everything they call: nn.Transformer* with batch_first=False
(dim 1), Opacus's SequenceBias (dim 1 unless batch_first), and any type declared with
`RuleRegistry.register_layout(type, module -> dim)`; the innermost such module declares the dim.

A module's own call then takes the declared dim, unless its input shows otherwise:
  - torch fixes the batch on dim 0 for some modules whatever the layout (convolutions, GroupNorm,
    BatchNorm, EmbeddingBag): their rules say so (`Rule.features` None);
  - an input whose declared dim is one of its feature dims (a pooled (B, H) in a sequence-first
    model: nn.Linear's last dim), or has a size there that is neither B nor 1 while its dim 0
    has size B (a batch-first tensor in a sequence-first model), has the batch on dim 0.
A size of 1 on the declared dim is a value shared by all samples (a (T, 1) position index).
Where both dims have size B (T == B), the declaration decides: that is why a sequence-first
model must be declared (`ga.validate(model, example)` says so when it sees T == B undeclared).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

Features = int | Callable[[nn.Module], int] | None


def first_argument(args: tuple, kwargs: dict) -> Tensor | PackedSequence | None:
    """The first tensor (or PackedSequence) among a call's arguments, positional first."""
    for a in args:  # a loop, not a generator: this runs at every hooked call
        if isinstance(a, (Tensor, PackedSequence)):
            return a
    for a in kwargs.values():
        if isinstance(a, (Tensor, PackedSequence)):
            return a
    return None


def batch_size(args: tuple, kwargs: dict, batch_dim: int) -> int | None:
    """B: the size of the batch dim of the first tensor argument (a PackedSequence's sequences)."""
    t = first_argument(args, kwargs)
    if isinstance(t, PackedSequence):
        return int(t.batch_sizes[0])
    return t.shape[batch_dim] if t is not None and t.dim() > batch_dim else None


def feature_dims(features: Features, module: nn.Module) -> int | None:
    return features(module) if callable(features) else features


def call_batch_dim(x, declared: int, batch: int | None, features: int | None) -> int:
    """The batch dim of a module's first input x (see the module docstring).

    declared: the enclosing layout's dim; batch: B (None: unknown); features: the trailing dims of x
    that are never the batch (nn.Linear: 1; None: the batch is dim 0 whatever the layout)."""
    if features is None:
        return 0
    if declared == 0 or not isinstance(x, Tensor):
        return declared
    holds = x.dim() - features  # the dims that can hold the batch
    if declared < holds and (batch is None or x.shape[declared] in (batch, 1)):
        return declared
    if holds > 0 and x.shape[0] == batch:  # already batch first: a pooled (B, H), h_n[-1]
        return 0
    return declared if declared < holds else 0


def ambiguous(x, batch: int | None, features: int | None) -> bool:
    """Whether x has size B on both dims 0 and 1, both able to hold the batch (T == B): only a
    declaration tells which is the batch."""
    return (features is not None and isinstance(x, Tensor) and batch is not None and batch > 1
            and x.dim() - features >= 2 and x.shape[0] == x.shape[1] == batch)


def batch_mismatch(call, losses: int, batch_first: bool | None) -> str:
    """Why a recorded call's batch (call.batch, on its input's dim call.batch_dim) is not the number
    of losses, and the fix: the losses are not one per sample, or the module's input does not
    carry the batch where the engine looks for it."""
    where = f"{call.path or '<model>'} saw a batch of {call.batch} samples (dim {call.batch_dim} of its input)"
    if call.root == call.batch or call.root is None and call.batch is not None:
        return (f"{where}, as the model's input has, but losses has {losses} entries: give one loss per sample, "
                "e.g. F.cross_entropy(..., reduction='none'), and average a sequence's token losses per sample "
                "(ga.token_losses)")
    declared = "batch_first=False" if batch_first is False else "batch-first"
    return (f"{where}, but the model's input has {call.root} and losses has {losses} entries: the layout is "
            f"{declared}, so the batch was looked for on the wrong dim of the model's input or of this module's. "
            "Fix: declare where the batch is: ga.PerSampleGradients(model, batch_first=False) for a sequence-first "
            "model ((T, B, ...) inputs), or for one module type registry.register_layout(Type, lambda m: dim)")


def root_mismatch(root: int, losses: int, batch_first: bool | None) -> str:
    """Why the model's input has `root` samples where losses has `losses` entries, and the fix."""
    dim = 1 if batch_first is False else 0
    other = ("ga.PerSampleGradients(model, batch_first=False) if its input is sequence-first ((T, B, ...))"
             if batch_first is not False else "batch_first=True (the default) if its input is batch-first")
    return (f"the model's first input has {root} entries on dim {dim}, where the engine reads the batch, but losses "
            f"has {losses} entries. If the batch is on another dim of the model's input, declare it: {other}; "
            "otherwise give one loss per sample (reduction='none'; ga.token_losses averages a sequence's tokens)")
