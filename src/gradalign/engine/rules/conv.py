"""nn.Conv1d and nn.Conv2d (any stride, padding, dilation, groups, padding mode).

The input is unfolded into patches so the convolution is a linear map applied at T output
positions: A (B, G, T, C_in/G * k), D (B, G, T, C_out/G), g_i(W) = sum_t d_it a_it^T per
group (a weight shared over T positions, see persample.Factored). g_i(b) = sum_t d_it.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from gradalign.engine.persample import Dense, Factored


def _pairs(module: nn.Conv1d | nn.Conv2d, x: Tensor):
    """Input as 4-D (B, C, H, W) with 2-D kernel, dilation, padding, stride."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(module.kernel_size)
    else:
        padding = module.padding
    if isinstance(module, nn.Conv1d):
        return (x.unsqueeze(2), (1, *module.kernel_size), (1, *module.dilation), (0, *padding),
                (1, *module.stride))
    return x, module.kernel_size, module.dilation, padding, module.stride


def conv_rule(module: nn.Conv1d | nn.Conv2d, args: tuple, grad_output: Tensor) -> dict:
    x = args[0]
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() != spatial + 2:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-sample "
            f"gradients need a batched input (B, C, {'L' if spatial == 1 else 'H, W'})")
    B, G = x.shape[0], module.groups
    x4, kernel, dilation, padding, stride = _pairs(module, x)
    cols = F.unfold(x4, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C k, T)
    A = cols.reshape(B, G, -1, cols.shape[-1]).transpose(2, 3)  # (B, G, T, C/G k)
    d = grad_output.reshape(B, G, module.out_channels // G, -1).transpose(2, 3)  # (B, G, T, C_out/G)
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = Factored(A, d, module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = Dense(grad_output.reshape(B, module.out_channels, -1).sum(-1))
    return grads
