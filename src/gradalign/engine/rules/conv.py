"""nn.Conv1d, nn.Conv2d and nn.Conv3d (any stride, padding, dilation, groups, padding mode).

The input is unfolded into patches so the convolution is a linear map applied at T output
positions: A (B, G, T, C_in/G * k), D (B, G, T, C_out/G), g_i(W) = sum_t d_it a_it^T per
group (a weight shared over T positions, see persample.Factored). g_i(b) = sum_t d_it.
"""
import math

import torch.nn.functional as F
from torch import Tensor, nn

from gradalign.engine.persample import Dense, Factored, upcast

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


def grouped(t: Tensor, groups: int) -> Tensor:
    """(B, C, *positions) -> (B, G, T, C/G): the factor layout of persample.Factored."""
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
    cols = unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (B, C k, *out)
    grads = bias_grads(module, d)
    if module.weight.requires_grad:
        G = module.groups
        grads["weight"] = Factored(grouped(cols, G), grouped(d, G), module.weight.shape)
    return grads
