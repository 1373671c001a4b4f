"""Raw parameters and shared values: per-sample gradients where a value shared by all samples
meets the batch.

A module without a rule (a ViT's root owning the cls token and position embedding, a
layer-scale gamma, a learned temperature, an nn.Embedding subclass with its own forward) has
its trainable parameters watched while its own forward runs: each is swapped for an alias of
itself, a tensor subclass that sees every torch operation touching it and nothing else
(operations on other tensors and the forwards of children run as before, at no extra cost).
Where a watched tensor meets the batch is its point of use, and the gradient is captured there
(engine/watching/uses.py):

  elementwise (x + pos, x * gamma, torch.where, ..., and a float attn_mask of
      scaled_dot_product_attention): the watched operand w is replaced by w_b, w reshaped with
      leading 1s and expanded to B on the batch dim. The result is unchanged, and the gradient
      at w_b, (B, ...), holds the per-sample gradients of w.
  expand (cls.expand(B, -1, -1), broadcast_to, expand_as, repeat): likewise, the batch dim
      expanded first.
  linear (F.linear(x, W, b), x @ W, torch.mm, torch.addmm(b, x, W) as in GPT-2's Conv1D):
      the gradient D at the op's output and its input x give g_i(W) = sum_t D_it x_it^T, kept
      factored (ghost norms), and g_i(b) = sum_t D_it.
  F.embedding(ids, W): rows, g_i(W) = sum_t onehot(ids_it) D_it^T (IndexedRows).
  F.layer_norm(x, shape, w, b): g_i(w) = sum_t D_it * xhat_it, g_i(b) = sum_t D_it.

Operations on watched tensors alone, or with tensors that do not carry the batch, give derived
watched tensors (pos[:, :T], gamma[:, None, None], temperature.exp()); per-sample gradients at
a derived tensor are mapped back to its roots by one batched vector-Jacobian product of that
short chain (parameter-sized work per sample, no recompute of the model).

The same mechanism serves values that are not parameters but are shared by all samples
(`Watch.share`): the output of a module with a rule called without the batch (a position
embedding looked up with (1, T) ids, `watch_shared_output`) and an F.embedding lookup of a
watched table with ids without the batch. Each is a root with its own map from the per-sample
gradients at it to per-sample parameter gradients (the rule run on its inputs expanded over
the batch; the rows of the table).

The batch contract: B is the size of the batch dim (0; 1 inside a batch_first=False
transformer) of the first tensor argument of the model's forward, and a tensor carries the
batch when its batch dim has size B. Any other operation meeting the batch stops the watch:
the engine then serves the module with the torch.func fallback where it can (engine/rules/
fallback.py), and otherwise raises UnsupportedModuleError naming the module, the parameter or
value, the operation and the fix.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_leaves, tree_map

from gradalign.engine.guards.inputs import versions
from gradalign.engine.representations import PerSampleGrad, combine
from gradalign.engine.watching.uses import AtUse, EmbeddingUse, LinearUse, NormUse, Source, lookup_grads
from gradalign.errors import UnsupportedModuleError

_ELEMENTWISE = frozenset(
    "add sub mul div true_divide multiply subtract divide where addcmul addcdiv lerp maximum minimum fmax fmin "
    "pow atan2 hypot copysign add_ sub_ mul_ div_ __radd__ __rsub__ __rmul__ __rdiv__ __rtruediv__ __rpow__ "
    "__iadd__ __isub__ __imul__ __itruediv__ __add__ __sub__ __mul__ __truediv__ __pow__".split())
_EXPAND = frozenset("expand expand_as broadcast_to repeat".split())
_LINEAR = {  # name -> (argument names as positions, {keyword: role}); roles: input, weight, bias
    "linear": (("input", "weight", "bias"), {}),
    "matmul": (("input", "weight"), {"other": "weight"}),
    "mm": (("input", "weight"), {"mat2": "weight"}),
    "addmm": (("bias", "input", "weight"), {"input": "bias", "mat1": "input", "mat2": "weight"}),
}
_EMBEDDING = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_LAYER_NORM = ("input", "normalized_shape", "weight", "bias", "eps")
_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_TYPE_ONLY = frozenset("type_as to new_zeros new_ones new_empty new_full zeros_like ones_like empty_like".split())
_FOLLOWS = ("elementwise operations, expand/repeat, F.linear/matmul/mm/addmm with the parameter as the weight, "
            "F.embedding, F.layer_norm, and scaled_dot_product_attention's float attn_mask")


def _run(func, args: tuple, kwargs: dict):
    """The operation itself, on the watched tensors' plain values."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


