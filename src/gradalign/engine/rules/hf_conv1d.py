"""Hugging Face's Conv1D (GPT-2, GPT, ...): a linear layer with its weight stored transposed,
y = x W + b with W of shape (in, out), over inputs (B, ..., in).

g_i(W) = sum_t x_it d_it^T, an (in, out) matrix: the factored form of nn.Linear with the
roles of input and output gradient swapped (ghost norms, the Gram route, no per-sample
matrices); g_i(b) = sum_t d_it. Registered by qualified name, so transformers is never imported
here.
"""
from torch import Tensor, nn

from gradalign.engine.representations import Dense, Factored, cosine_route, upcast


def hf_conv1d_rule(module: nn.Module, args: tuple, grad_output: Tensor) -> dict:
    x = args[0]
    B = x.shape[0]
    n_in, n_out = module.weight.shape
    d = upcast(grad_output).reshape(B, 1, -1, n_out)  # (B, 1, T, out)
    grads = {}
    if module.weight.requires_grad:  # Factored's (n_out, n_in) layout is the weight's (in, out): swapped roles
        grads["weight"] = Factored(d, x.reshape(B, 1, -1, n_in), module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = Dense(d.reshape(B, -1) if d.shape[2] == 1 else d.sum(dim=(1, 2)))
    return grads


def hf_conv1d_own_cosines(module: nn.Module, args: tuple) -> bool:
    """Whether the weight's cosine terms come from a Gram matrix, without S (as for nn.Linear)."""
    x = args[0]
    if not isinstance(x, Tensor) or x.dim() < 2 or x.numel() == 0:
        return False
    n_in, n_out = module.weight.shape
    return cosine_route(x.shape[0], 1, x.numel() // (x.shape[0] * n_in), n_in, n_out, have_sum=False) == "gram"
