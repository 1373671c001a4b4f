"""Small classifiers for 1-D signals such as mnist1d (inputs (B, 40)).

Every model exposes ``.head``, its final ``nn.Linear`` (the layer GWA monitors and GVR
penalises), takes ``x`` of shape (B, input_dim) and returns logits (B, num_classes). No
BatchNorm (per-sample gradients would be undefined) and no in-place activations.

Example:
    >>> model = build_model("mlp")           # the seed MLP 40-256-256-10, 78,858 parameters
    >>> model(torch.randn(8, 40)).shape
    torch.Size([8, 10])
"""
from __future__ import annotations

import inspect

from torch import Tensor, nn

from gradalign.errors import ConfigError


class MLP(nn.Module):
    """input_dim - hidden - hidden - num_classes with ReLU (the seeds' MLP at the defaults)."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))                               # (B, D) -> (B, C)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: h + W2 relu(W1 norm(h)), norm a LayerNorm or the identity."""

    def __init__(self, width: int, layer_norm: bool):
        super().__init__()
        self.branch = nn.Sequential(nn.LayerNorm(width) if layer_norm else nn.Identity(),
                                    nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.branch(h)


class ResMLP(nn.Module):
    """Linear(input_dim, hidden), ``blocks`` residual blocks, ReLU, then the head."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int, *, blocks: int = 2,
                 layer_norm: bool = True):
        super().__init__()
        self.stem = nn.Linear(input_dim, hidden)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden, layer_norm) for _ in range(blocks)))
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.blocks(self.stem(x))))           # (B, D) -> (B, H) -> (B, C)


class Conv1dNet(nn.Module):
    """Conv1d(1, c, 5, pad 2)-GroupNorm-ReLU, Conv1d(c, c, 3, stride 2, pad 1)-GroupNorm-ReLU,
    flatten (c * ceil(L / 2)), Linear(., hidden)-ReLU, head."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int, *, channels: int = 32,
                 groups: int = 8):
        super().__init__()
        if channels % groups:
            raise ConfigError(f"conv1d: channels ({channels}) must be divisible by groups ({groups})")
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2), nn.GroupNorm(groups, channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * ((input_dim + 1) // 2), hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)))             # (B, L) -> (B, 1, L) -> (B, C)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "resmlp": ResMLP, "conv1d": Conv1dNet}
_MIN_SIZE = {"input_dim": 1, "num_classes": 1, "hidden": 1, "blocks": 0, "channels": 1, "groups": 1}


def build_model(kind: str, input_dim: int = 40, num_classes: int = 10, hidden: int = 256,
                **kw) -> nn.Module:
    """Build a classifier by name.

    Args:
        kind: "mlp" (input_dim-hidden-hidden-num_classes, ReLU; 78,858 parameters at the
            defaults), "resmlp" (options ``blocks=2``, ``layer_norm=True``) or "conv1d"
            (options ``channels=32``, ``groups=8`` for GroupNorm).
        input_dim, num_classes, hidden: positive sizes; ``hidden`` is the head's input width.
            Sizes must be ints (``blocks`` may be 0).
        **kw: the kind-specific options above.

    Raises:
        ConfigError: an unknown kind (the message lists the valid ones), an option the kind
            does not take, or a size that is not a positive int.
    """
    if kind not in MODELS:
        raise ConfigError(f"unknown model kind {kind!r}; valid kinds: {', '.join(MODELS)}")
    cls = MODELS[kind]
    options = [p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ConfigError(f"model kind {kind!r} does not take {', '.join(unknown)}; "
                          f"its options: {', '.join(options) or 'none'}")
    sizes = {"input_dim": input_dim, "num_classes": num_classes, "hidden": hidden, **kw}
    for name, value in sizes.items():
        low = _MIN_SIZE.get(name)
        if low is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{name} must be an int >= {low}; got {value!r}")
    return cls(input_dim, num_classes, hidden, **kw)
