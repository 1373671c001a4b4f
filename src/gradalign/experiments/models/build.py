"""Classifiers by name: the 1-D models of one_d.py for mnist1d (inputs (B, 40)), and the image
models of vision.py (resnet18, vit, convnext) for CIFAR.

Every model exposes ``.head``, its final ``nn.Linear`` (the layer GWA monitors and GVR
penalises), and ``module_groups()``: named lists of modules for GVR's ``gvr_layers``
("head", and "last_stage": the last hidden Linear + the head for the 1-D models). The 1-D
models take ``x`` of shape (B, input_dim) and return logits (B, num_classes); they have no
BatchNorm (per-sample gradients would be undefined) and no in-place activations.

Example:
    >>> model = build_model("mlp")           # the seed MLP 40-256-256-10, 78,858 parameters
    >>> model(torch.randn(8, 40)).shape
    torch.Size([8, 10])
"""
from __future__ import annotations

import inspect

from torch import nn

from gradalign.errors import ConfigError
from gradalign.experiments.models.one_d import MLP, Conv1dNet, ResMLP
from gradalign.experiments.models.vision import VISION_MODELS


MODELS_1D: dict[str, type[nn.Module]] = {"mlp": MLP, "resmlp": ResMLP, "conv1d": Conv1dNet}
MODELS: dict[str, type[nn.Module]] = {**MODELS_1D, **VISION_MODELS}
_MIN_SIZE = {"input_dim": 1, "num_classes": 1, "hidden": 1, "blocks": 0, "channels": 1, "groups": 1}


def build_model(kind: str, input_dim: int = 40, num_classes: int = 10, hidden: int = 256,
                **kw) -> nn.Module:
    """Build a classifier by name.

    Args:
        kind: "mlp" (input_dim-hidden-hidden-num_classes, ReLU; 78,858 parameters at the
            defaults), "resmlp" (options ``blocks=2``, ``layer_norm=True``), "conv1d"
            (options ``channels=32``, ``groups=8`` for GroupNorm), or an image model:
            "resnet18" (``width=64``, ``blocks=[2, 2, 2, 2]``), "vit" (``patch=4``, ``width=512``,
            ``depth=6``, ``mlp_dim=512``, ``heads=8``, ``head_zero_init=true``) or "convnext"
            (``depths=[2, 2, 6, 2]``, ``dims=[64, 128, 256, 512]``, ``stem=1``); see vision.py.
        input_dim, num_classes, hidden: positive sizes; ``hidden`` is the 1-D models' head input
            width (image models take their sizes from the options; input_dim and hidden are
            not theirs). Sizes must be ints (``blocks`` may be 0).
        **kw: the kind-specific options above.

    Raises:
        ConfigError: an unknown kind (the message lists the valid ones), an option the kind
            does not take, or a size that is not a positive int.
    """
    if kind not in MODELS:
        raise ConfigError(f"unknown model kind {kind!r}; valid kinds: {', '.join(MODELS)}")
    cls = MODELS[kind]
    params = {p.name: p for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise ConfigError(f"model kind {kind!r} does not take {', '.join(unknown)}; "
                          f"its options: {', '.join(params) or 'none'}")
    if kind in VISION_MODELS:
        return _build_vision(kind, cls, num_classes, params, kw)
    sizes = {"input_dim": input_dim, "num_classes": num_classes, "hidden": hidden, **kw}
    for name, value in sizes.items():
        low = _MIN_SIZE.get(name)
        if low is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{name} must be an int >= {low}; got {value!r}")
    return cls(input_dim, num_classes, hidden, **kw)


def _build_vision(kind: str, cls, num_classes: int, params: dict, kw: dict) -> nn.Module:
    """An image model; each option must have the type of its default (int >= 1, bool, list of ints >= 1)."""
    def _pos_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    options = {}
    for name, value in kw.items():
        default = params[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_pos_int(v) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = _pos_int(value)
        if not ok:
            expected = "true or false" if isinstance(default, bool) else \
                "a non-empty list of ints >= 1" if isinstance(default, tuple) else "an int >= 1"
            raise ConfigError(f"model kind {kind!r} option {name} must be {expected}; got {value!r}")
        options[name] = value
    if not _pos_int(num_classes):
        raise ConfigError(f"num_classes must be an int >= 1; got {num_classes!r}")
    try:
        return cls(num_classes, **options)
    except ValueError as e:
        raise ConfigError(f"model kind {kind!r}: {e}") from None
