"""nn.MultiheadAttention, in every configuration torch allows, and the transformers built on it.

MultiheadAttention.forward hands its weights to F.multi_head_attention_forward, so out_proj's
own forward never runs: this rule serves out_proj's parameters too. Attention does not mix
samples, so from the captured inputs q, k, v and the gradient d at the output the rule
recomputes, once per call:

    Q = q Wq^T + bq, K = k Wk^T + bk, V = v Wv^T + bv      (exactly as torch projects them)
    A = attention(Q, K, V)                                  (torch's own function, identity
                                                             projections: x I is exact)

and one backward of <A, d W_o> gives dQ, dK, dV. Then every projection is a linear layer
over tokens: g_i(Wq) = sum_t dQ_it q_it^T (Factored), g_i(W_o) = sum_t d_it A_it^T, biases
sum over tokens; bias_k / bias_v are one extra key/value row per sample. Masks, is_causal,
add_zero_attn and need_weights pass through to torch's function unchanged; with dropout the
RNG state saved before the forward is restored around the recompute, which then draws the
same mask (the global RNG stream is left as it was). If the loss uses the returned attention
weights, their gradient enters the same backward.

Self-attention needs no recompute (`attention_inner`, when query is key is value with one packed
in_proj_weight, no bias_k/bias_v or zero attention, both projections trainable leaves and no
saved-tensor hooks active): the forward hook finds the in-projection's product node and
out_proj's in the call's own autograd graph; the engine's backward then also takes the gradient
at the in-projection's output (dQ|dK|dV, exactly as autograd forms it), and out_proj's input A is
the forward's own saved tensor. Dropout's masks are then the forward's, with nothing replayed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from gradalign.engine.representations import Dense, Factored, RowBlocks
from gradalign.engine.rules.rng import RngState, replaying, save_rng

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")
_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
             "is_causal": False}


@dataclass
class _Options:
    """Everything of one call besides q, k, v (masks detached, already canonical float masks)."""

    key_padding_mask: Tensor | None
    attn_mask: Tensor | None
    need_weights: bool
    average_attn_weights: bool
    is_causal: bool
    training: bool
    same: tuple[bool, bool]  # (query is key, key is value)
    rng: RngState | None  # when dropout draws a mask
    inner: Tensor | None = None  # the out_proj input A of the forward, (T*B, E), where attention_inner found it


def transformer_batch_dim(module: nn.Module) -> int | None:
    """Where an nn.Transformer* module puts the batch: that of its first MultiheadAttention."""
    attention = next((m for m in module.modules() if isinstance(m, nn.MultiheadAttention)), None)
    return None if attention is None else 0 if attention.batch_first else 1


def _bind(args: tuple, kwargs: dict) -> dict:
    return {**_DEFAULTS, **dict(zip(_ARGS, args)), **kwargs}


def attention_check_call(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> str | None:
    query = _bind(args, kwargs)["query"]
    if not isinstance(query, Tensor) or query.dim() != 3:
        return "per-sample gradients need batched inputs (3-D query, key and value)"
    return None


def attention_output(output) -> tuple:
    return tuple(output)  # (attention output, attention weights or None)


def attention_capture(module: nn.MultiheadAttention, args: tuple, kwargs: dict, batch_dim: int) -> tuple:
    """(q, k, v) batch first, detached once each (so query is key stays true), and _Options.

    Runs before the forward: with dropout it saves the RNG state the forward will draw from.
    """
    bound = _bind(args, kwargs)
    q = bound["query"]
    if not isinstance(q, Tensor) or q.dim() != 3:
        return (q,)  # refused by attention_check_call after the forward
    detached: dict[int, Tensor] = {}
    q, k, v = (detached.setdefault(id(t), t.detach() if module.batch_first else t.detach().transpose(0, 1))
               for t in (bound["query"], bound["key"], bound["value"]))
    kpm, mask = bound["key_padding_mask"], bound["attn_mask"]
    kpm = F._canonical_mask(mask=kpm, mask_name="key_padding_mask", other_type=F._none_or_dtype(mask),
                            other_name="attn_mask", target_type=q.dtype)
    mask = F._canonical_mask(mask=mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=q.dtype, check_other=False)
    rng = save_rng(q.device) if module.training and module.dropout > 0 else None
    options = _Options(None if kpm is None else kpm.detach(), None if mask is None else mask.detach(),
                       bool(bound["need_weights"]), bool(bound["average_attn_weights"]), bool(bound["is_causal"]),
                       module.training, (q is k, k is v), rng)
    return q, k, v, options


def _recompute(module: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, o: _Options):
    """(leaves [Q, K, V, bias_k row, bias_v row], attention output A, weights), torch's (seq, batch, E) layout."""
    E, B = module.embed_dim, q.shape[0]
    seq: dict[int, Tensor] = {}  # one view per distinct input: torch projects q is k is v in one product
    query, key, value = (seq.setdefault(id(t), t.transpose(0, 1)) for t in (q, k, v))
    bias = None if module.in_proj_bias is None else module.in_proj_bias.detach()
    if module._qkv_same_embed_dim:
        Q, K, V = F._in_projection_packed(query, key, value, module.in_proj_weight.detach(), bias)
    else:
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        Q, K, V = F._in_projection(query, key, value, module.q_proj_weight.detach(), module.k_proj_weight.detach(),
                                   module.v_proj_weight.detach(), bq, bk, bv)
    leaves = [t.detach().requires_grad_() for t in (Q, K, V)]
    keys, values = leaves[1], leaves[2]
    kpm, mask = o.key_padding_mask, o.attn_mask
    if module.bias_k is not None:  # one more key/value position, per sample, as torch appends it
        rows = [b.detach().expand(1, B, E).clone().requires_grad_() for b in (module.bias_k, module.bias_v)]
        leaves += rows
        keys, values = torch.cat([keys, rows[0]]), torch.cat([values, rows[1]])
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
        mask = None if mask is None else F.pad(mask, (0, 1))
    if not o.need_weights:
        return leaves, _attention_without_weights(module, leaves[0], keys, values, kpm, mask, o), None
    eye = torch.eye(E, dtype=Q.dtype, device=Q.device)
    out, weights = F.multi_head_attention_forward(
        leaves[0], keys, values, E, module.num_heads, None, None, None, None, module.add_zero_attn,
        module.dropout, eye, None, training=o.training, key_padding_mask=kpm, need_weights=o.need_weights,
        attn_mask=mask, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=o.average_attn_weights, is_causal=o.is_causal)
    return leaves, out, weights


