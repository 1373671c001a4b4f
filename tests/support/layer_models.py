"""Models for the tests of the Conv3d / ConvTranspose rules, LoRA adapters and mixed precision:
each entry of LAYER_ARCHITECTURES returns (model, make_batch, loss_fn) as engine_models does."""
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.engine_models import classification_batch, cross_entropy


class Conv3dNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv3d(4, 3, 2, padding="same", padding_mode="replicate", bias=False)
        self.head = nn.Linear(3, classes)

    def forward(self, x):  # (B, 2, 4, 6, 5)
        h = torch.tanh(self.c2(F.relu(self.gn(self.c1(x)))))
        return self.head(h.mean(dim=(2, 3, 4)))


class ConvTranspose1dNet(nn.Module):
    """stride + output_padding; then dilation with output_padding >= stride (extra positions)."""

    def __init__(self, classes=3):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose1d(4, 6, 3, padding=2, output_padding=1, dilation=2, groups=2)
        self.head = nn.Linear(6 * 11, classes)

    def forward(self, x):  # (B, 3, 5) -> (B, 4, 10) -> (B, 6, 11)
        return self.head(torch.tanh(self.up2(F.relu(self.up1(x)))).flatten(1))


class ConvTranspose2dNet(nn.Module):
    """groups, per-dimension stride, padding, dilation, and an output_size given at the call."""

    def __init__(self, classes=3):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # (B, 4, 3, 4) -> (B, 6, 6, 6)
        h = self.up(x, output_size=[6, 6])
        return self.head(F.relu(h).mean(dim=(2, 3)))


class ConvTranspose3dNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.up = nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False)
        self.down = nn.Conv3d(3, 2, 3, stride=2)
        self.head = nn.Linear(2, classes)

    def forward(self, x):  # (B, 2, 2, 3, 2) -> (B, 3, 4, 6, 4) -> (B, 2, 1, 2, 1)
        return self.head(self.down(F.relu(self.up(x))).flatten(2).mean(-1))


class LoRALinear(nn.Module):
    """A LoRA-style adapter: a frozen base Linear plus trainable low-rank A (in -> r) and
    B (r -> out), output base(x) + B(A(x)) * alpha / r. B starts non-zero by default so that A
    has a gradient in the test; `zero_B` starts it at zero as LoRA does, so that A's output
    gradient is all zero (every sample's gradient of A is 0)."""

    def __init__(self, d_in, d_out, r=2, alpha=4.0, *, zero_B=False):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        if zero_B:
            nn.init.zeros_(self.B.weight)
        else:
            nn.init.normal_(self.B.weight, std=0.5)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.B(self.A(x)) * self.scale


class LoRANet(nn.Module):
    """LoRA on a token model ((B, T, d) inputs) and on the head; `zero_B`: both adapters as at
    LoRA's initialisation (B = 0: two layers whose output gradients are all zero)."""

    def __init__(self, d=12, classes=3, *, zero_B=False):
        super().__init__()
        self.mix = LoRALinear(d, d, r=3, zero_B=zero_B)
        self.norm = nn.LayerNorm(d)
        self.head = LoRALinear(d, classes, r=2, zero_B=zero_B)

    def forward(self, x):  # (B, T, d)
        return self.head(self.norm(torch.relu(self.mix(x))).mean(1))


LAYER_ARCHITECTURES = {
    "conv3d": lambda: (Conv3dNet(), classification_batch(2, 4, 6, 5, classes=3), cross_entropy),
    "conv_transpose1d": lambda: (ConvTranspose1dNet(), classification_batch(3, 5, classes=3), cross_entropy),
    "conv_transpose2d": lambda: (ConvTranspose2dNet(), classification_batch(4, 3, 4, classes=3), cross_entropy),
    "conv_transpose3d": lambda: (ConvTranspose3dNet(), classification_batch(2, 2, 3, 2, classes=3), cross_entropy),
    "lora": lambda: (LoRANet(), classification_batch(5, 12, classes=3), cross_entropy),
    "lora_init": lambda: (LoRANet(zero_B=True), classification_batch(5, 12, classes=3), cross_entropy),
}
