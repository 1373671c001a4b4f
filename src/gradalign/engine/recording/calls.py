"""What one training forward leaves for the backward, per hooked module: the record of each
call (`Call`: where its gradients are taken, how they become per-sample gradients, and what the
guards need: its inputs' versions and autograd nodes) and the served module with its records
(`Hooked`). recorder.py makes them; engine/capture.py consumes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from torch import Tensor
from torch.autograd.graph import GradientEdge

from gradalign.engine.validate import Served


def nodes(tensors) -> tuple:
    """The grad_fn of every tensor among `tensors` that has one (where a call's own graph ends)."""
    return tuple(t.grad_fn for t in tensors if isinstance(t, Tensor) and t.grad_fn is not None)


@dataclass
class Call:
    """One recorded call of a hooked module: the autograd edges where its gradients are taken
    (fixed at the forward: later in-place ops on an output don't move them), how many samples
    it saw, and `finish`, which turns the gradients there into {local name: per-sample grad}."""

    path: str
    batch: int | None
    edges: list[GradientEdge]
    finish: Callable[[list], dict]
    grads: list | None = None  # after the backward: the gradient at each edge (None: unused)
    generation: int = 0        # which forward of the model recorded it
    own_cosines: Callable[[], bool] | None = None  # whether its cosine terms come without S (Rule.own_cosines), asked
                                                  # only by a backward whose weighting needs cosines
    full: bool = True          # its output is float32 or float64 (not a half model, not autocast)
    watched: bool = False      # its S is not asked of autograd (a watch, engine/watching; a parametrization)
    route: str = "rule"        # rule, watched, fallback (torch.func), or shared (a rule on a value shared by all samples)
    root: int | None = None    # B of the model's forward that made this call (from its first argument)
    batch_dim: int = 0         # where this call's input had the batch
    single_output: bool = False  # a rule's one output, its batch on batch_dim too (the separability check)
    inputs: list = field(default_factory=list)  # (tensor, version) of what finish reads (engine/guards/inputs.py)
    own_inputs: Callable[[], None] | None = None  # copies the model's inputs finish would read (guards/inputs.py)
    stops: tuple = ()          # the grad_fn of its inputs: where its own part of the graph ends (guards/census.py)
    starts: tuple | None = None  # the nodes its own part starts from (None: its edges')
    claims: tuple = ()         # a watch's aliases of its parameters (engine/guards/census.py)


@dataclass
class Hooked(Served):
    """A served module, the calls recorded since the last backward, and what the pre-forward
    hook left for each forward in progress (a Watch, a rule's capture, or None)."""

    calls: list[Call] = field(default_factory=list)
    pending: list = field(default_factory=list)
    latest: dict = field(default_factory=dict)  # its parametrizations' latest outputs (recording/parametrized.py)

    @cached_property
    def where(self) -> str:
        """How messages name the module: "path (Type)"."""
        return f"{self.path or '<model>'} ({type(self.module).__name__})"
