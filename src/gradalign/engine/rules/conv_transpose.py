"""nn.ConvTranspose1d, 2d and 3d (any stride, padding, output_padding, dilation, groups).

A transposed convolution's weight gradient is that of a convolution run the other way: from
the output gradient d to the input x. Unfolding d with the layer's kernel, stride, padding
and dilation gives, at every input position t, the patch of d that x_t fed:
g_i(W)[c_in, c_out k] = sum_t x_it[c_in] dpatch_it[c_out k], so per group
A = the patches of d (B, G, T, C_out/G * k), D = x (B, G, T, C_in/G), and the weight
(C_in, C_out/G, *k) is (G * C_in/G, C_out/G * k) group-major, as representations.Factored expects.
output_padding (or a forward's output_size) only lengthens d at the end: the unfolding then
has extra positions, and only the first T (the input's) are kept. Where materialising is
cheaper, one grouped weight-gradient call gives (B, *W.shape), as for convolutions.
g_i(b) = sum_t d_it.
"""
import math

from torch import Tensor, nn

from gradalign.engine.representations import Dense, Factored, ghost_is_cheaper, upcast
from gradalign.engine.rules.conv import bias_grads, check_batched, grouped, per_sample_weight_grads, unfold

ConvTranspose = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def conv_transpose_rule(module: ConvTranspose, args: tuple, grad_output: Tensor) -> dict:
    x = upcast(args[0])
    check_batched(module, x)
    d = upcast(grad_output)
    grads = bias_grads(module, d)
    if not module.weight.requires_grad:
        return grads
    G, K = module.groups, math.prod(module.kernel_size)
    kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    if ghost_is_cheaper(math.prod(x.shape[2:]), d.shape[1] // G * K, x.shape[1] // G):
        patches = unfold(d, kernel, dilation, padding, stride)  # (B, C_out k, *positions >= x's)
        patches = patches[(slice(None), slice(None), *(slice(0, size) for size in x.shape[2:]))]
        grads["weight"] = Factored(grouped(patches, G), grouped(x, G), module.weight.shape)
    else:  # the output padding this call used, from the sizes (output_size may have set it)
        output_padding = [out - ((size - 1) * s - 2 * p + dil * (k - 1) + 1)
                          for out, size, s, p, dil, k in zip(d.shape[2:], x.shape[2:], stride, padding, dilation, kernel)]
        grads["weight"] = Dense(per_sample_weight_grads(x, d, module.weight.shape, stride, padding, dilation, G,
                                                        transposed=True, output_padding=output_padding))
    return grads
