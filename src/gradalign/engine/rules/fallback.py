"""The torch.func fallback: per-sample gradients of one module by vmap over its forward.

g_i = grad over the module's own parameters of sum_j <out_j(x_i), d_ij>, vmapped over samples,
from the captured inputs and the gradients d_j at each tensor the module returns. It
materialises (B, P_module) and runs the module's forward again, so the engine uses it only
where watching the module's parameters at their point of use (engine/watching/watch.py) meets an
operation it cannot follow.

The module may take several tensors, positional or keyword (masks, position biases), and
other plain arguments (None, numbers, strings, flags), and return a tensor or any nesting of
tuples, lists, dicts and Hugging Face ModelOutputs of tensors. Inputs whose batch dim has size
B (that of the first tensor) are taken per sample; others (a (1, T) mask, a shared bias) are
passed whole to every sample. Every returned tensor that carries gradients must carry the batch.
Stateful arguments (a key/value cache object) are refused: a second run of the forward would
change them. It runs in float32 (parameters, inputs and output gradients upcast) when the model
ran in bfloat16 or float16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from gradalign.engine.representations import Dense, upcast
from gradalign.errors import UnsupportedModuleError

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _Inputs:
    leaves: list  # the call's arguments, flattened; tensors detached
    spec: object
    batched: list[bool]  # which leaves carry the batch
    batch_dim: int


def _tensors(output) -> tuple:
    return tuple(t for t in tree_leaves(output) if isinstance(t, Tensor))


def fallback_output(output) -> tuple:
    """Every tensor the module returns: each one's gradient enters the vmap."""
    return _tensors(output)


def _batch(args: tuple, kwargs: dict, batch_dim: int) -> int | None:
    first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)), None)
    return first.shape[batch_dim] if first is not None and first.dim() > batch_dim else None


def fallback_check_call(module: nn.Module, args: tuple, kwargs: dict, output, batch_dim: int = 0) -> str | None:
    """Why the torch.func fallback cannot serve this call (None: it can)."""
    B = _batch(args, kwargs, batch_dim)
    if B is None:
        return "the torch.func fallback needs a batched tensor among the module's arguments"
    odd = [type(a).__name__ for a in tree_leaves((args, kwargs)) if not isinstance(a, (Tensor, *_PLAIN))]
    if odd:
        return (f"the torch.func fallback cannot run the module again with {', '.join(sorted(set(odd)))} among its "
                "arguments (state, such as a key/value cache, would change; in training pass use_cache=False)")
    if output is not None and not isinstance(output, (Tensor, *_PLAIN)) and not _tensors(output):
        return "the torch.func fallback needs a module that returns tensors"
    unbatched = [tuple(t.shape) for t in _tensors(output)
                 if t.requires_grad and (t.dim() <= batch_dim or t.shape[batch_dim] != B)]
    if unbatched:
        return (f"the torch.func fallback needs every output that carries gradients to carry the batch ({B} on dim "
                f"{batch_dim}), got shapes {unbatched}")
    return None


def fallback_capture(module: nn.Module, args: tuple, kwargs: dict, batch_dim: int) -> tuple:
    """(first tensor with the batch on dim 0, _Inputs of the whole call)."""
    B = _batch(args, kwargs, batch_dim)
    leaves, spec = tree_flatten((args, kwargs))
    batched = [isinstance(t, Tensor) and t.dim() > batch_dim and t.shape[batch_dim] == B for t in leaves]
    leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
    first = next(t for t, b in zip(leaves, batched) if b)
    return first.movedim(batch_dim, 0), _Inputs(leaves, spec, batched, batch_dim)


def fallback_rule(module: nn.Module, args: tuple, grad_output: tuple) -> dict:
    _, inputs = args
    bd = inputs.batch_dim
    params = {n: upcast(p.detach()) for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    xs = [upcast(t).movedim(bd, 0) for t, b in zip(inputs.leaves, inputs.batched) if b]
    fixed = [upcast(t) if isinstance(t, Tensor) else t for t in inputs.leaves]
    used = [(k, upcast(d).movedim(bd, 0)) for k, d in enumerate(grad_output) if d is not None]

    def contribution(p: dict, xs: list, ds: list) -> Tensor:  # one sample, the batch dim put back
        per_sample = iter(xs)
        leaves = [next(per_sample).unsqueeze(bd) if b else t for t, b in zip(fixed, inputs.batched)]
        a, kw = tree_unflatten(leaves, inputs.spec)
        outs = _tensors(functional_call(module, p, tuple(a), kw))
        for (k, _), d in zip(used, ds):
            if outs[k].shape != d.unsqueeze(bd).shape:
                raise UnsupportedModuleError(
                    f"{type(module).__name__}: run on one sample it returns shape {tuple(outs[k].shape)}, not one "
                    f"sample's share of its batched output {tuple(d.unsqueeze(bd).shape)}: it mixes samples, or a "
                    "parameter's dim has the batch size; register a rule for it or freeze its parameters")
        return sum((outs[k] * d.unsqueeze(bd)).sum() for (k, _), d in zip(used, ds))

    with torch.enable_grad():
        per_sample = vmap(grad(contribution), in_dims=(None, 0, 0))(params, xs, [d for _, d in used])
    return {name: Dense(g) for name, g in per_sample.items()}
