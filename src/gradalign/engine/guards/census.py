"""The census of a backward's graph: every use of a served parameter belongs to a recorded call,
and every loss belongs to its own sample.

The engine sees a parameter only where a hook sees it: in its module's forward (a rule's call,
or a watch of its point of use). A use anywhere else (a tied autoencoder's F.linear(h,
enc.weight.t()) in the parent's forward, a penalty on a weight added to the losses), or a use
in a forward the engine has no record of (dropped past `max_pending_forwards`, forgotten by
`engine.clear()`, run inside `engine.paused()`), would give per-sample gradients that are
silently wrong. The census walks the autograd graph of the losses once: every node that
consumes a served parameter (an edge into its AccumulateGrad node) must lie inside a recorded
call of a module that serves it, i.e. be reached from the call's outputs without passing its
inputs, or be the alias a watch made of it. It is a Python walk over the graph's nodes, so the
engine takes it at the first backward, after any event that may leave a forward unrecorded,
and at every backward with verify=True.

`check_separable` checks the losses themselves at the first backward: loss k must depend on
sample k alone. The gradient of losses[k] at a layer's output, one extra backward to the layer
outputs, is zero on every other sample's rows exactly when that holds (a zero row stays exactly
zero through every per-sample operation), so losses out of the inputs' order (losses[perm]) and
losses that mix samples (InfoNCE, a batch-normalised loss) are refused before any statistic is
formed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_leaves

from gradalign.errors import GradAlignError, LossesError, UnsupportedModuleError

_REENTRANT = "CheckpointFunctionBackward"


_REENTRANT_FIX = ("a reentrant activation checkpoint (torch.utils.checkpoint(..., use_reentrant=True)) runs its region "
                  "without gradients, then again inside the backward, where a backward of its own adds the region's "
                  "gradients to p.grad. Use use_reentrant=False (Hugging Face: model.gradient_checkpointing_enable("
                  "gradient_checkpointing_kwargs={'use_reentrant': False}); FSDP's checkpoint_wrapper: "
                  "CheckpointImpl.NO_REENTRANT, its default); for a part of the model run under torch.no_grad() on "
                  "purpose, set requires_grad=False on its parameters")


def _unrecorded_modules(hooked: dict, params: dict, among=None) -> str:
    """'a, b, c ...': served modules with a trainable parameter and no recorded call (of `among`)."""
    missing = sorted(path for path, h in hooked.items() if (among is None or path in among) and not h.calls
                     and any(params[n].requires_grad for n in h.param_names.values() if n in params))
    return f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"


def refuse_unfrozen(names: list[str]) -> None:
    """Before a backward: parameters that became trainable after its forward were not served in it."""
    if names:
        raise GradAlignError(
            f"{', '.join(names)} became trainable after the forward of these losses: the engine serves a parameter "
            "from the first training forward in which it requires grad. Unfreeze parameters between steps, before "
            "the forward (gradual unfreezing works that way)")


def refuse_reentrant_checkpoint(recorder, params: dict) -> None:
    """After the backward: a hooked module whose forward ran only inside it (or with gradients off
    inside a training forward) was never recorded: a reentrant checkpoint's region."""
    missing = _unrecorded_modules(recorder.hooked, params, recorder.recomputed | recorder.without_grad)
    if missing:
        raise UnsupportedModuleError(
            f"{missing} ran with gradients off inside the training forward (or only inside the backward), so no "
            f"per-sample gradient of their trainable parameters was recorded: {_REENTRANT_FIX}")


def _consumers(roots: list, served: set[int], hooked: dict, params: dict) -> dict[int, set]:
    """{id(parameter): nodes with an edge into its AccumulateGrad} over the graph below `roots`,
    for the served parameters; refuses reentrant activation checkpointing on the way."""
    found: dict[int, set] = {}
    seen, stack = set(roots), list(roots)
    while stack:
        node = stack.pop()
        if type(node).__name__ == _REENTRANT:
            raise UnsupportedModuleError(
                f"the losses pass through a reentrant activation checkpoint (modules without a record: "
                f"{_unrecorded_modules(hooked, params) or 'none'}): {_REENTRANT_FIX}")
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:  # an AccumulateGrad node: a leaf
                if id(variable) in served:
                    found.setdefault(id(variable), set()).add(node)
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def _claimed(call, own: set[int]) -> dict[int, set]:
    """{id(parameter): consumer nodes} inside one recorded call, for its module's parameters `own`."""
    claimed: dict[int, set] = {}
    for node in call.claims:  # a watch's aliases of its parameters
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in own:
                claimed.setdefault(id(variable), set()).add(node)
    starts = call.starts if call.starts is not None else [e.node for e in call.edges]
    stops = set(call.stops) - set(starts)  # (a compiled region may hold both a layer's input and output)
    seen, stack = set(starts), list(starts)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if id(variable) in own:
                    claimed.setdefault(id(variable), set()).add(node)
            elif child not in seen and child not in stops:
                seen.add(child)
                stack.append(child)
    return claimed


