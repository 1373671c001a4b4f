"""The per-layer rules, one explicit registry keyed by module type.

A rule turns what the engine captured for one call of a module (its positional inputs and
the gradient of the summed losses w.r.t. its output) into per-sample gradients of the
module's own trainable parameters: {local parameter name: Factored | IndexedRows | Dense}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from gradalign.engine.rules.conv import conv_rule
from gradalign.engine.rules.conv_transpose import conv_transpose_rule
from gradalign.engine.rules.embedding import embedding_check, embedding_rule
from gradalign.engine.rules.fallback import fallback_check_call, fallback_rule
from gradalign.engine.rules.linear import linear_rule
from gradalign.engine.rules.norm import batch_norm_check, batch_norm_rule, group_norm_rule, layer_norm_rule


@dataclass(frozen=True)
class Rule:
    """compute(module, args, grad_output) -> {name: per-sample grad}.

    check(module) -> reason string when the module, as configured now, is unsupported.
    check_call(module, args, kwargs, output) -> reason when one particular call is unsupported.
    """

    compute: Callable[[nn.Module, tuple, Tensor], dict]
    check: Callable[[nn.Module], str | None] | None = None
    check_call: Callable[[nn.Module, tuple, dict, object], str | None] | None = None

    def reason(self, module: nn.Module) -> str | None:
        return self.check(module) if self.check else None


class RuleRegistry:
    """Maps module types to rules; the most specific registered base class wins."""

    def __init__(self, rules: dict[type, Rule] | None = None, fallback: Rule | None = None):
        self._rules: dict[type, Rule] = dict(rules or {})
        self.fallback = fallback

    def register(self, module_type: type, rule: Rule) -> None:
        self._rules[module_type] = rule

    def rule_for(self, module: nn.Module) -> Rule | None:
        for cls in type(module).__mro__:
            if cls in self._rules:
                return self._rules[cls]
        return self.fallback


def default_registry() -> RuleRegistry:
    """A fresh registry with every built-in rule and the torch.func fallback."""
    conv, conv_transpose = Rule(conv_rule), Rule(conv_transpose_rule)
    norm_check = Rule(batch_norm_rule, check=batch_norm_check)
    return RuleRegistry(
        {
            nn.Linear: Rule(linear_rule),
            nn.Conv1d: conv,
            nn.Conv2d: conv,
            nn.Conv3d: conv,
            nn.ConvTranspose1d: conv_transpose,
            nn.ConvTranspose2d: conv_transpose,
            nn.ConvTranspose3d: conv_transpose,
            nn.LayerNorm: Rule(layer_norm_rule),
            nn.GroupNorm: Rule(group_norm_rule),
            nn.modules.batchnorm._BatchNorm: norm_check,
            nn.Embedding: Rule(embedding_rule, check=embedding_check),
        },
        fallback=Rule(fallback_rule, check_call=fallback_check_call),
    )


__all__ = ["Rule", "RuleRegistry", "default_registry"]
