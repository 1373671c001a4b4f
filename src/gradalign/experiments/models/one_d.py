"""Small classifiers for 1-D inputs such as mnist1d (x of shape (B, input_dim), logits (B,
num_classes)): MLP (the seeds' 40-256-256-10 at the defaults), ResMLP, Conv1dNet. Each exposes
``.head`` and ``module_groups()`` ("head"; "last_stage": the last hidden Linear + the head); no
BatchNorm (per-sample gradients would be undefined) and no in-place activations."""
from __future__ import annotations

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

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return {"head": [self.head], "last_stage": [self.body[2], self.head]}


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

    def module_groups(self) -> dict[str, list[nn.Module]]:
        last_hidden = self.blocks[-1].branch[3] if len(self.blocks) else self.stem
        return {"head": [self.head], "last_stage": [last_hidden, self.head]}


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

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return {"head": [self.head], "last_stage": [self.features[-2], self.head]}