def take_census_when_due(recorder, losses: Tensor, params: dict[str, Tensor], calls: list, verify: bool) -> None:
    """The census at the first backward (and after new parameters became trainable), after anything
    that may have left a forward unrecorded (`recorder.unrecorded`), and at every backward with
    verify=True; the separability check at the first and with verify=True. `params`: the tensors
    autograd's graph holds for the trainable parameters (under FSDP the unsharded ones)."""
    if not (recorder.census_due or recorder.unrecorded or verify) or not (calls or recorder.unrecorded):
        return  # (no record at all and no cause: the engine's check of unseen parameters says why)
    take_census(losses, recorder.hooked, params, recorder.unrecorded)
    if recorder.census_due or verify:
        check_separable(losses, calls, recorder.outputs, recorder.ambiguous if recorder.batch_first is None else {})
    recorder.census_due = False


def take_census(losses: Tensor, hooked: dict, params: dict[str, nn.Parameter], causes: list[str]) -> None:
    """Raise if the graph of `losses` uses a trainable served parameter where no recorded call
    sees it. `causes`: why a forward may be unrecorded (dropped, cleared, paused), for the message."""
    if losses.grad_fn is None:
        return
    names = {id(p): n for n, p in params.items()}
    consumers = _consumers([losses.grad_fn], set(names), hooked, params)
    claimed: dict[int, set] = {}
    owners: dict[int, list[str]] = {}  # the modules with a recorded call that serve each parameter
    for h in hooked.values():
        own = {id(p) for local, full in h.param_names.items() if (p := params.get(full)) is not None}
        for key in own if h.calls else ():
            owners.setdefault(key, []).append(h.where)
        for call in h.calls:
            for key, nodes in _claimed(call, own).items():
                claimed.setdefault(key, set()).update(nodes)
    # (a parameter none of whose modules recorded a call: the backward's own check says why, unless a forward
    # may have gone unrecorded)
    unseen = sorted(names[key] for key, nodes in consumers.items()
                    if nodes - claimed.get(key, set()) and (causes or key in owners))
    if not unseen:
        return
    listed = ", ".join(unseen[:6]) + (f" and {len(unseen) - 6} more" if len(unseen) > 6 else "")
    if causes:
        raise GradAlignError(
            f"the losses depend on a forward of the model that the engine has no record of (parameters {listed} are "
            f"used there): {'; or '.join(causes)}. Per-sample gradients of that forward cannot be formed")
    where = sorted({o for key, n in names.items() if n in unseen for o in owners.get(key, [])})
    raise UnsupportedModuleError(
        f"parameter(s) {listed} are used outside the forward of {' and '.join(where)}, which owns them (as well as "
        "inside it), and the engine sees no use there (e.g. a tied weight used by its own module and again as "
        "F.linear(h, enc.weight.t()) in the parent's forward, a penalty on a parameter added to the losses, or a "
        "forward bypassed once: m.forward(x) instead of m(x)): their per-sample gradients would be wrong. Fix: make "
        "every use happen in a module's forward (call the module instead), e.g. register the same Parameter on a "
        "small module that does the computation (self.weight = enc.weight; forward: F.linear(h, self.weight.t())): "
        "the engine watches it there and adds the uses exactly; or freeze the parameter")


def output_edges(output, batch: int | None, batch_dim: int) -> list:
    """The gradient edges of the model's output tensors that carry the batch (for check_separable)."""
    return [get_gradient_edge(t) for t in tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad
            and t.dim() > batch_dim and t.shape[batch_dim] == batch]


def _spread(g: Tensor, batch_dim: int, B: int, k: int) -> list[int] | None:
    """The samples other than k whose rows of g (the gradient of losses[k] at a layer's output)
    are non-zero, with k itself last if its row is; None where g says nothing (all zero, or not
    finite)."""
    rows = g.detach().movedim(batch_dim, 0).reshape(B, -1)
    if not bool(torch.isfinite(rows).all()):
        return None
    nonzero = (rows != 0).any(1).tolist()
    if not any(nonzero):
        return None
    return [i for i, nz in enumerate(nonzero) if nz and i != k] + ([k] if nonzero[k] else [])


