"""The layer inputs the per-sample gradients read after the forward, and their version counters.

The per-sample representations are formed lazily from what each layer's forward kept (a
Linear's per-sample gradients are the factors (its inputs, its output gradients), read when a
statistic is first computed), so an input changed in place after the forward would change the
statistics read afterwards, silently. The usual pinned-buffer loader does exactly that: it
refills the batch tensor while the statistics of the previous batch may still be read. So:

- a layer input that IS one of the model's own inputs (a tensor passed to the model's forward,
  which the caller holds and may refill) is borrowed at the forward (`keep`: its version is
  checked at the backward) and copied after the backward only where the representations outlive
  it (`Call.own_inputs`; not with release=True, which reads every statistic inside the backward):
  at most one copy of the batch per step, usually for the first layer only, and the statistics
  never depend on the caller's tensor once the backward has returned;
- every other kept input is checked by its version counter, which torch bumps at every in-place
  change through any view of its storage (`InputVersions`): at the backward and whenever a
  statistic reads the representations, a changed one raises GradAlignError naming the layer,
  rather than give a statistic of values the forward never saw.
"""
from __future__ import annotations

from torch import Tensor

from gradalign.engine.representations import (
    Factored,
    FactoredBias,
    IndexedRows,
    RowBlocks,
    Summed,
)
from gradalign.errors import GradAlignError


def keep(args: tuple, model_inputs: tuple[int, ...]) -> tuple[tuple, list[tuple[Tensor, int]], tuple[int, ...]]:
    """(the call's arguments with every tensor detached, [(kept tensor, its version)] of them all, the
    positions of those sharing memory with one of the model's inputs (their data_ptr): `own` copies
    them once the backward is done, where the statistics outlive it)."""
    kept, versioned, borrowed = [], [], []
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            a = a.detach()
            versioned.append((a, a._version))
            if model_inputs and a.data_ptr() in model_inputs:
                borrowed.append(i)
        kept.append(a)
    return tuple(kept), versioned, tuple(borrowed)


def own(captured: tuple, borrowed: tuple[int, ...]) -> tuple:
    """`captured` with a copy of each borrowed tensor (`keep`), so that the caller may refill its own."""
    return tuple(a.clone() if i in borrowed else a for i, a in enumerate(captured))


def versions(tensors) -> list[tuple[Tensor, int]]:
    """(tensor, its version now) for every tensor in `tensors` (others skipped)."""
    return [(t, t._version) for t in tensors if isinstance(t, Tensor)]


def _input_side(rep) -> list[Tensor]:
    """The tensors of a representation that may be a layer's input itself: a Factored map's A
    (also through a bias's map, row blocks and the parts of a sum), an embedding's indices."""
    if isinstance(rep, Factored):
        return [rep.A]
    if isinstance(rep, FactoredBias):
        return [rep.of.A]
    if isinstance(rep, IndexedRows):
        return [rep.index]
    if isinstance(rep, (RowBlocks, Summed)):
        return [t for part in (rep.blocks if isinstance(rep, RowBlocks) else rep.parts) for t in _input_side(part)]
    return []


def read_lazily(kept: list[tuple[Tensor, int]], representations) -> list[tuple[Tensor, int]]:
    """The kept inputs whose memory the representations still read (a Linear's inputs, an
    Embedding's ids), not those they were computed from once (a convolution's unfolded patches, a
    norm's dense gradients): only those must stay unchanged, and holding them costs nothing."""
    if not kept:
        return kept
    sides = [t for rep in representations for t in _input_side(rep)]
    starts = {t.data_ptr() for t in sides}
    if all(t.data_ptr() in starts for t, _ in kept):  # views from the input's own start: a Linear's A
        return kept
    held = {t.untyped_storage().data_ptr() for t in sides}
    return [(t, v) for t, v in kept if t.untyped_storage().data_ptr() in held]


class InputVersions:
    """The kept inputs of one backward's calls: [(where, tensor, version when kept)]."""

    def __init__(self, entries: list[tuple[str, Tensor, int]]):
        self.entries = entries

    @classmethod
    def of_calls(cls, calls: list) -> InputVersions:
        return cls([(c.path or "<model>", t, v) for c in calls for t, v in c.inputs])

    def check(self, after: str) -> None:
        """Raise GradAlignError if a kept input changed in place since it was kept."""
        for where, t, v in self.entries:
            if t._version != v:
                raise changed(where, t, v, after)

    @staticmethod
    def check_calls(calls: list, after: str) -> None:
        """`check` for the kept inputs of recorded calls, without collecting them first."""
        for call in calls:
            for t, v in call.inputs:
                if t._version != v:
                    raise changed(call.path or "<model>", t, v, after)


def settle_inputs(calls: list, copies: bool) -> None:
    """At the backward: refuse any kept input changed in place since its forward; then, with `copies`
    (the representations outlive the backward), each call's borrowed model inputs become copies."""
    InputVersions.check_calls(calls, "between its forward and this backward")
    for call in calls if copies else ():
        if call.own_inputs and call.grads:
            call.own_inputs()


def changed(where: str, t: Tensor, v: int, after: str) -> GradAlignError:
    return GradAlignError(
        f"an input of {where} was modified in place {after} (its version went from {v} to {t._version}): its "
        "per-sample gradients are formed from the values its forward used, which are gone. Read the statistics you "
        "need before changing the tensor (e.g. in the weights callable, or right after backward), change a copy, or "
        "use an out-of-place operation (x = x + y, not x += y)")
