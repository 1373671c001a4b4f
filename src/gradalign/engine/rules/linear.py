"""nn.Linear: y = a W^T + b over inputs of shape (B, in) or (B, ..., in).

g_i(W) = sum_t d_it a_it^T (one position, T = 1, for (B, in) inputs), g_i(b) = sum_t d_it: the
bias is a column of ones in a, so it is served by the weight's factors (representations.FactoredBias).
"""
from torch import Tensor, nn

from gradalign.engine.representations import Factored, cosine_route


def linear_rule(module: nn.Linear, args: tuple, grad_output: Tensor) -> dict:
    factored = Factored.rows(args[0], grad_output, module.weight.shape)  # upcast there
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = factored
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = factored.bias()
    return grads


def linear_own_cosines(module: nn.Linear, args: tuple) -> bool:
    """Whether the cosine terms of this call come from a Gram matrix, without S
    (`representations.cosine_route`, S counted as one more product: it is not otherwise needed)."""
    a = args[0]
    if not isinstance(a, Tensor) or a.dim() < 2 or a.numel() == 0:
        return False
    T = a.numel() // (a.shape[0] * a.shape[-1])
    return cosine_route(a.shape[0], 1, T, module.in_features, module.out_features, have_sum=False) == "gram"
