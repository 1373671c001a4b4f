"""The per-sample clipping step of each library compared by compare.py, on its own copy of a model.

Every method runs one whole step: clear what the previous step left, forward, the per-sample
clipped backward, and leaves (1/B) sum_i min(1, C / |g_i|) g_i where `gradient()` reads it (p.grad
unless said otherwise). Each library is used as its documentation shows, with noise 0:

  plain         forward, mean loss, backward (the unit of the ratios; not clipped)
  gradalign     ga.PerSampleGradients(model).backward(losses, weights=w, release=True)
  gradalign_low the same with memory="low" (norms reduced in the backward, p.grad from a second backward)
  vmap          torch.func vmap(grad) per-sample gradients, their norms, p.grad = (1/B) sum_i w_i g_i
  opacus        Opacus GradSampleModule (hooks, grad_sample) and DPOptimizer.pre_step (clip, noise 0,
                divide by B)
  opacus_ghost  Opacus GradSampleModuleFastGradientClipping(use_ghost_clipping=True), the two
                backwards of DPTensorFastGradientClipping.backward(), DPOptimizerFastGradientClipping
                .pre_step (noise 0, divide by B): what PrivacyEngine(grad_sample_mode="ghost") builds
  fastdp        FastDP's PrivacyEngine (book-keeping, clipping_mode="MixOpt", clipping_fn="Abadi",
                all-layer), the gradient what its optimizer step makes of param.private_grad; the
                'origin parameters' of ghost differentiation are the model's first layer (ORIGIN),
                and a Hugging Face model is handed over itself, as FastDP's examples do

Opacus and FastDP clip with C / (|g_i| + 1e-6), a relative change of 1e-6 / |g_i|, far below the
check's tolerance at the clip thresholds used (the median norm, about 1 and above).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import importlib.util
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import gradalign as ga
from benchmarks.clip_check import clip_factors, norms_of, per_sample_gradients
from benchmarks.models import per_sample_losses

LABELS = {"plain": "plain step", "gradalign": "gradalign clip", "gradalign_low": "gradalign clip, memory=\"low\"",
          "vmap": "torch.func vmap",
          "opacus": "Opacus hooks", "opacus_ghost": "Opacus ghost clipping", "fastdp": "FastDP (book-keeping)"}
# FastDP's ghost differentiation: only these parameters (substrings of the names, as FastDP matches
# them) keep requires_grad; the others' clipped gradients come from its hooks alone.
ORIGIN = {"wide_mlp": ["0.weight", "0.bias"], "transformer": ["embed.weight", "position.weight"],
          "gpt2_d256": ["wte", "wpe"], "gpt2": ["wte", "wpe"]}


class Refused(Exception):
    """A library declined the model when it was set up (its own validation, or an unsupported layer)."""


class NotInstalled(Exception):
    """The library is not importable here; the message says how to install it."""


@dataclass
class Method:
    """step(): one clipped step; gradient(): {name in the given model: the clipped mean gradient
    or None}; clear(): frees what a step leaves (gradients, per-sample buffers), as the next step
    would; remark: how the library changed the model, if it did; changed: then (an unwrapped copy
    of the changed model, the gradients under its names), to check the method on what it ran."""
    step: Callable[[], None]
    gradient: Callable[[], dict[str, Tensor | None]]
    clear: Callable[[], None]
    remark: str | None = None
    changed: tuple[nn.Module, Callable[[], dict[str, Tensor | None]]] | None = None


def grads_of(params: dict[str, nn.Parameter]) -> Callable[[], dict[str, Tensor | None]]:
    return lambda: {n: p.grad for n, p in params.items()}


def none_grads(params: dict[str, nn.Parameter]) -> Callable[[], None]:
    def clear():
        for p in params.values():
            p.grad = None
    return clear


def plain(kind, model, x, y, clip) -> Method:
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())

    def step():
        net.zero_grad(set_to_none=True)
        per_sample_losses(kind, net(x), y).mean().backward()
    return Method(step, grads_of(params), none_grads(params))


def gradalign(kind, model, x, y, clip, memory: str = "default") -> Method:
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())
    engine = ga.PerSampleGradients(net)

    def weights(stats):  # w_i = min(1, C / |g_i|)
        return (clip / stats.norms).clamp(max=1.0)

    def step():
        net.zero_grad(set_to_none=True)
        engine.backward(per_sample_losses(kind, net(x), y), weights=weights, release=True, memory=memory)
    return Method(step, grads_of(params), none_grads(params))


def gradalign_low(kind, model, x, y, clip) -> Method:
    return gradalign(kind, model, x, y, clip, memory="low")


def vmap(kind, model, x, y, clip) -> Method:
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())

    def loss(out, targets):
        return per_sample_losses(kind, out, targets)

    def step():
        grads = per_sample_gradients(net, loss, x, y)  # {name: (B, *shape)}
        w = clip_factors(norms_of(grads), clip)
        for name, p in params.items():
            p.grad = torch.tensordot(w, grads[name], dims=1) / x.shape[0]
    return Method(step, grads_of(params), none_grads(params))


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise NotInstalled(f"{module} is not installed (pip install -c <(echo torch==$(python -c "
                           f"'import torch; print(torch.__version__)')) {module}, or make install-compare)")


@contextlib.contextmanager
def refusals():
    """Errors while a library sets itself up are refusals of the model."""
    try:
        yield
    except Exception as err:
        raise Refused(f"{type(err).__name__}: {err}") from err


def opacus_model(model: nn.Module) -> tuple[nn.Module, dict]:
    """Opacus's own preparation: ModuleValidator.fix where ModuleValidator.validate objects (it
    swaps DPMultiheadAttention, with separate q, k, v nn.Linear, for nn.MultiheadAttention).
    Returns the model to wrap and Method's gradient (under the given model's names), remark and
    changed (an unwrapped copy of the fixed model, and the gradients under its own names)."""
    from opacus.validators import ModuleValidator
    net = copy.deepcopy(model)
    with refusals():
        errors = ModuleValidator.validate(net, strict=False)
        if errors:
            net = ModuleValidator.fix(net)
    params = dict(net.named_parameters())

    def own():
        return {n: p.grad for n, p in params.items()}

    def gradient():
        grads = own()
        for name in model.state_dict():  # nn.MultiheadAttention's in_proj from DPMultiheadAttention's q, k, v
            prefix, _, leaf = name.rpartition("in_proj_")
            if leaf in ("weight", "bias") and name not in grads:
                parts = [grads.get(f"{prefix}{q}linear.{leaf}") for q in "qkv"]
                grads[name] = None if any(g is None for g in parts) else torch.cat(parts)
        return grads
    if not errors:
        return net, {"gradient": gradient}
    fixed = collections.Counter(type(m).__name__ for m in model.modules() if type(m) in ModuleValidator.FIXERS)
    made = {type(m).__name__ for m in net.modules()} - {type(m).__name__ for m in model.modules()}
    remark = f"ModuleValidator.fix replaced {', '.join(f'{n} {t}' for t, n in fixed.items())} by {', '.join(made)}"
    return net, {"gradient": gradient, "remark": remark, "changed": (copy.deepcopy(net), own)}


def opacus(kind, model, x, y, clip) -> Method:
    need("opacus")
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    net, prepared = opacus_model(model)
    with refusals():
        wrapped = GradSampleModule(net, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0,
                                max_grad_norm=clip, expected_batch_size=x.shape[0], loss_reduction="mean")

    def step():
        optimizer.zero_grad(set_to_none=True)  # also p.grad_sample, p.summed_grad
        per_sample_losses(kind, wrapped(x), y).mean().backward()
        optimizer.pre_step()
    return Method(step, clear=lambda: optimizer.zero_grad(set_to_none=True), **prepared)


def opacus_ghost(kind, model, x, y, clip) -> Method:
    need("opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    net, prepared = opacus_model(model)
    with refusals():
        wrapped = GradSampleModuleFastGradientClipping(net, max_grad_norm=clip, use_ghost_clipping=True,
                                                       loss_reduction="mean")
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
            expected_batch_size=x.shape[0], loss_reduction="mean")

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = per_sample_losses(kind, wrapped(x), y)
        DPTensorFastGradientClipping(wrapped, optimizer, losses, "mean").backward()  # norms, then sum_i w_i l_i
        optimizer.pre_step()
    return Method(step, clear=lambda: optimizer.zero_grad(set_to_none=True), **prepared)


def import_fastdp(path: str | None):
    """FastDP's PrivacyEngine from a source checkout at `path` (the folder holding fastDP/)."""
    if not path:
        raise NotInstalled("FastDP needs a source checkout: --fastdp PATH (git clone "
                           "https://github.com/awslabs/fast-differential-privacy; PATH its root)")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        from fastDP import PrivacyEngine
    except Exception as err:
        raise NotInstalled(f"FastDP at {path} does not import: {type(err).__name__}: {err}") from err
    return PrivacyEngine


