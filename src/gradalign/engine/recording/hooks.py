"""The plumbing every engine hook shares: running eagerly under torch.compile, and telling a
training forward from a recomputation inside a backward or a call inside a torch.func transform.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge


def eager(hook):
    """Under torch.compile every engine hook runs eagerly (a graph break at each hooked layer):
    it needs the autograd edges of real tensors and mutates the engine's Python state. Outside
    torch.compile the hook is called directly: the disabling wrapper costs several microseconds
    per call (dynamo's frame callback is swapped out and back), at every hooked layer."""
    disabled = torch.compiler.disable(hook)

    @functools.wraps(hook)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # being traced: break the graph, run the hook eagerly
            return disabled(*args, **kwargs)
        return hook(*args, **kwargs)
    return run


def edge(t: Tensor) -> GradientEdge:
    """The autograd edge where t's gradient arrives: torch's get_gradient_edge, without its Python
    detour for the common case, an op's output."""
    fn = t.grad_fn
    return GradientEdge(fn, t.output_nr) if fn is not None else get_gradient_edge(t)


def in_backward() -> bool:
    """True while autograd runs a backward: a forward now is a recomputation (an activation
    checkpoint's), whose records the original forward took already."""
    return torch._C._current_graph_task_id() != -1


def inside_torch_func(t: Tensor) -> bool:
    """True for a tensor inside a torch.func transform (vmap, grad): not a training forward."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for a in args:  # a loop, not a generator: this runs at every hooked call
        if isinstance(a, Tensor):
            return a
    for a in kwargs.values():
        if isinstance(a, Tensor):
            return a
    return None