class _Watched(Tensor):
    """An alias of a watched parameter, or a tensor computed from watched parameters alone."""

    _ga_source: Source

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, _Watched))
        return first._ga_source.watch.on_op(func, args, kwargs)


def _bind(positions: tuple, args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(positions, args)), **kwargs}


class Watch:
    """One call of a watched module: its parameters swapped for aliases, and the points of use.

    Args:
        module, where: the module and its 'path (Type)' for messages.
        params: {local name: trainable parameter} to watch; names: {local name: full name}.
        batch, batch_dim: B and the dim that carries it in this module's forward.
        can_fall_back: whether the torch.func fallback could serve this call (one tensor in);
            if not, an operation the watch cannot follow raises at once.
    """

    def __init__(self, module: nn.Module, where: str, params: dict[str, nn.Parameter], names: dict[str, str],
                 batch: int | None, batch_dim: int, can_fall_back: bool):
        self.module, self.where, self.params, self.names = module, where, params, names
        self.batch, self.batch_dim, self.can_fall_back = batch, batch_dim, can_fall_back
        # uses, their edges, the inputs they keep (engine/guards/inputs.py) grow until the backward (a tensor computed
        # from the parameters may leave the forward and meet the batch later); claims: the aliases' autograd nodes
        self.uses, self.edges, self.inputs, self.claims = [], [], [], []
        self.stopped: str | None = None  # the operation it could not follow
        self.fix = ("compute this step in a submodule that has a rule (nn.Linear, nn.LayerNorm, ...), register a rule "
                    "for this module type (gradalign.engine.default_registry().register), or freeze the parameter")
        self.no_fallback = "the torch.func fallback cannot serve this call"  # replaced by the fallback's reason
        self.hint = ""  # the layout declaration, where the model's layout was not declared (engine/recording.py)

    def start(self) -> None:
        for name, p in self.params.items():
            alias = p.as_subclass(_Watched)
            alias._ga_source = Source(self, p, alias=name, label=f"parameter {self.names[name]}")
            self.module._parameters[name] = alias
            with torch._C.DisableTorchFunctionSubclass():
                self.claims.append(alias.grad_fn)

    def stop(self) -> None:
        for name, p in self.params.items():
            self.module._parameters[name] = p

    def share(self, value: Tensor, to_grads: Callable[[Tensor], dict], label: str) -> Tensor:
        """`value`, shared by all samples, watched until it meets the batch: the per-sample gradients
        G (B, *value.shape) there become parameter gradients through to_grads(G)."""
        alias = value.as_subclass(_Watched)
        alias._ga_source = Source(self, value, to_grads=to_grads, label=label)
        return alias

    def _use(self, use) -> None:
        self.uses.append(use)
        self.edges.append(use.edge)
        self.inputs += versions([getattr(use, "x", getattr(use, "index", None))])

    def per_sample(self, grads: list[Tensor | None]) -> dict[str, PerSampleGrad]:
        """Per-sample gradients of the watched parameters from the gradients at the uses; the
        gradients at each root are summed over its uses first, then mapped once."""
        out: dict[str, PerSampleGrad] = {}
        at_roots: dict[Source, Tensor] = {}
        for use, g in zip(self.uses, grads):
            if g is None:
                continue
            direct, pulled = use.per_sample(g, self.batch, self.batch_dim)
            for name, grad in direct.items():
                out[name] = grad if name not in out else combine(out[name], grad)
            for root, grad in pulled:
                at_roots[root] = grad if root not in at_roots else at_roots[root] + grad
        for root, g in at_roots.items():
            for name, grad in root.back(g).items():
                out[name] = grad if name not in out else combine(out[name], grad)
        return out

    def refusal(self, why_no_fallback: str) -> str:
        return (f"{self.where}: {self.stopped}, which the engine cannot follow (it follows {_FOLLOWS}), "
                f"and {why_no_fallback}. Fix: {self.fix}{self.hint}")

    def _size_at_batch_dim(self, t: Tensor, ndim: int | None = None) -> int | None:
        """t's size on the batch dim, t right-aligned to ndim dims (broadcasting); None if it has none."""
        shape = t.shape if ndim is None else (1,) * (ndim - t.dim()) + tuple(t.shape)
        return shape[self.batch_dim] if len(shape) > self.batch_dim else None

    def _carries_batch(self, t: Tensor, ndim: int | None = None) -> bool:
        return self._size_at_batch_dim(t, ndim) == self.batch

    def on_op(self, func, args: tuple, kwargs: dict):
        if self.stopped is not None or not torch.is_grad_enabled():
            return _run(func, args, kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        watched = [t for t in tensors if isinstance(t, _Watched)]
        others = [t for t in tensors if not isinstance(t, _Watched)]
        name = getattr(func, "__name__", repr(func))
        if any(w._ga_source.watch is not self for w in watched):
            self._stop(name, watched, "with a watched tensor of another module")
            return _run(func, args, kwargs)
        if self.batch is None and others:
            self._stop(name, watched, "the batch size is unknown")
            return _run(func, args, kwargs)
        if name in _EXPAND and isinstance(args[0], _Watched):
            return self._expand(func, name, args, kwargs)
        if name in _LINEAR:
            return self._linear(func, name, args, kwargs, watched)
        if name == "embedding":
            return self._embedding(func, name, args, kwargs, watched)
        if name == "layer_norm":
            return self._layer_norm(func, name, args, kwargs, watched)
        if name == "scaled_dot_product_attention":
            return self._attention_bias(func, name, args, kwargs, watched)
        if name in _ELEMENTWISE and others:
            return self._elementwise(func, name, args, kwargs, tensors, watched)
        if name in _TYPE_ONLY or not any(self._carries_batch(t) for t in others):
            return self._derived(func, name, args, kwargs, watched)
        result = _run(func, args, kwargs)
        if not any(t.requires_grad for t in tree_leaves(result) if isinstance(t, Tensor)):
            return result  # no gradient flows through it (a comparison, an index)
        self._stop(name, watched)
        return result

    def _derived(self, func, name: str, args: tuple, kwargs: dict, watched: list) -> object:
        return self._wrap(_run(func, args, kwargs), watched)

    def _wrap(self, result, watched: list) -> object:
        """A result computed from watched tensors (and tensors without the batch), watched in turn."""
        roots = tuple(dict.fromkeys(r for w in watched for r in w._ga_source.root_list))
        source = watched[0]._ga_source

        def wrap(r):
            if not isinstance(r, Tensor) or isinstance(r, _Watched) or not r.requires_grad:
                return r
            alias = r.as_subclass(_Watched)
            p = source.plain
            if (source.alias is not None and len(roots) == 1 and r.dim() == p.dim() == 2 and r.shape == p.shape[::-1]
                    and r.stride() == p.stride()[::-1] and r.data_ptr() == p.data_ptr()):  # .t(), .T, transpose
                alias._ga_source = Source(self, r, source.alias, not source.transposed, label=source.label)
            else:
                alias._ga_source = Source(self, r, roots=roots, label=source.label)
            return alias
        return tree_map(wrap, result)

    def _batched(self, w: _Watched, ndim: int) -> Tensor:
        """w_b: w with leading 1s up to ndim dims, expanded to B on the batch dim; a point of use."""
        shape = (1,) * (ndim - w.dim()) + tuple(w.shape)
        sizes = list(shape)
        sizes[self.batch_dim] = self.batch
        with torch._C.DisableTorchFunctionSubclass():
            w_b = w.reshape(shape).expand(sizes)
        self._use(AtUse(get_gradient_edge(w_b), w._ga_source, w.shape))
        return w_b

    def _elementwise(self, func, name: str, args: tuple, kwargs: dict, tensors: list, watched: list):
        try:
            ndim = len(torch.broadcast_shapes(*(t.shape for t in tensors)))
        except RuntimeError:
            return _run(func, args, kwargs)  # torch's own error
        if not any(self._carries_batch(t, ndim) for t in tensors if not isinstance(t, _Watched)):
            return self._derived(func, name, args, kwargs, watched)
        if all(self._size_at_batch_dim(w, ndim) == 1 for w in watched):
            # the batch comes from the other operands: substitute w_b for every watched operand
            args, kwargs = tree_map(lambda t: self._batched(t, ndim) if isinstance(t, _Watched) else t, (args, kwargs))
            return _run(func, args, kwargs)
        self._stop(name, watched, "its own dim there has the batch size", ambiguous=True)
        return _run(func, args, kwargs)

    def _expand(self, func, name: str, args: tuple, kwargs: dict):
        w = args[0]
        result = _run(func, args, kwargs)
        if not self._carries_batch(result) or self._size_at_batch_dim(w, result.dim()) != 1:
            return self._wrap(result, [w])
        w_b = self._batched(w, result.dim())
        with torch._C.DisableTorchFunctionSubclass():
            if name != "repeat":
                return w_b.expand(result.shape)
            reps = list(args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:])
            reps[self.batch_dim] = 1  # w_b already has the batch
            return w_b.repeat(reps)

    def _linear(self, func, name: str, args: tuple, kwargs: dict, watched: list):
        positions, keywords = _LINEAR[name]
        bound = {**dict(zip(positions, args)), **{keywords.get(k, k): v for k, v in kwargs.items()}}
        x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        if isinstance(x, _Watched) or not isinstance(x, Tensor):  # the parameter on the left: not a linear use
            others = [t for t in (weight, bias) if isinstance(t, Tensor) and not isinstance(t, _Watched)]
            if any(self._carries_batch(t) for t in others):
                self._stop(name, watched)
                return _run(func, args, kwargs)
            return self._derived(func, name, args, kwargs, watched)
        merged = x.dim() == 2 and self.batch is not None and x.shape[0] % self.batch == 0
        batched = x.dim() >= 2 and self._carries_batch(x) and self.batch_dim < x.dim() - 1
        if not (batched or merged):
            return self._derived(func, name, args, kwargs, watched)
        result = _run(func, args, kwargs)
        sources = [t._ga_source if isinstance(t, _Watched) else None for t in (weight, bias)]
        if bound.get("alpha", 1) != 1 or bound.get("beta", 1) != 1 or weight.dim() != 2 or (
                sources[1] is not None and bias.numel() != result.shape[-1]):
            self._stop(name, watched)
            return result
        self._use(LinearUse(get_gradient_edge(result), x.detach(), merged and not batched, sources[0],
                            name != "linear", sources[1]))
        return result

    def _embedding(self, func, name: str, args: tuple, kwargs: dict, watched: list):
        """F.embedding(index, W): with the batch in index, a point of use (IndexedRows); without
        (position ids shared by all samples), the lookup is a root whose per-sample gradients
        at the batch are rows of W."""
        bound = _bind(_EMBEDDING, args, kwargs)
        index, weight = bound["input"], bound["weight"]
        w = weight._ga_source if isinstance(weight, _Watched) else None
        if (w is None or w.alias is None or w.transposed or isinstance(index, _Watched) or bound.get("max_norm")
                is not None or bound.get("scale_grad_by_freq") or bound.get("sparse")):
            if self._carries_batch(index) and not isinstance(index, _Watched):
                self._stop(name, watched)
                return _run(func, args, kwargs)
            return self._derived(func, name, args, kwargs, watched)
        result = _run(func, args, kwargs)
        padding_idx, num_rows = bound.get("padding_idx"), weight.shape[0]
        if self._carries_batch(index) and index.dim() > self.batch_dim:
            self._use(EmbeddingUse(get_gradient_edge(result), index.detach(), w, padding_idx))
            return result
        shared = index.detach()

        def to_grads(g: Tensor) -> dict:  # g: (B, *result.shape)
            return lookup_grads(w.alias, shared.expand(g.shape[0], *shared.shape), g, padding_idx, num_rows)
        return self.share(result, to_grads, w.label)

    def _layer_norm(self, func, name: str, args: tuple, kwargs: dict, watched: list):
        bound = _bind(_LAYER_NORM, args, kwargs)
        x = bound["input"]
        sources = [t._ga_source if isinstance(t, _Watched) else None for t in (bound.get("weight"), bound.get("bias"))]
        if isinstance(x, _Watched) or not self._carries_batch(x):
            return self._derived(func, name, args, kwargs, watched)
        result = _run(func, args, kwargs)
        shape = tuple(bound["normalized_shape"])
        if self.batch_dim >= x.dim() - len(shape):  # the batch among the normalised dims
            self._stop(name, watched)
            return result
        self._use(NormUse(get_gradient_edge(result), x.detach(), shape, bound.get("eps", 1e-5), *sources))
        return result

    def _attention_bias(self, func, name: str, args: tuple, kwargs: dict, watched: list):
        """F.scaled_dot_product_attention with a watched float attn_mask (T5's relative position
        bias under SDPA): the mask is added to the scores, so it is an elementwise use."""
        bound = _bind(_SDPA, args, kwargs)
        mask, query = bound.get("attn_mask"), bound["query"]
        if (not isinstance(mask, _Watched) or any(isinstance(bound.get(k), _Watched) for k in ("query", "key", "value"))
                or not self._carries_batch(query) or self._size_at_batch_dim(mask, query.dim()) != 1):
            if any(self._carries_batch(t) for t in (bound.get(k) for k in ("query", "key", "value"))
                   if isinstance(t, Tensor) and not isinstance(t, _Watched)):
                self._stop(name, watched)
                return _run(func, args, kwargs)
            return self._derived(func, name, args, kwargs, watched)
        bound["attn_mask"] = self._batched(mask, query.dim())
        return _run(func, (), bound)

    def _stop(self, name: str, watched: list, why: str = "", ambiguous: bool = False) -> None:
        """Stop watching this call (the torch.func fallback will serve it), or raise if it cannot
        (ambiguous: which dim is the batch is unknown, so a per-sample forward is not defined either)."""
        self.stopped = f"{watched[0]._ga_source.label} meets the batch in {name}" + (f" ({why})" if why else "")
        if not self.can_fall_back or ambiguous:
            raise UnsupportedModuleError(self.refusal(
                "no per-sample forward is defined for it" if ambiguous else self.no_fallback))


