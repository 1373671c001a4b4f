"""One walk over a model: which modules the engine serves with which rule, and every problem.

`ga.validate(model)` returns the problems without hooking anything (what Opacus users know
as ModuleValidator); `PerSampleGradients` runs the same walk and refuses the model with all
of them at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gradalign.engine.rules import Rule, RuleRegistry, default_registry


@dataclass
class Served:
    """A module with trainable parameters of its own, and the rule that serves it."""

    path: str
    module: nn.Module
    rule: Rule
    param_names: dict[str, str]  # local name ("weight", or "child.weight" for a child the rule owns) -> full name
    shared: bool = False  # declared to be called on inputs shared by all samples (RuleRegistry.register_shared)


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
        if not own:
            continue
        where = f"{path or '<model>'} ({type(module).__name__})"
        reason = "no rule for this module type" if rule is None else rule.reason(module)
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        served.append(Served(path, module, rule, {local: full_names[id(p)] for local, p in own.items()}, path in shared))
    return served, problems


def validate(model: nn.Module, *, registry: RuleRegistry | None = None) -> list[str]:
    """Every reason the engine would refuse `model`, one line per module; [] when it is supported.

    Example:
        problems = ga.validate(model)
        assert not problems, "\\n".join(problems)
    """
    return survey(model, registry if registry is not None else default_registry())[1]
