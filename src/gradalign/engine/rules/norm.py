"""Per-sample affine parameters of normalisation layers: LayerNorm, GroupNorm, InstanceNorm,
eval BatchNorm.

With xhat the normalised input and d the output gradient, summed over every position that
shares an affine entry: g_i(gamma) = sum_t d_it * xhat_it, g_i(beta) = sum_t d_it.
These parameters are small, so the per-sample gradients are kept dense: (B, C). Low-precision
inputs and output gradients (autocast, half models) are upcast to float32 first.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradalign.engine.representations import Dense, upcast


def _affine_grads(module: nn.Module, xhat: Tensor, d: Tensor, channel_shape) -> dict:
    """xhat, d: (B, positions..., or channels first) already arranged as (B, -1, *channel_shape);
    xhat is the rule's own (overwritten: the product d * xhat is formed in its memory, in cache)."""
    grads = {}
    if getattr(module, "weight", None) is not None and module.weight.requires_grad:
        grads["weight"] = Dense(xhat.mul_(d).sum(1).reshape(-1, *channel_shape))
    if getattr(module, "bias", None) is not None and module.bias.requires_grad:
        grads["bias"] = Dense(d.sum(1).reshape(-1, *channel_shape))
    return grads


def layer_norm_rule(module: nn.LayerNorm, args: tuple, grad_output: Tensor) -> dict:
    x, grad_output = upcast(args[0]), upcast(grad_output)
    shape = module.normalized_shape
    # with an identity affine map: torch's CPU kernel for that case is about twice as fast as
    # the one without weight and bias
    xhat = F.layer_norm(x, shape, x.new_ones(shape), x.new_zeros(shape), eps=module.eps)
    B = x.shape[0]
    return _affine_grads(module, xhat.reshape(B, -1, *shape), grad_output.reshape(B, -1, *shape), shape)


def _channels_last(t: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, positions, C)."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def group_norm_rule(module: nn.GroupNorm, args: tuple, grad_output: Tensor) -> dict:
    x, grad_output = upcast(args[0]), upcast(grad_output)
    xhat = F.group_norm(x, module.num_groups, eps=module.eps)
    return _affine_grads(module, _channels_last(xhat), _channels_last(grad_output), (x.shape[1],))


def batch_norm_check(module: nn.modules.batchnorm._BatchNorm) -> str | None:
    if module.training or module.running_mean is None:
        return ("BatchNorm in training mode mixes the samples of a batch, so per-sample "
                "gradients are undefined; use nn.GroupNorm (ga.replace_batchnorm(model) swaps every "
                "BatchNorm for one), or put this module in eval mode (module.eval()) so it normalises "
                "with its running statistics")
    return None


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, args: tuple, grad_output: Tensor) -> dict:
    """Eval-mode BatchNorm is a fixed per-channel affine map of each sample."""
    x, grad_output = upcast(args[0]), upcast(grad_output)
    view = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - module.running_mean.view(view)) * torch.rsqrt(module.running_var.view(view) + module.eps)
    if x.dim() == 2:
        return _affine_grads(module, xhat.unsqueeze(1), grad_output.unsqueeze(1), (x.shape[1],))
    return _affine_grads(module, _channels_last(xhat), _channels_last(grad_output), (x.shape[1],))


def instance_norm_rule(module: nn.modules.instancenorm._InstanceNorm, args: tuple, grad_output: Tensor) -> dict:
    """InstanceNorm normalises each sample on its own (with its own statistics in training mode or
    without running statistics, with the running statistics in eval mode), so it never mixes
    samples; updating the running statistics is a side effect of the forward only."""
    x, grad_output = upcast(args[0]), upcast(grad_output)
    if module.training or not module.track_running_stats:
        xhat = F.instance_norm(x, eps=module.eps)
    else:
        view = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - module.running_mean.view(view)) * torch.rsqrt(module.running_var.view(view) + module.eps)
    return _affine_grads(module, _channels_last(xhat), _channels_last(grad_output), (x.shape[1],))
