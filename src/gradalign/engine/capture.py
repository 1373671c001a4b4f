"""PerSampleGradients: per-sample gradient statistics from one forward and one backward.

The forward hooks record each hooked module's inputs and the autograd edge of its output;
one backward of sum_i losses[i], asked only for the gradients at those edges, gives every
output gradient d. The per-layer rules turn (inputs, d) into factored per-sample gradients;
statistics and the (re-)weighted p.grad come from those, never from a (B, P) matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradalign.engine.gradient_stats import GradientStats
from gradalign.engine.persample import PerSampleGrad, full_precision
from gradalign.engine.rules import RuleRegistry, default_registry
from gradalign.engine.validate import Served, survey
from gradalign.errors import UnsupportedModuleError

Weights = Tensor | Callable[[GradientStats], Tensor] | None


@dataclass
class _Call:
    """One recorded call of a hooked module: its inputs, the autograd edge of its output
    and, after the backward, the gradient of the summed losses w.r.t. that output."""

    path: str
    args: tuple
    edge: GradientEdge  # fixed at the forward: later in-place ops on the output don't move it
    grad_output: Tensor | None = None


@dataclass
class _Hooked(Served):
    """A served module and the calls recorded since the last backward."""

    calls: list[_Call] = field(default_factory=list)


def _inside_torch_func(t: Tensor) -> bool:
    """True for a tensor inside a torch.func transform (vmap, grad): not a training forward."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class PerSampleGradients:
    """Hooks every module of `model` that owns trainable parameters.

    Example:
        engine = PerSampleGradients(model)
        losses = F.cross_entropy(model(x), y, reduction="none")   # (B,)
        stats = engine.backward(losses)        # p.grad += mean gradient, as losses.mean().backward()
        stats.norms, stats.cosines             # (B,) each

    The engine is the one writer of p.grad: `backward` adds the (weighted) mean gradient,
    `set_grad` replaces it (e.g. with GSNRAccumulator's accumulated mean).

    Args:
        model: the network. Checked at once (`ga.validate` runs the same walk): every
            unsupported module is listed in one UnsupportedModuleError.
        registry: per-layer rules (default: `default_registry()`, with the torch.func fallback).
        verify: after every backward, check that the per-sample gradients add up to
            autograd's summed gradient (catches parameters used outside their module's
            forward, which no hook can see). Costs one extra weighted sum per layer.
    """

    def __init__(self, model: nn.Module, *, registry: RuleRegistry | None = None, verify: bool = False):
        self.model = model
        self.registry = registry if registry is not None else default_registry()
        self.verify = verify
        self._capturing = True
        self._hooked: dict[str, _Hooked] = {}
        self._params: dict[str, nn.Parameter] = {}  # every hooked trainable parameter, by full name
        self._check_and_collect()
        self._handles = [
            h.module.register_forward_hook(self._make_hook(path, h), with_kwargs=True)
            for path, h in self._hooked.items()
        ]

    def _check_and_collect(self) -> None:
        served, problems = survey(self.model, self.registry)
        if problems:
            raise UnsupportedModuleError(
                "per-sample gradients are not available for these modules:\n  " + "\n  ".join(problems))
        for s in served:
            self._hooked[s.path] = _Hooked(s.path, s.module, s.rule, s.param_names)
            self._params.update({full: getattr(s.module, local) for local, full in s.param_names.items()})

    def _make_hook(self, path: str, hooked: _Hooked):
        def hook(module, args, kwargs, output):
            if not self._capturing or not torch.is_grad_enabled():
                return None
            if not isinstance(output, Tensor) or not output.requires_grad or _inside_torch_func(output):
                return None
            for check in (hooked.rule.reason(module),
                          hooked.rule.check_call(module, args, kwargs, output) if hooked.rule.check_call else None):
                if check:
                    raise UnsupportedModuleError(f"{path or '<model>'} ({type(module).__name__}): {check}")
            args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            hooked.calls.append(_Call(path, args, get_gradient_edge(output)))
            return None

        # Under torch.compile the hook always runs eagerly (a graph break at each hooked layer):
        # it needs the autograd edge of a real output tensor.
        return torch.compiler.disable(hook)

    def backward(self, losses: Tensor, weights: Weights = None, *, write_grad: bool = True) -> GradientStats:
        """One backward of sum(losses); p.grad += (1/B) sum_i w_i g_i (w = 1 by default).

        Args:
            losses: (B,) per-sample losses, e.g. F.cross_entropy(..., reduction="none").
            weights: None, a (B,) tensor, or a callable GradientStats -> (B,) tensor such as
                GASW(gamma); it sees the statistics of this batch before p.grad is written.
            write_grad: False leaves p.grad alone (statistics only, e.g. for GAGA, whose
                accumulated mean is written with `set_grad`).
        Returns:
            GradientStats of the unweighted per-sample gradients, with `.weights` set.
        """
        if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"losses must be a 1-D tensor of shape (B,) with one loss per sample, got {shape}; "
                "use reduction='none' in the loss function")
        if not losses.requires_grad:
            raise ValueError("losses does not require grad: compute it from the model's output "
                             "with gradients enabled")
        B = losses.shape[0]
        params = {n: p for n, p in self._params.items() if p.requires_grad}
        try:
            with full_precision(losses.device):  # backward and rules in float32, also inside autocast
                self._backward_to_outputs(losses, params, retain_graph=self.verify)
                per_sample = self._per_sample_grads(B, params)
            rtol = self._verify_rtol()
        finally:
            for h in self._hooked.values():
                h.calls.clear()
        stats = GradientStats(per_sample, B, device=losses.device)
        if self.verify:
            self._verify(stats, losses, rtol)
        w = self._resolve_weights(weights, stats, losses)
        stats.weights = w
        if write_grad:  # fresh tensors: p.grad never aliases a statistic the caller may read later
            update = ({n: s / B for n, s in stats.grad_sum.items()} if weights is None
                      else stats.weighted_sum(w / B))                        # (1/B) sum_i w_i g_i
            self._write_grad(update, add=True)
        return stats

    def set_grad(self, grads: dict[str, Tensor]) -> None:
        """p.grad = grads[name] for every hooked parameter named (cast to the parameter's dtype).

        Names are those of `model.named_parameters()`, as in `GradientStats.mean_grad`.
        """
        unknown = sorted(set(grads) - set(self._params))
        if unknown:
            raise KeyError(f"set_grad: {', '.join(unknown)} are not trainable parameters hooked by this engine")
        self._write_grad({n: g.detach().to(self._params[n], copy=True) for n, g in grads.items()}, add=False)

    def _write_grad(self, grads: dict[str, Tensor], *, add: bool) -> None:
        """The one place p.grad is written, from tensors nobody else holds. Parameters
        absent from `grads` (outside the losses) keep their grad, as in autograd."""
        for name, g in grads.items():
            p = self._params[name]
            g = g if g.dtype == p.dtype else g.to(p.dtype)  # statistics are float32, p may be half
            if add and p.grad is not None:
                p.grad.add_(g)
            else:
                p.grad = g

    def _backward_to_outputs(self, losses: Tensor, params: dict[str, nn.Parameter], retain_graph: bool) -> None:
        """One backward of sum(losses) that fills every call's grad_output.

        Autograd is asked for the gradients at the recorded layer-output edges, not the
        parameters, so it skips every weight-gradient product (the engine forms p.grad from
        the factors instead). An edge is the output as the forward produced it, so an
        in-place op after the layer does not change what is captured, and no output tensor
        is kept alive. Parameters of modules that recorded no call are asked for too: a
        gradient there means the parameter was used outside its module, which no hook sees.
        """
        calls = [call for h in self._hooked.values() for call in h.calls]
        unseen = [params[n] for h in self._hooked.values() if not h.calls for n in h.param_names.values()
                  if n in params]
        if not calls and not unseen:
            return
        grads = torch.autograd.grad(losses.sum(), [c.edge for c in calls] + unseen,
                                    allow_unused=True, retain_graph=retain_graph)
        for call, g in zip(calls, grads):
            call.grad_output = g
        names = {id(p): n for n, p in params.items()}
        for p, g in zip(unseen, grads[len(calls):]):
            if g is not None:  # the loss depends on p, yet p's module never ran: no host read needed
                compiled = "" if calls else (
                    "; no hooked module recorded a call: if the model was compiled (torch.compile) and run "
                    "before this engine was created, the compiled code skips the engine's hooks, so create "
                    "the engine before the first compiled call (or call torch._dynamo.reset())")
                raise UnsupportedModuleError(
                    f"parameter {names[id(p)]} has a gradient but its module's forward was not seen; a "
                    f"parameter used outside its own module (e.g. F.linear(x, m.weight)) is not supported{compiled}")

    def _per_sample_grads(self, B: int, params: dict[str, nn.Parameter]) -> dict[str, PerSampleGrad]:
        out: dict[str, PerSampleGrad] = {}
        self._capturing = False  # a rule may run the module again (torch.func fallback)
        try:
            for h in self._hooked.values():
                for call in h.calls:
                    if call.grad_output is None:  # this call did not contribute to the losses
                        continue
                    batch = call.args[0].shape[0] if call.args and isinstance(call.args[0], Tensor) else None
                    if batch != B:
                        raise ValueError(
                            f"{call.path} saw a batch of {batch} samples but losses has {B} entries; "
                            "the engine needs batch-first inputs and one loss per sample")
                    for local, grads in h.rule.compute(h.module, call.args, call.grad_output).items():
                        name = h.param_names[local]
                        if name not in params:  # frozen since the engine was created
                            continue
                        out[name] = grads if name not in out else out[name].merge(grads)
        finally:
            self._capturing = True
        return out

    def _resolve_weights(self, weights: Weights, stats: GradientStats, losses: Tensor) -> Tensor:
        """(B,) weights in the statistics' precision (at least float32). Finiteness is checked
        where that costs no host sync (weights on the CPU) or with verify=True."""
        B = losses.shape[0]
        dtype = torch.promote_types(losses.dtype, torch.float32)
        if weights is None:
            return torch.ones(B, device=losses.device, dtype=dtype)
        w = weights(stats) if callable(weights) else weights
        if not isinstance(w, Tensor) or w.shape != (B,):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"weights must be a tensor of shape ({B},), got {got}")
        if (w.device.type == "cpu" or self.verify) and not bool(torch.isfinite(w).all()):
            raise ValueError("weights contain NaN or infinite values")
        return w.detach().to(device=losses.device, dtype=dtype)

    def _verify_rtol(self) -> float:
        """Tolerance of `verify`: looser when layers ran in bfloat16 or float16."""
        dtypes = {c.grad_output.dtype for h in self._hooked.values() for c in h.calls if c.grad_output is not None}
        return max([1e-4] + [8 * torch.finfo(dt).eps for dt in dtypes if dt.is_floating_point])

    def _verify(self, stats: GradientStats, losses: Tensor, rtol: float) -> None:
        """Check the per-sample gradients against autograd's gradient of the mean loss."""
        names = list(stats.mean_grad)
        params = [self._params[n] for n in names]
        expected = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        for name, mean, exp in zip(names, stats.mean_grad.values(), expected):
            exp = torch.zeros_like(mean) if exp is None else exp.to(mean.dtype)
            if not torch.allclose(mean, exp, rtol=rtol, atol=rtol / 10 * (1 + exp.abs().max().item())):
                raise UnsupportedModuleError(
                    f"per-sample gradients of {name} do not add up to its gradient: the parameter is "
                    "used outside its module's forward, or a module mixes samples")

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before the engine was created."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for h in self._hooked.values():
            h.calls.clear()