def _attention_without_weights(module: nn.MultiheadAttention, Q: Tensor, K: Tensor, V: Tensor, kpm: Tensor | None,
                               mask: Tensor | None, o: _Options) -> Tensor:
    """F.multi_head_attention_forward's need_weights=False path after its in-projection, line for
    line: the same masks and the same scaled_dot_product_attention call (so dropout draws the same
    mask), without the identity projections. Returns the out_proj input A, (L, B, E)."""
    L, B, E = Q.shape
    H = module.num_heads
    head = E // H
    is_causal = o.is_causal
    if is_causal and kpm is None:  # torch passes the causal hint to SDPA instead of the mask
        mask = None
    elif kpm is not None:
        is_causal = False
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    q, k, v = (t.view(t.shape[0], B * H, head).transpose(0, 1) for t in (Q, K, V))
    if module.add_zero_attn:
        zeros = torch.zeros(B * H, 1, head, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    S = k.shape[1]
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S).expand(-1, H, -1, -1).reshape(B * H, 1, S)
        mask = kpm if mask is None else mask + kpm
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.size(0) == 1 and mask.dim() == 3 else mask.view(B, H, -1, S)
    out = F.scaled_dot_product_attention(q.view(B, H, L, head), k.view(B, H, S, head), v.view(B, H, S, head), mask,
                                         module.dropout if o.training else 0.0, is_causal)
    return out.permute(2, 0, 1, 3).reshape(L, B, E)


def _saved_hooks_active() -> bool:
    """Saved-tensor hooks (activation checkpointing, offloading): a saved tensor must not be read in the forward."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):  # another torch: take the recompute
        return True


def _product_of(node, weight: Tensor) -> bool:
    """Whether autograd node `node` is a matrix product with `weight` (through its transpose)."""
    for child, _ in node.next_functions:
        if child is not None and type(child).__name__ == "TBackward0":
            leaf = child.next_functions[0][0]
            if leaf is not None and getattr(leaf, "variable", None) is weight:
                return True
    return False


def attention_inner(module: nn.MultiheadAttention, args: tuple, outputs: tuple) -> list:
    """Self-attention (query is key is value, one packed in_proj_weight, no bias_k/bias_v or zero
    attention, both projections trainable leaves): the in-projection's product node N and out_proj's
    P inside the forward's own graph, found from the output. Returns [the edge of N's output]: its
    gradient is dQ|dK|dV (the rows ordered (t, b), as torch projects a (T, B, E) query), and A, the
    input of out_proj, is read from P's saved tensor now (kept in the call's options), so the rule
    needs no recompute. [] (the rule then recomputes) where anything differs or saved-tensor hooks
    are active."""
    if len(args) != 4 or not all(args[3].same) or not module._qkv_same_embed_dim or module.bias_k is not None:
        return []
    W_in, W_out, out = module.in_proj_weight, module.out_proj.weight, outputs[0]
    if (module.add_zero_attn or not (W_in.requires_grad and W_out.requires_grad) or out is None or out.grad_fn is None
            or _saved_hooks_active()):
        return []
    found, seen, queue = {}, set(), [out.grad_fn]
    while queue and len(seen) < 256 and len(found) < 2:  # the attention's own graph: tens of nodes
        node = queue.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        if "P" not in found and _product_of(node, W_out):
            found["P"] = node
        elif _product_of(node, W_in):
            found["N"] = node
            continue  # (below it: the model before the attention)
        queue.extend(child for child, _ in node.next_functions)
    if len(found) < 2:
        return []
    P = found["P"]
    A = P._saved_mat1 if hasattr(P, "_saved_mat1") else getattr(P, "_saved_self", None)
    B, T, E = args[0].shape
    if not isinstance(A, Tensor) or tuple(A.shape) != (T * B, E):
        return []
    args[3].inner = A.detach()
    return [GradientEdge(found["N"], 0)]


def projections_from_backward(module: nn.MultiheadAttention, q: Tensor, o: _Options, d_out: Tensor, d_proj: Tensor,
                       first) -> dict:
    """attention_inner's path: in_proj from (q, dQ|dK|dV), out_proj from (A, d)."""
    B, T, E = q.shape
    packed = Factored(q.unsqueeze(1), d_proj.reshape(T, B, 3 * E).transpose(0, 1).unsqueeze(1),
                      module.in_proj_weight.shape)
    grads = {"in_proj_weight": packed}
    if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
        grads["in_proj_bias"] = packed.bias()
    projection = Factored(o.inner.reshape(T, B, E).transpose(0, 1).unsqueeze(1), first(d_out).unsqueeze(1),
                          module.out_proj.weight.shape)
    grads["out_proj.weight"] = projection
    if module.out_proj.bias is not None and module.out_proj.bias.requires_grad:
        grads["out_proj.bias"] = projection.bias()
    return grads


