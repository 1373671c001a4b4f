"""Weights computed from other parameters, in a module served by a rule.

torch's parametrizations (`parametrizations.weight_norm`, `spectral_norm`, `orthogonal`, any
`parametrize.register_parametrization`) make `module.weight` a tensor computed from the
parameters of `module.parametrizations.weight` (`original`, or `original0`, `original1`); the
older reparametrizations (`nn.utils.weight_norm`, `nn.utils.spectral_norm`, `nn.utils.prune`)
compute it in a forward pre-hook from `weight_g` and `weight_v` (or `weight_orig`). Either way
the module's rule (nn.Linear's, a convolution's, ...) gives the per-sample gradients of the
computed W, G_i (B, *W.shape); those of the parameters it is computed from are J^T G_i, one
batched vector-Jacobian product through the forward's own graph of W (so spectral_norm's power
iteration is not run again). G is formed densely for that layer, as the torch.func fallback
would form its per-sample gradients. Which tensors are computed from which parameters is decided
by the survey (engine/validate.py `derived_tensors`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gradalign.engine.representations import Dense, IndexedRows, upcast


def watch_outputs(module: nn.Module, latest: dict[str, Tensor], active) -> list:
    """Forward hooks that keep, in `latest`, each parametrization's output in the latest training
    forward (the W the module used); returns their handles."""
    if not parametrize.is_parametrized(module):
        return []

    def keeper(name: str):
        def hook(_, args, output):
            if active():
                latest[name] = output
        return hook
    return [plist.register_forward_hook(keeper(name)) for name, plist in module.parametrizations.items()]


def used_tensors(module: nn.Module, derived: dict, latest: dict[str, Tensor]) -> dict[str, Tensor]:
    """{name: the computed tensor this call used}: a parametrization's latest output, or the
    attribute an old-style pre-hook set for this call."""
    if parametrize.is_parametrized(module):
        return {name: latest.pop(name) for name in derived if name in latest}
    return {name: getattr(module, name) for name in derived if isinstance(getattr(module, name, None), Tensor)}


@contextlib.contextmanager
def without_side_effects(module: nn.Module):
    """A rule reading `module.weight` of a parametrized module during the backward computes it
    again: in eval mode (no power iteration of spectral_norm) and once (parametrize.cached)."""
    if not parametrize.is_parametrized(module):
        yield
        return
    modes = [(m, m.training) for m in module.parametrizations.modules()]
    for m, _ in modes:
        m.training = False
    try:
        with parametrize.cached():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _dense(rep, shape: torch.Size) -> Tensor:
    """(B, *shape) per-sample gradients from a representation."""
    if isinstance(rep, IndexedRows):
        B, dim = rep.index.shape[0], rep.D.shape[-1]
        index = rep.index.reshape(B, -1, 1).expand(-1, -1, dim)
        out = rep.D.new_zeros(B, rep.num_rows, dim)
        return out.scatter_add_(1, index, rep.D.reshape(B, -1, dim)).reshape(B, *shape)
    return rep.dense().grads.reshape(-1, *shape)


def pull_back(module: nn.Module, per_sample: dict, derived: dict, used: dict[str, Tensor]) -> dict:
    """`per_sample` with each computed tensor's per-sample gradients replaced by those of the
    parameters it is computed from."""
    for name, W in used.items():
        rep = per_sample.pop(name, None)
        locals_ = derived[name]
        if rep is None or not locals_:
            continue
        G = _dense(rep, W.shape).to(W.dtype)
        roots = [module.get_parameter(local) for local in locals_]
        try:
            grads = torch.autograd.grad(W, roots, G, retain_graph=True, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # a backward formula vmap cannot batch: one vector-Jacobian product per sample
            rows = [torch.autograd.grad(W, roots, g, retain_graph=True, allow_unused=True) for g in G]
            grads = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(roots))]
        per_sample.update({local: Dense(upcast(g)) for local, g in zip(locals_, grads) if g is not None})
    return per_sample


def derived_finish(finish, module: nn.Module, derived: dict, used: dict[str, Tensor]):
    """A call's finish (gradients at its edges -> per-sample gradients) for a module with computed
    tensors: the rule without side effects, then the computed tensors' gradients pulled back."""
    def run(grads: list) -> dict:
        with without_side_effects(module):
            per_sample = finish(grads)
        return pull_back(module, per_sample, derived, used)
    return run
