"""The torch.func fallback: per-sample gradients of one module by vmap over its forward.

g_i = grad over the module's own parameters of <module(x_i), d_i>, vmapped over samples,
from the captured input x and output gradient d. It materialises (B, P_module) and runs the
module's forward again, so the engine uses it only where watching the module's parameters at
their point of use (engine/watch.py) meets an operation it cannot follow. The module must
take one batched tensor and return one tensor. It runs in float32 (parameters, input and
output gradient upcast) when the model ran in bfloat16 or float16.
"""
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradalign.engine.persample import Dense, upcast


def fallback_check_call(module: nn.Module, args: tuple, kwargs: dict, output) -> str | None:
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return ("no per-layer rule for this module type, and the torch.func fallback needs a "
                "module called with one tensor and returning one tensor; register a rule for it "
                "(gradalign.engine.default_registry().register) or freeze its parameters")
    return None


def fallback_capture(module: nn.Module, args: tuple, kwargs: dict, batch_dim: int) -> tuple:
    """(input with the batch on dim 0, where the module itself expects the batch)."""
    return args[0].detach().movedim(batch_dim, 0), batch_dim


def fallback_rule(module: nn.Module, args: tuple, grad_output: Tensor) -> dict:
    x, batch_dim = args
    params = {n: upcast(p.detach()) for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def contribution(p: dict, x: Tensor, d: Tensor) -> Tensor:  # one sample, the batch dim put back
        return (functional_call(module, p, (x.unsqueeze(batch_dim),)) * d.unsqueeze(batch_dim)).sum()

    with torch.enable_grad():
        per_sample = vmap(grad(contribution), in_dims=(None, 0, 0))(params, upcast(x), upcast(grad_output))
    return {name: Dense(g) for name, g in per_sample.items()}
