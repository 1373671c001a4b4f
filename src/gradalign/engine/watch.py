"""Raw parameters: per-sample gradients of a parameter used directly in its module's forward.

A module without a rule (a ViT's root owning the cls token and position embedding, a
layer-scale gamma, a learned temperature) has its trainable parameters watched while its own
forward runs: each is swapped for an alias of itself, a tensor subclass that sees every torch
operation touching it and nothing else (operations on other tensors and the forwards of
children run as before, at no extra cost). Where a watched tensor meets the batch is its point
of use, and the gradient is captured there:

  elementwise (x + pos, x * gamma, torch.where, ...): the watched operand w is replaced by
      w_b, w reshaped with leading 1s and expanded to B on the batch dim. The result is
      unchanged, and the gradient at w_b, (B, ...), holds the per-sample gradients of w.
  expand (cls.expand(B, -1, -1), broadcast_to, expand_as, repeat): likewise, the batch dim
      expanded first.
  linear (F.linear(x, W, b), x @ W, torch.mm, torch.addmm(b, x, W) as in GPT-2's Conv1D):
      the gradient D at the op's output and its input x give g_i(W) = sum_t D_it x_it^T, kept
      factored (ghost norms), and g_i(b) = sum_t D_it.

Operations on watched tensors alone, or with tensors that do not carry the batch, give derived
watched tensors (pos[:, :T], gamma[:, None, None], temperature.exp()); per-sample gradients at
a derived tensor are mapped back to the parameters by one batched vector-Jacobian product of
that short chain (parameter-sized work per sample, no recompute of the model).

The batch contract: B is the size of the batch dim (0; 1 inside a batch_first=False
transformer) of the first tensor argument of the model's forward, and a tensor carries the
batch when its batch dim has size B. Any other operation meeting the batch stops the watch:
the engine then serves the module with the torch.func fallback when it takes one tensor and
returns one, and otherwise raises UnsupportedModuleError naming the module, the parameter,
the operation and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_leaves, tree_map

from gradalign.engine.persample import Dense, Factored, PerSampleGrad
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
_TYPE_ONLY = frozenset("type_as to new_zeros new_ones new_empty new_full zeros_like ones_like empty_like".split())


def _run(func, args: tuple, kwargs: dict):
    """The operation itself, on the watched tensors' plain values."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


class _Watched(Tensor):
    """An alias of a watched parameter, or a tensor computed from watched parameters alone."""

    _ga_source: "_Source"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, _Watched))
        return first._ga_source.watch.on_op(func, args, kwargs)


@dataclass(eq=False)
class _Source:
    """What a watched tensor is: `plain`, its value as an ordinary tensor, computed from the
    parameters `names` (the parameter `alias` itself, transposed or not, on the fast path)."""

    watch: "Watch"
    plain: Tensor
    names: tuple[str, ...]
    alias: str | None = None
    transposed: bool = False

    def back(self, g: Tensor) -> dict[str, PerSampleGrad]:
        """Per-sample gradients of the parameters from g, (B, *plain.shape) at this tensor."""
        if self.alias is not None:
            return {self.alias: Dense(g.transpose(1, 2) if self.transposed else g)}
        params = [self.watch.params[n] for n in self.names]
        try:
            grads = torch.autograd.grad(self.plain, params, g, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
        except RuntimeError:  # a backward formula vmap cannot batch: one vjp per sample
            rows = [torch.autograd.grad(self.plain, params, gi, retain_graph=True, allow_unused=True) for gi in g]
            grads = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(params))]
        return {n: Dense(gr) for n, gr in zip(self.names, grads) if gr is not None}


@dataclass(eq=False)
class _AtUse:
    """An elementwise or expand point of use: the gradient at w_b (B on the batch dim)."""

    edge: GradientEdge
    source: _Source
    shape: torch.Size  # of the watched tensor

    def per_sample(self, g: Tensor, watch: "Watch") -> dict[str, PerSampleGrad]:
        return self.source.back(g.movedim(watch.batch_dim, 0).reshape(watch.batch, *self.shape))


