"""nn.Linear: y = a W^T + b over inputs of shape (B, in) or (B, ..., in).

g_i(W) = sum_t d_it a_it^T (one position, T = 1, for (B, in) inputs), g_i(b) = sum_t d_it: the
bias is a column of ones in a, so it is served by the weight's factors (persample.FactoredBias).
"""
from torch import Tensor, nn

from gradalign.engine.persample import Factored


def linear_rule(module: nn.Linear, args: tuple, grad_output: Tensor) -> dict:
    factored = Factored.rows(args[0], grad_output, module.weight.shape)  # upcast there
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = factored
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = factored.bias()
    return grads
