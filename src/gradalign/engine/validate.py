"""One walk over a model: which modules the engine serves with which rule, and every problem;
and `verify`, the check of one backward's per-sample gradients against autograd (verify=True).

`ga.validate(model)` (engine/validation.py) returns the problems without hooking anything (what
Opacus users know as ModuleValidator); `PerSampleGradients` runs the same walk and refuses the
model with all of them at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from gradalign.engine.gradient_stats import GradientStats
from gradalign.engine.representations import full_precision
from gradalign.engine.rules import Rule, RuleRegistry
from gradalign.errors import UnsupportedModuleError


@dataclass
class Served:
    """A module with trainable parameters of its own, and the rule that serves it."""

    path: str
    module: nn.Module
    rule: Rule
    param_names: dict[str, str]  # local name ("weight", or "child.weight" for a child the rule owns) -> full name
    shared: bool = False  # declared to be called on inputs shared by all samples (RuleRegistry.register_shared)
    derived: dict = field(default_factory=dict)  # computed tensor -> the local names it is computed from


_OLD_STYLE = (WeightNorm, SpectralNorm, BasePruningMethod)  # pre-hooks that set module.<name>


def derived_tensors(module: nn.Module) -> tuple[dict[str, tuple[str, ...]], dict[str, nn.Parameter], tuple[str, ...]]:
    """({computed tensor name: local names of the trainable parameters it is computed from},
    {local name: parameter} of those not owned by the module itself, child names they live in)."""
    derived, extra, children = {}, {}, ()
    if parametrize.is_parametrized(module):
        children = ("parametrizations",)
        for name, plist in module.parametrizations.items():
            found = {f"parametrizations.{name}.{n}": p for n, p in plist.named_parameters() if p.requires_grad}
            extra.update(found)
            derived[name] = tuple(found)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _OLD_STYLE):
            name = hook._tensor_name if isinstance(hook, BasePruningMethod) else hook.name
            derived[name] = tuple(n for n, p in module.named_parameters(recurse=False)
                                  if p.requires_grad and n in {f"{name}_g", f"{name}_v", f"{name}_orig"})
    return derived, extra, children


def survey(model: nn.Module, registry: RuleRegistry) -> tuple[list[Served], list[str]]:
    """(served modules, problems as 'path (Type): why') for every module owning trainable parameters.

    A module whose rule owns children (nn.MultiheadAttention's out_proj) serves their
    parameters too, and the children are not served on their own. A parameter tied between
    modules (a language model's input and output embeddings) is served by each of them under
    one name, its first in `model.named_parameters()`; the engine adds the contributions.
    """
    full_names = {id(p): n for n, p in model.named_parameters()}  # a tied parameter: its first name
    owned: list[str] = []  # paths of children served by a parent's rule
    shared: set[str] = set()  # paths of children declared shared by their parent's type
    served, problems = [], []
    for path, module in model.named_modules():
        shared.update(f"{path}.{c}" if path else c for c in registry.shared_children(module))
        if any(path == o or path.startswith(o + ".") for o in owned):
            continue
        rule = registry.rule_for(module)
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        for child in (rule.owns if rule is not None else ()):
            owned.append(f"{path}.{child}" if path else child)
            own.update({f"{child}.{n}": p for n, p in module.get_submodule(child).named_parameters() if p.requires_grad})
        derived = {}
        if rule is not None and not rule.watch:  # a weight computed from other parameters (recording/parametrized.py)
            derived, computed_from, children = derived_tensors(module)
            own.update(computed_from)
            owned.extend(f"{path}.{child}" if path else child for child in children)
        if not own:
            continue
        where = f"{path or '<model>'} ({type(module).__name__})"
        reason = "no rule for this module type" if rule is None else rule.reason(module)
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        served.append(Served(path, module, rule, {local: full_names[id(p)] for local, p in own.items()}, path in shared,
                             derived))
    return served, problems


def check_losses(losses: Tensor, write_grad: bool, release: bool) -> None:
    """The arguments of `PerSampleGradients.backward`: one loss per sample (an empty batch included)."""
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"losses must be a 1-D tensor of shape (B,) with one loss per sample, got {shape}; "
            "use reduction='none' in the loss function (and ga.token_losses to average a sequence's tokens)")
    if not losses.requires_grad and losses.numel():
        raise ValueError("losses does not require grad: compute it from the model's output with gradients enabled")
    if release and not write_grad:
        raise ValueError("release=True frees the per-sample gradients as p.grad is written; with "
                         "write_grad=False nothing is written, so the statistics would be lost: drop one")


def unseen_use(name: str, owners: list[str], any_call: bool) -> str:
    """Why parameter `name` has a gradient although no use of it was seen in its modules' forwards."""
    compiled = "" if any_call else (
        "; no hooked module recorded a call: if the model was compiled (torch.compile) and run before this "
        "engine was created, the compiled code skips the engine's hooks, so create the engine before the first "
        "compiled call (or call torch._dynamo.reset())")
    return (f"parameter {name} has a gradient but the engine saw no use of it in the forward of "
            f"{' or '.join(owners)}, which owns it: it is used outside that forward (e.g. F.linear(x, m.weight) in "
            "a parent; call the module instead), the forward was bypassed (m.forward(x) instead of m(x): the "
            "engine's hooks do not run), or, in a module without a rule, it is used only inside a custom "
            f"autograd.Function or a reentrant checkpoint{compiled}")


def verify_rtol(grads: list) -> float:
    """Tolerance of `verify` for the output gradients of one backward: looser when layers ran in
    bfloat16 or float16."""
    dtypes = {g.dtype for g in grads if g is not None}
    return max([1e-4] + [8 * torch.finfo(dt).eps for dt in dtypes if dt.is_floating_point])


def verify(stats: GradientStats, losses: Tensor, all_params: dict[str, nn.Parameter], rtol: float) -> None:
    """Check the per-sample gradients against autograd, twice: sum_i v_i g_i against the
    gradient of sum_i v_i l_i for weights v that tell the samples apart (catches a parameter
    used where no hook sees it, or a gradient given to the wrong sample), and the first
    sample's and the largest one's squared norm against a backward of that sample's loss
    alone (catches a module that mixes samples or gets its batch on another dim, e.g. a
    (T, B, ...) input with T == B)."""
    B = stats.batch_size
    v = torch.rand(B, generator=torch.Generator().manual_seed(0)) + 0.5
    v = v.to(losses.device, torch.promote_types(losses.dtype, torch.float32))
    with full_precision(losses.device):  # the representations hold g_i / scale
        vs = v * (stats.scale.to(v.dtype) / B)
        local = {n: g.weighted_sum(vs) for n, g in stats._per_sample.items()}  # this rank's samples
    names = list(local)
    params = [all_params[n] for n in names]
    expected = torch.autograd.grad((losses * v.to(losses.dtype)).sum() / B, params, allow_unused=True,
                                   retain_graph=True)
    for name, mine, exp in zip(names, local.values(), expected):
        exp = torch.zeros_like(mine) if exp is None else exp.to(mine.dtype)
        if not torch.allclose(mine, exp, rtol=rtol, atol=rtol / 10 * (1 + exp.abs().max().item())):
            raise UnsupportedModuleError(
                f"per-sample gradients of {name} do not add up to autograd's gradient. Causes and fixes: a "
                "module's input carries the batch on another dim than the one the engine took (a sequence-first "
                "(T, B, ...) input with T == B: declare ga.PerSampleGradients(model, batch_first=False), or for one "
                "module type registry.register_layout(Type, lambda m: 1)); an input with the batch size on its "
                "batch dim that does not carry the batch (T5's (T, T) buckets when T == B: "
                "registry.register_shared(parent type, child name)); the parameter used outside its module's "
                "forward (call the module instead); or a module that mixes samples (register a rule for it)")
    norms = stats.norms.double()  # not sq_norms: |g_i|^2 may overflow float32 where |g_i| does not
    samples = sorted({0, int(norms.argmax())})
    for k, i in enumerate(samples):
        own = torch.autograd.grad(losses[i], params, allow_unused=True, retain_graph=k + 1 < len(samples))
        exact = sum(g.double().square().sum() for g in own if g is not None)
        got = norms[i].square()
        if not torch.isclose(got, torch.as_tensor(float(exact), dtype=torch.float64), rtol=10 * rtol,
                             atol=rtol * float(norms.max().square())):
            raise UnsupportedModuleError(
                f"the per-sample gradient of sample {i} has |g|^2 = {float(got):.6g}, but a backward of its "
                f"loss alone gives {float(exact):.6g}: a layer got its batch on another dim than the one the "
                "engine took (a sequence-first (T, B, ...) input with T == B: declare "
                "ga.PerSampleGradients(model, batch_first=False), or registry.register_layout(Type, lambda m: 1) "
                "for one module type), or a module mixes the samples of a batch (register a rule for it)")
