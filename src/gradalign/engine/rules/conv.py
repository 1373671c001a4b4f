"""nn.Conv1d, nn.Conv2d and nn.Conv3d (any stride, padding, dilation, groups, padding mode).

A convolution is a linear map applied at T output positions: with the input unfolded into
patches, A (B, G, T, C_in/G * k), D (B, G, T, C_out/G) and g_i(W) = sum_t d_it a_it^T per
group. Per layer the cheaper route is taken (representations.ghost_is_cheaper): the ghost route
keeps those factors (representations.Factored); otherwise every sample's weight gradient is
formed by ONE convolution weight-gradient call with the batch folded into the groups (the
kernel autograd itself uses, no unfolded copy of the input) and kept dense, (B, *W.shape),
which is then smaller than the factors would be. g_i(b) = sum_t d_it.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradalign.engine.representations import Dense, Factored, ghost_is_cheaper, upcast

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def unfold(x: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """Patches of x (B, C, *spatial) as (B, C * prod(kernel), *out_spatial), laid out as
    F.unfold lays them out (channel-major, then kernel offsets). F.unfold takes 4-D inputs
    only: it serves 1-D and 2-D, `unfold_by_dim` the rest."""
    B, C, *spatial = x.shape
    n = len(kernel)
    if n > 2:
        return unfold_by_dim(x, kernel, dilation, padding, stride)
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, d, p, s in zip(spatial, kernel, dilation, padding, stride)]
    one = (1,) * (2 - n)  # 1-D as 2-D with a height of one
    cols = F.unfold(x.reshape(B, C, *one, *spatial), one + tuple(kernel), dilation=one + tuple(dilation),
                    padding=(0,) * (2 - n) + tuple(padding), stride=one + tuple(stride))
    return cols.reshape(B, C * math.prod(kernel), *out)


def unfold_by_dim(x: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """`unfold` for any number of spatial dims, one Tensor.unfold per dim."""
    B, C = x.shape[:2]
    n = len(kernel)
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]  # appends this dim's kernel offsets
    out = x.shape[2:2 + n]
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))  # (B, C, *kernel, *out)
    return x.reshape(B, C * math.prod(kernel), *out)


def per_sample_weight_grads(x: Tensor, d: Tensor, weight_shape, stride, padding, dilation, groups: int, *,
                            transposed: bool = False, output_padding=None) -> Tensor:
    """(B, *weight_shape): every sample's weight gradient of a (transposed) convolution from
    its input x (B, C_in, ...) and output gradient d (B, C_out, ...), by one grouped
    weight-gradient call: sample b's channels become groups b G .. b G + G - 1."""
    B = x.shape[0]
    weight = x.new_empty((B * weight_shape[0], *weight_shape[1:]))  # only its shape is read
    _, grads, _ = torch.ops.aten.convolution_backward(
        d.reshape(1, -1, *d.shape[2:]), x.reshape(1, -1, *x.shape[2:]), weight, None, list(stride), list(padding),
        list(dilation), transposed, list(output_padding or [0] * (x.dim() - 2)), B * groups, [False, True, False])
    return grads.reshape(B, *weight_shape)


def grouped(t: Tensor, groups: int) -> Tensor:
    """(B, C, *positions) -> (B, G, T, C/G): the factor layout of representations.Factored."""
    B, C = t.shape[:2]
    return t.reshape(B, groups, C // groups, -1).transpose(2, 3)


def check_batched(module: nn.Module, x: Tensor) -> None:
    spatial = len(module.kernel_size)
    if x.dim() != spatial + 2:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-sample gradients "
            f"need a batched input (B, C, {', '.join('DHW'[3 - spatial:]) if spatial > 1 else 'L'})")


def bias_grads(module: nn.Module, d: Tensor) -> dict:
    if module.bias is None or not module.bias.requires_grad:
        return {}
    return {"bias": Dense(d.reshape(d.shape[0], d.shape[1], -1).sum(-1))}  # (B, C_out)


def _padded(module: Conv, x: Tensor) -> tuple[Tensor, tuple]:
    """x padded by hand where F.unfold cannot ('same', non-zero padding modes), and the padding left."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * len(module.kernel_size)
    return x, module.padding


def conv_rule(module: Conv, args: tuple, grad_output: Tensor) -> dict:
    x = upcast(args[0])
    check_batched(module, x)
    d = upcast(grad_output)
    x, padding = _padded(module, x)
    G, K = module.groups, math.prod(module.kernel_size)
    if module.weight.requires_grad and ghost_is_cheaper(math.prod(d.shape[2:]), x.shape[1] // G * K, d.shape[1] // G):
        cols = unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (B, C k, *out)
        factored = Factored(grouped(cols, G), grouped(d, G), module.weight.shape)
        grads = {"weight": factored}
        if module.bias is not None and module.bias.requires_grad:  # the bias: ones in the patches
            grads["bias"] = factored.bias()
        return grads
    grads = bias_grads(module, d)
    if module.weight.requires_grad:
        grads["weight"] = Dense(per_sample_weight_grads(x, d, module.weight.shape, module.stride, padding,
                                                        module.dilation, G))
    return grads
