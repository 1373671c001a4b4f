"""`ga.validate`: every reason the engine would refuse a model, before training.

Without example inputs: the static walk (engine/validate.py `survey`), one line per module that no
rule can serve as configured (BatchNorm in training mode, a sparse Embedding, ...), and per trainable
parameter read in another module's forward (found in the source: engine/guards/static_uses.py),
nothing hooked.

With example inputs: also one forward and one backward on them, with `verify=True`, so the
problems that only a call shows are found too (a layer given the batch on another dim, T == B
with the layout undeclared, an operation the watch cannot follow, a key/value cache, a module
that mixes samples), and the route that serves each module. The model, its gradients and the
global RNG are left as they were.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_leaves

from gradalign.engine.capture import PerSampleGradients
from gradalign.engine.guards.static_uses import reads_outside
from gradalign.engine.rules.layout import batch_size
from gradalign.engine.rules import RuleRegistry, default_registry
from gradalign.engine.validate import survey
from gradalign.errors import GradAlignError

ROUTES = ("rule", "watched", "fallback", "shared", "refused", "not used")


class Validation(list):
    """The problems found, one string each with its fix (a list: `== []` when there are none), and
    `routes`: {module path: how the engine serves it}: "rule" (a native rule), "watched" (no rule;
    its parameters watched at their point of use), "fallback" (the torch.func fallback),
    "shared" (a rule run on a value shared by all samples), "refused", or "not used" (took no part
    in the example's losses). Without example inputs, routes holds "rule"/"watched" as the walk
    assigns them, and "refused". str() is a table of both."""

    def __init__(self, problems: list[str], routes: dict[str, str], types: dict[str, str]):
        super().__init__(problems)
        self.routes, self._types = routes, types

    def __str__(self) -> str:
        width = max([len(p or "<model>") for p in self.routes] + [6])
        lines = [f"{'module':<{width}}  route      type"]
        lines += [f"{p or '<model>':<{width}}  {r:<9}  {self._types[p]}" for p, r in self.routes.items()]
        lines += ["", "problems:" if self else "no problems"] + [f"  - {p}" for p in self]
        return "\n".join(lines)


def validate(model: nn.Module, *example_inputs, registry: RuleRegistry | None = None, batch_first: bool | None = None,
             loss: Callable[[object], Tensor] | None = None, **example_kwargs) -> Validation:
    """Every problem the engine would meet with `model`, each with its fix, and each module's route.

    Args:
        model: the network.
        *example_inputs: a batch to run (optional): model(*example_inputs, **example_kwargs) runs
            once, with one backward, under a verifying engine.
        registry: as for `PerSampleGradients`.
        batch_first: as for `PerSampleGradients`.
        loss: output -> (B,) per-sample losses for the example (default: a fixed random projection
            of every output tensor that carries the batch, so that every output takes part).
        **example_kwargs: the example's keyword arguments.
    Returns:
        A `Validation`: a list of problem strings ([] when the engine serves the model), with
        `.routes`.

    Example:
        ```python
        report = ga.validate(model, x)
        assert report == [], str(report)
        report.routes        # {"rnn": "rule", "head": "rule", ...}
        ```
    """
    registry = registry if registry is not None else default_registry()
    served, problems = survey(model, registry)
    types = {path: type(m).__name__ for path, m in model.named_modules()}
    routes = {s.path: "watched" if s.rule.watch else "rule" for s in served}
    refused = {p.split(" (")[0]: p for p in problems}
    routes.update(dict.fromkeys((p if p != "<model>" else "" for p in refused), "refused"))
    if not example_inputs and not example_kwargs:  # (a run finds the uses themselves: the census)
        names = {id(s.module.get_parameter(local)): full for s in served for local, full in s.param_names.items()}
        reads = reads_outside(model, names, {s.path: tuple(s.rule.owns) for s in served})
        return Validation(problems + reads, dict(sorted(routes.items())), types)
    frozen = [p for path, m in model.named_modules() if (path or "<model>") in refused
              for p in m.parameters() if p.requires_grad]  # left out of the run, restored after it
    grads = {p: p.grad for p in model.parameters()}
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            found, seen = _run(model, registry, batch_first, loss, example_inputs, example_kwargs, verify=not problems)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p, g in grads.items():
            p.grad = g
    for path in routes:
        if routes[path] != "refused":
            routes[path] = seen.get(path, "not used")
    return Validation(problems + found, dict(sorted(routes.items())), types)


def _run(model, registry, batch_first, loss, args: tuple, kwargs: dict, verify: bool) -> tuple[list[str], dict]:
    """(problems, routes) of one forward and backward on the example, verified unless a refused module
    (left out, and maybe mixing samples, as BatchNorm in training does) would fail the check anyway."""
    engine = PerSampleGradients(model, registry=registry, batch_first=batch_first, verify=verify)
    problems: list[str] = []
    try:
        output = model(*args, **kwargs)
        dim = 1 if batch_first is False else 0
        B = batch_size(args, kwargs, dim)
        losses = loss(output) if loss is not None else _projected(output, B, dim)
        if B is not None and B > 1 and batch_first is None:
            problems += [_ambiguous(path, type(model.get_submodule(path)).__name__, shape, B)
                         for path, shape in engine.ambiguous().items()]
        engine.backward(losses, write_grad=False)
    except (GradAlignError, ValueError) as err:
        if verify or not getattr(err, "samples_mixed", False):  # (else a refused module, left in, mixes them)
            problems.append(str(err))
    finally:
        routes = engine.routes()
        engine.remove()
    return problems, routes


def _projected(output, B: int | None, dim: int) -> Tensor:
    """(B,) losses: every output tensor that carries the batch (on the declared dim, else dim 0)
    projected on fixed random numbers, summed per sample."""
    if isinstance(output, PackedSequence):
        output = pad_packed_sequence(output, batch_first=True)[0]
    tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()]
    gen = torch.Generator().manual_seed(0)
    total = None
    for t in tensors:
        d = dim if t.dim() > dim and t.shape[dim] == B else 0 if t.dim() and t.shape[0] == B else None
        if d is None:
            continue
        t = t.movedim(d, 0).reshape(B, -1)
        r = torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
        total = (t * r).sum(1) if total is None else total + (t * r).sum(1)
    if total is None:
        raise ValueError(f"no output of the model carries the batch of {B} samples: pass loss=output -> (B,) losses")
    return total


def _ambiguous(path: str, kind: str, shape: tuple, B: int) -> str:
    return (f"{path or '<model>'} ({kind}): its input {tuple(shape)} has the batch size {B} on both dims 0 and 1, and "
            "the model's layout is not declared, so the engine takes dim 0 (batch-first). If the batch is dim 1 "
            "(sequence-first), declare it: ga.PerSampleGradients(model, batch_first=False) (or for this module "
            "type registry.register_layout(Type, lambda m: 1)); if it is dim 0, say so with batch_first=True")