def check_separable(losses: Tensor, calls: list, outputs: list, ambiguous: dict | None = None) -> None:
    """Raise unless losses[k] depends on sample k alone, checked for two samples k (the first and
    the largest loss) at the model's outputs and at the output of every layer served by a rule:
    LossesError where a model output sees other samples (the losses mix them, or are out of
    order), UnsupportedModuleError where only layers inside the model do (a layer whose output
    does not carry the batch on the engine's batch dim, or a module after it that mixes samples).
    `outputs`: (generation, edge, batch dim) of the model's outputs; without them, the last layer
    recorded in each forward stands for its output. `ambiguous`: {path: input shape} of calls with
    the batch size on dims 0 and 1 and the layout undeclared: then the layout is named first."""
    B = losses.shape[0]
    layers = [(c.generation, c.edges[0], c.batch_dim, c.path) for c in calls
              if c.single_output and len(c.edges) == 1 and c.batch == B]
    if B < 2 or not (layers or outputs) or losses.device.type == "meta":
        return
    last = {g: path for g, _, _, path in layers}  # the last layer recorded in each forward
    ends = [(g, e, d, None) for g, e, d in outputs] or [x for x in layers if last[x[0]] == x[3]]
    points = layers + [x for x in ends if x[3] is None]
    largest = int(losses.detach().abs().argmax())
    for k in dict.fromkeys((0, largest if largest != 0 else B - 1)):
        grads = torch.autograd.grad(losses[k], [e for _, e, _, _ in points], retain_graph=True, allow_unused=True)
        spreads = {id(x): _spread(g, x[2], B, k) for x, g in zip(points, grads) if g is not None}
        mixed = [(x, spreads[id(x)]) for x in points if spreads.get(id(x)) not in (None, [k])]
        if not mixed:
            continue
        at_end = [(x, s) for x, s in mixed if any(x is e for e in ends)]
        (_, _, dim, path), spread = at_end[-1] if at_end else mixed[-1]
        others = [i for i in spread if i != k]
        shown = ", ".join(map(str, others[:5])) + (", ..." if len(others) > 5 else "")
        if ambiguous:
            shapes = ", ".join(f"{p or '<model>'} {tuple(x)}" for p, x in list(ambiguous.items())[:3])
            raise UnsupportedModuleError(
                f"the gradient of losses[{k}] reaches samples {shown} too, and modules were called with the batch "
                f"size on both dims 0 and 1 ({shapes}) with the model's layout undeclared, so the engine took dim 0 "
                "(batch-first). If the model is sequence-first ((T, B, ...)), declare ga.PerSampleGradients(model, "
                "batch_first=False) (or for one module type registry.register_layout(Type, lambda m: 1)); if a "
                "module is called on a value with the batch size on a dim that does not carry the batch ((T, T) "
                "position buckets with T == B), declare it with RuleRegistry.register_shared; otherwise the losses or "
                "a module mixes samples")
        if not at_end:  # mixed inside the model only
            error = UnsupportedModuleError(
                f"the gradient of losses[{k}] at the output of module {path!r} reaches samples {shown}, at the "
                f"model's output sample {k} only: {path!r}'s output does not carry the batch on dim {dim} sample by "
                "sample, or a module after it mixes samples. A layer fed time-first ((T, B, ...) with T == B): give "
                "it batch-first inputs, or declare its layout with RuleRegistry.register_layout; a module called on "
                "an input with the batch size on that dim that does not carry the batch ((T, T) position buckets with "
                "T == B): declare it with RuleRegistry.register_shared")
            error.samples_mixed = True  # (ga.validate does not repeat it for a module it already refused)
            raise error
        where = f"at the output of module {path!r}" if path else "at the model's output"
        if spread == others[:1]:
            raise LossesError(
                f"losses[{k}] is the loss of sample {others[0]} of the model's inputs ({where}): the losses are not "
                "in the order of the inputs (e.g. losses[perm]). Give backward one loss per sample in the order "
                "of the batch (undo the permutation: losses[inverse])")
        raise LossesError(
            f"losses[{k}] depends on other samples of the batch too (samples {shown}, {where}): the losses mix "
            "samples (e.g. a contrastive InfoNCE loss over the batch, or a loss normalised over the batch), so "
            "per-sample gradients are not defined. Give backward losses in which sample i's loss depends on "
            "sample i alone")
