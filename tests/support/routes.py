"""Which route of gradalign.engine.representations each parameter takes: PERSAMPLE_ROUTES names one
parameter per route, route_labels reads the route off what a rule returned, recording_engine
records what the rules return."""
import dataclasses
from collections import defaultdict

from torch import nn

from gradalign.engine import PerSampleGradients, Rule, default_registry
from gradalign.engine.representations import Factored


# One parameter per route of gradalign.engine.representations: label -> (architecture, B, parameter).
PERSAMPLE_ROUTES = {
    "2-D, Gram route": ("seed_mlp", 64, "2.weight"),
    "2-D, from S": ("seed_mlp", 64, "4.weight"),
    "2-D, weighted sum scales d": ("seed_mlp", 64, "4.weight"),
    "2-D, weighted sum scales a": ("seed_mlp", 64, "0.weight"),
    "T = 1, G > 1, Gram route": ("single_position_groups", 7, "c2d.weight"),
    "T = 1, G > 1, from S": ("single_position_groups", 64, "c2d.weight"),
    "T > 1, ghost, G = 1": ("sequence", 7, "mix.weight"),
    "T > 1, ghost, G > 1": ("conv2d_bn_eval", 7, "c2.weight"),
    "T > 1, materialised, G = 1": ("shared_embedding_tokens", 7, "narrow.weight"),
    "T > 1, Gram from formed gradients, G = 1": ("many_positions", 7, "inp.weight"),
    "T > 1, Gram from formed gradients, G > 1": ("many_positions", 7, "conv.weight"),
    "T > 1, cosines from formed chunks, G = 1": ("many_positions", 64, "inp.weight"),
    "T > 1, cosines from formed chunks, G > 1": ("many_positions", 64, "conv.weight"),
    "Dense": ("conv1d", 7, "c2.weight"),  # a conv where the ghost route costs more: one grouped weight-gradient call
    "Factored merged": ("shared_bn_fallback", 7, "shared.weight"),
    "IndexedRows": ("sequence", 7, "embed.weight"),
    "IndexedRows merged": ("shared_embedding_tokens", 7, "embed.weight"),
    "Dense merged": ("shared_embedding_tokens", 7, "norm.weight"),
    "FactoredBias merged": ("shared_bn_fallback", 7, "shared.bias"),
}


def route_labels(calls: list) -> set[str]:
    """The PERSAMPLE_ROUTES labels that one parameter's per-sample gradients take, given what
    the rule returned for each call of its module."""
    labels = {f"{type(calls[0]).__name__} merged"} if len(calls) > 1 else set()
    grads = calls[0]
    for other in calls[1:]:
        grads = grads.merge(other)
    if not isinstance(grads, Factored):
        return labels | {type(grads).__name__}
    _, G, T, n_in = grads.A.shape
    n_out = grads.D.shape[3]
    if T > 1:
        route = "ghost" if grads.ghost_is_cheaper() else "materialised"
        labels.add(f"T > 1, {route}, G {'= 1' if G == 1 else '> 1'}")
        cosines = {"gram": "Gram from formed gradients", "materialise": "cosines from formed chunks"}
        if (route := grads.cosine_route(have_sum=False)) in cosines:
            labels.add(f"T > 1, {cosines[route]}, G {'= 1' if G == 1 else '> 1'}")
        return labels
    kind = "2-D" if G == 1 else "T = 1, G > 1"
    labels.add(f"{kind}, {'Gram route' if grads.uses_gram() else 'from S'}")
    if G == 1:
        labels.add(f"2-D, weighted sum scales {'d' if n_out <= n_in else 'a'}")
    return labels


def recording_engine(model: nn.Module) -> tuple[PerSampleGradients, dict[str, list]]:
    """An engine whose rules also record what they return: {parameter name: [per call]},
    filled by each backward (for checking which route a parameter takes)."""
    record = defaultdict(list)
    registry = default_registry()
    paths = {id(m): path for path, m in model.named_modules()}

    def recording(rule: Rule) -> Rule:
        def compute(module, args, grad_output):
            out = rule.compute(module, args, grad_output)
            for local, grads in out.items():
                record[f"{paths[id(module)]}.{local}".lstrip(".")].append(grads)
            return out
        return dataclasses.replace(rule, compute=compute)  # every other field of the rule kept

    for module_type in {type(m) for m in model.modules()}:
        rule = registry.rule_for(next(m for m in model.modules() if type(m) is module_type))
        if rule is not None:
            registry.register(module_type, recording(rule))
    return PerSampleGradients(model, registry=registry), record