def watch_shared_output(module: nn.Module, where: str, compute: Callable, captured: tuple, output: Tensor,
                        batch: int, batch_dim: int, hint: str = "") -> tuple[Watch, Tensor]:
    """A rule-served module called without the batch (BERT's and GPT-2's position embeddings
    look up (1, T) ids; T5's relative attention bias (T, T) buckets): its output is shared by
    all samples. It is watched like a raw parameter until it meets the batch; the per-sample
    gradients G (B, *output.shape) there are exactly those of the module's output for each
    sample, so the rule runs once on its inputs expanded over the batch with G. Returns the
    watch (its edges and per_sample make the engine's call) and the output to hand on."""
    x = captured[0]
    size = x.shape[0] if x.dim() else None  # the batch dim, moved to 0 by the engine
    expand = size == 1 and output.dim() > batch_dim and output.shape[batch_dim] == 1
    if not expand and batch_dim != 0:
        raise UnsupportedModuleError(
            f"{where}: called without the batch inside a module that puts the batch on dim {batch_dim}; "
            "give its input the batch (e.g. ids.expand(B, -1)) or a size-1 batch dim")
    per_sample_shape = [n for k, n in enumerate(output.shape) if k != batch_dim] if expand else list(output.shape)

    def to_grads(g: Tensor) -> dict:  # g: (B, *output.shape), each sample's gradient at the output
        B = g.shape[0]
        xs = x.expand(B, *x.shape[1:]) if expand else x.unsqueeze(0).expand(B, *x.shape)
        return compute(module, (xs, *captured[1:]), g.reshape(B, *per_sample_shape))

    watch = Watch(module, where, {}, {}, batch, batch_dim, can_fall_back=False)
    has = "no batch dim" if size is None else f"{size} on its batch dim (dim {batch_dim})"
    watch.no_fallback = f"its output is taken as shared by all samples (its input has {has}, the batch {batch})"
    watch.fix = ("if it is a value shared by all samples, give the module's input the batch (e.g. "
                 "position_ids.expand(B, -1)) or use its output only in operations the engine follows") + (
        f"; if its {size} rows are a part of the batch (the sequences of a PackedSequence still running at one step, "
        "as Opacus's DPLSTM/DPGRU/DPRNN call their cells), use torch's nn.LSTM/nn.GRU/nn.RNN, which the engine "
        "serves with packed sequences, or pad the sequences" if size is not None and 1 < size < batch else "")
    watch.hint = hint
    label = f"the output of {where}, shared by all samples,"
    return watch, watch.share(output, to_grads, label)


def refuse_watched_input(args: tuple, where: str) -> None:
    """A module with a rule fed a watched value (a raw parameter, or another module's output shared
    by all samples) directly: not supported (its per-sample gradients and those of the value's
    own parameters would have to flow through one watch); raises with the way out."""
    for a in args:
        if isinstance(a, _Watched):
            raise UnsupportedModuleError(
                f"{where}: its input is {a._ga_source.label.rstrip(',')}, a value shared by all samples that does "
                "not carry the batch; per-sample gradients of both are not supported this way. Fix: expand the "
                "value over the batch first (e.g. value.expand(B, -1, -1)), or freeze one of them. If the value "
                "does carry the batch but not on dim 0 (e.g. (T, B, D)), give the module its input batch-first")