def attention_rule(module: nn.MultiheadAttention, args: tuple, grad_output: tuple) -> dict:
    q, k, v, o = args
    d_out, d_weights, *inner = grad_output
    first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))  # module layout -> (B, T, E)
    if inner and inner[0] is not None and d_out is not None and o.inner is not None:
        return projections_from_backward(module, q, o, d_out, inner[0], first)
    with torch.enable_grad(), replaying(o.rng):
        leaves, out, weights = _recompute(module, q, k, v, o)
        outputs, grads = [], []
        if d_out is not None:
            outputs.append(out)
            grads.append(first(d_out).transpose(0, 1) @ module.out_proj.weight.detach())
        if d_weights is not None:
            outputs.append(weights)
            grads.append(d_weights)
        dQ, dK, dV, *d_bias_kv = (torch.zeros_like(t) if g is None else g for t, g in zip(
            leaves, torch.autograd.grad(outputs, leaves, grads, allow_unused=True)))
    dQ, dK, dV = (t.transpose(0, 1) for t in (dQ, dK, dV))  # (B, T, E)
    B = q.shape[0]

    def factored(a: Tensor, d: Tensor, shape) -> Factored:
        return Factored(a.unsqueeze(1), d.unsqueeze(1), torch.Size(shape))

    E = module.embed_dim
    grads = {}
    bias = module.in_proj_bias is not None and module.in_proj_bias.requires_grad
    if module._qkv_same_embed_dim and all(o.same):  # self-attention: one factor pair, dQ dK dV side by side
        packed = factored(q, torch.cat([dQ, dK, dV], -1), module.in_proj_weight.shape)
        if module.in_proj_weight.requires_grad:
            grads["in_proj_weight"] = packed
        if bias:  # the bias: a column of ones in q
            grads["in_proj_bias"] = packed.bias()
            bias = False
    elif module._qkv_same_embed_dim:
        W = module.in_proj_weight
        if W.requires_grad:
            if o.same[1]:
                grads["in_proj_weight"] = RowBlocks(
                    [factored(q, dQ, (E, E)), factored(k, torch.cat([dK, dV], -1), (2 * E, E))], [E, 2 * E], W.shape)
            else:
                grads["in_proj_weight"] = RowBlocks(
                    [factored(x, d, (E, E)) for x, d in ((q, dQ), (k, dK), (v, dV))], [E, E, E], W.shape)
    else:
        for name, x, d in (("q_proj_weight", q, dQ), ("k_proj_weight", k, dK), ("v_proj_weight", v, dV)):
            W = getattr(module, name)
            if W.requires_grad:
                grads[name] = factored(x, d, W.shape)
    if bias:
        grads["in_proj_bias"] = Dense(torch.cat([dQ.sum(1), dK.sum(1), dV.sum(1)], -1))
    if module.bias_k is not None:
        for name, g in zip(("bias_k", "bias_v"), d_bias_kv):
            if getattr(module, name).requires_grad:
                grads[name] = Dense(g.reshape(B, 1, 1, E))
    out_proj = module.out_proj
    d = torch.zeros(B, q.shape[1], E, dtype=q.dtype, device=q.device) if d_out is None else first(d_out)
    projection = factored(out.detach().transpose(0, 1), d, out_proj.weight.shape)
    if out_proj.weight.requires_grad:
        grads["out_proj.weight"] = projection
    if out_proj.bias is not None and out_proj.bias.requires_grad:
        grads["out_proj.bias"] = projection.bias()
    return grads
