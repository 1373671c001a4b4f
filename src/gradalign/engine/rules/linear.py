"""nn.Linear: y = a W^T + b over inputs of shape (B, in) or (B, ..., in).

g_i(W) = sum_t d_it a_it^T (one position, T = 1, for (B, in) inputs), g_i(b) = sum_t d_it.
"""
from torch import Tensor, nn

from gradalign.engine.persample import Dense, Factored, upcast


def linear_rule(module: nn.Linear, args: tuple, grad_output: Tensor) -> dict:
    a = args[0]
    B = a.shape[0]
    d = upcast(grad_output).reshape(B, 1, -1, module.out_features)  # (B, 1, T, out), float32 under autocast
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = Factored(a.reshape(B, 1, -1, module.in_features), d, module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = Dense(d.reshape(B, -1) if d.shape[2] == 1 else d.sum(dim=(1, 2)))
    return grads