@dataclass(eq=False)
class _LinearUse:
    """A linear point of use: the input x and the gradient at the op's output (bias included)."""

    edge: GradientEdge
    x: Tensor
    merged: bool  # x is 2-D with the batch and the positions merged in its rows (x.view(-1, n))
    weight: _Source | None
    right: bool  # the weight is matmul's right operand, (in, out); else F.linear's (out, in)
    bias: _Source | None

    def per_sample(self, g: Tensor, watch: "Watch") -> dict[str, PerSampleGrad]:
        A, D = watch.rows(self.x, self.merged), watch.rows(g, self.merged)  # (B, T, in), (B, T, out)
        out: dict[str, PerSampleGrad] = {}
        w = self.weight
        if w is not None and w.alias is not None:  # g(W) = D^T A for F.linear, A^T D for x @ W
            swap = self.right != w.transposed
            shape = watch.params[w.alias].shape
            out[w.alias] = (Factored(D.unsqueeze(1), A.unsqueeze(1), shape) if swap
                            else Factored(A.unsqueeze(1), D.unsqueeze(1), shape))
        elif w is not None:  # a weight computed from parameters: materialised, then mapped back
            used = torch.einsum("bti,bto->bio", A, D) if self.right else torch.einsum("bto,bti->boi", D, A)
            out.update(w.back(used))
        if self.bias is not None:
            for name, grads in self.bias.back(D.sum(1).reshape(watch.batch, *self.bias.plain.shape)).items():
                out[name] = grads if name not in out else out[name].merge(grads)
        return out


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
        # uses and their edges; both grow until the backward, as a tensor computed from the
        # parameters may leave the forward (returned by it) and meet the batch later
        self.uses: list[_AtUse | _LinearUse] = []
        self.edges: list[GradientEdge] = []
        self.stopped: str | None = None  # the operation it could not follow

    def start(self) -> None:
        for name, p in self.params.items():
            alias = p.as_subclass(_Watched)
            alias._ga_source = _Source(self, p, (name,), alias=name)
            self.module._parameters[name] = alias

    def stop(self) -> None:
        for name, p in self.params.items():
            self.module._parameters[name] = p

    def _use(self, use: _AtUse | _LinearUse) -> None:
        self.uses.append(use)
        self.edges.append(use.edge)

    def per_sample(self, grads: list[Tensor | None]) -> dict[str, PerSampleGrad]:
        out: dict[str, PerSampleGrad] = {}
        for use, g in zip(self.uses, grads):
            if g is None:
                continue
            for name, grad in use.per_sample(g, self).items():
                out[name] = grad if name not in out else out[name].merge(grad)
        return out

    def refusal(self, why_no_fallback: str) -> str:
        return (f"{self.where}: {self.stopped}, which the engine cannot follow (it follows elementwise "
                "operations, expand/repeat, and F.linear/matmul/mm/addmm with the parameter as the weight), "
                f"and {why_no_fallback}. Fix: compute this step in a submodule that has a rule (nn.Linear, "
                "nn.LayerNorm, ...), "
                "register a rule for this module type (gradalign.engine.default_registry().register), or freeze "
                "the parameter")

    def rows(self, t: Tensor, merged: bool) -> Tensor:
        """A linear use's input or output gradient as (B, T, n)."""
        B, n = self.batch, t.shape[-1]
        if not merged:
            return t.movedim(self.batch_dim, 0).reshape(B, -1, n)
        if self.batch_dim == 0:  # rows sample-major: x.view(-1, n) of a (B, ..., n) tensor
            return t.reshape(B, -1, n)
        return t.reshape(-1, B, n).transpose(0, 1)

    def _size_at_batch_dim(self, t: Tensor, ndim: int | None = None) -> int | None:
        """t's size on the batch dim, t right-aligned to ndim dims (broadcasting); None if it has none."""
        shape = t.shape if ndim is None else (1,) * (ndim - t.dim()) + tuple(t.shape)
        return shape[self.batch_dim] if len(shape) > self.batch_dim else None

    def _carries_batch(self, t: Tensor, ndim: int | None = None) -> bool:
        return self._size_at_batch_dim(t, ndim) == self.batch

    # -- the operations ------------------------------------------------------------------

    def on_op(self, func, args: tuple, kwargs: dict):
        if self.stopped is not None or not torch.is_grad_enabled():
            return _run(func, args, kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        watched = [t for t in tensors if isinstance(t, _Watched)]
        others = [t for t in tensors if not isinstance(t, _Watched)]
        name = getattr(func, "__name__", repr(func))
        if any(w._ga_source.watch is not self for w in watched):
            self._stop(name, watched, "with parameters of another module")
            return _run(func, args, kwargs)
        if self.batch is None and others:
            self._stop(name, watched, "the batch size is unknown")
            return _run(func, args, kwargs)
        if name in _EXPAND and isinstance(args[0], _Watched):
            return self._expand(func, name, args, kwargs)
        if name in _LINEAR:
            return self._linear(func, name, args, kwargs, watched)
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
        names = tuple(dict.fromkeys(n for w in watched for n in w._ga_source.names))
        source = watched[0]._ga_source

        def wrap(r):
            if not isinstance(r, Tensor) or isinstance(r, _Watched) or not r.requires_grad:
                return r
            alias = r.as_subclass(_Watched)
            p = source.plain
            if (source.alias is not None and len(names) == 1 and r.dim() == p.dim() == 2 and r.shape == p.shape[::-1]
                    and r.stride() == p.stride()[::-1] and r.data_ptr() == p.data_ptr()):  # .t(), .T, transpose
                alias._ga_source = _Source(self, r, names, source.alias, not source.transposed)
            else:
                alias._ga_source = _Source(self, r, names)
            return alias
        return tree_map(wrap, result)

    def _batched(self, w: _Watched, ndim: int) -> Tensor:
        """w_b: w with leading 1s up to ndim dims, expanded to B on the batch dim; a point of use."""
        shape = (1,) * (ndim - w.dim()) + tuple(w.shape)
        sizes = list(shape)
        sizes[self.batch_dim] = self.batch
        with torch._C.DisableTorchFunctionSubclass():
            w_b = w.reshape(shape).expand(sizes)
        self._use(_AtUse(get_gradient_edge(w_b), w._ga_source, w.shape))
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
        self._stop(name, watched, "the parameter's own dim there has the batch size")
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
        self._use(_LinearUse(get_gradient_edge(result), x.detach(), merged and not batched, sources[0],
                             name != "linear", sources[1]))
        return result

    def _stop(self, name: str, watched: list, why: str = "") -> None:
        """Stop watching this call (the torch.func fallback will serve it), or raise if it cannot."""
        param = self.names[watched[0]._ga_source.names[0]]
        self.stopped = f"parameter {param} meets the batch in {name}" + (f" ({why})" if why else "")
        if not self.can_fall_back:
            raise UnsupportedModuleError(self.refusal(
                "the torch.func fallback needs a module called with one tensor and returning one tensor"))
