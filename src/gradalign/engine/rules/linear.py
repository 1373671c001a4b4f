"""nn.Linear: y = a W^T + b over inputs of shape (B, in) or (B, ..., in).

g_i(W) = sum_t d_it a_it^T (one position, T = 1, for (B, in) inputs), g_i(b) = sum_t d_it: the
bias is a column of ones in a, so it is served by the weight's factors (persample.FactoredBias).
"""
from torch import Tensor, nn

from gradalign.engine.persample import Factored, gram_is_cheaper


def linear_rule(module: nn.Linear, args: tuple, grad_output: Tensor) -> dict:
    factored = Factored.rows(args[0], grad_output, module.weight.shape)  # upcast there
    grads = {}
    if module.weight.requires_grad:
        grads["weight"] = factored
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = factored.bias()
    return grads


def linear_gram_route(module: nn.Linear, args: tuple) -> bool:
    """Whether the cosines of a (B, in) call are cheaper from the Gram matrix than from S and
    the factors, S counted as one more product (it is not otherwise needed)."""
    a = args[0]
    if not isinstance(a, Tensor) or a.dim() != 2:
        return False
    return gram_is_cheaper(a.shape[0], module.in_features, module.out_features, have_sum=False)
