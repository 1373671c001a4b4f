"""nn.ConvTranspose1d, 2d and 3d (any stride, padding, output_padding, dilation, groups).

A transposed convolution's weight gradient is that of a convolution run the other way: from
the output gradient d to the input x. Unfolding d with the layer's kernel, stride, padding
and dilation gives, at every input position t, the patch of d that x_t fed:
g_i(W)[c_in, c_out k] = sum_t x_it[c_in] dpatch_it[c_out k], so per group
A = the patches of d (B, G, T, C_out/G * k), D = x (B, G, T, C_in/G), and the weight
(C_in, C_out/G, *k) is (G * C_in/G, C_out/G * k) group-major, as persample.Factored expects.
output_padding (or a forward's output_size) only lengthens d at the end: the unfolding then
has extra positions, and only the first T (the input's) are kept. g_i(b) = sum_t d_it.
"""
from torch import Tensor, nn

from gradalign.engine.persample import Factored, upcast
from gradalign.engine.rules.conv import bias_grads, check_batched, grouped, unfold

ConvTranspose = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def conv_transpose_rule(module: ConvTranspose, args: tuple, grad_output: Tensor) -> dict:
    x = upcast(args[0])
    check_batched(module, x)
    d = upcast(grad_output)
    grads = bias_grads(module, d)
    if module.weight.requires_grad:
        patches = unfold(d, module.kernel_size, module.dilation, module.padding, module.stride)
        patches = patches[(slice(None), slice(None), *(slice(0, size) for size in x.shape[2:]))]
        G = module.groups
        grads["weight"] = Factored(grouped(patches, G), grouped(x, G), module.weight.shape)
    return grads