def fastdp(kind, model, x, y, clip, path: str | None = None) -> Method:
    engine_class = import_fastdp(path)
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())
    with refusals(), contextlib.redirect_stdout(io.StringIO()):  # it prints its set-up
        engine = engine_class(getattr(net, "lm", net), batch_size=x.shape[0], sample_size=50 * x.shape[0], epochs=1,
                              noise_multiplier=0.0, max_grad_norm=clip, clipping_fn="Abadi", clipping_mode="MixOpt",
                              clipping_style="all-layer", loss_reduction="mean", origin_params=ORIGIN.get(kind))

    def step():
        net.zero_grad(set_to_none=True)
        per_sample_losses(kind, net(x), y).mean().backward()
        net.zero_grad(set_to_none=True)  # what its optimizer step does: no non-private gradient remains
        with contextlib.redirect_stdout(io.StringIO()):  # it names the parameters it does not support
            engine._create_noisy_clipped_gradient()  # p.grad = private_grad / B (noise 0)
        engine.unlock()
    return Method(step, grads_of(params), none_grads(params))


BUILDERS = {"plain": plain, "gradalign": gradalign, "gradalign_low": gradalign_low, "vmap": vmap, "opacus": opacus,
            "opacus_ghost": opacus_ghost, "fastdp": fastdp}


def build(name: str, kind: str, model: nn.Module, x: Tensor, y: Tensor, clip: float,
          fastdp_path: str | None = None) -> Method:
    """Method `name` of BUILDERS on its own copy of `model`. Raises NotInstalled or Refused."""
    if name == "fastdp":
        return fastdp(kind, model, x, y, clip, path=fastdp_path)
    return BUILDERS[name](kind, model, x, y, clip)
