"""Image classifiers for 32x32 inputs (CIFAR): the seeds' own models.

Every model takes x (B, 3, 32, 32) float, returns logits (B, num_classes), exposes ``.head``
(its final nn.Linear, read by GWA) and ``module_groups()`` (the modules GVR's ``gvr_layers``
names: "head", and "last_stage" = the last stage + the head, the authors' conv5_x + fc).
``channels_last`` says whether the model is a convnet that runs faster in that memory format.

    ResNet18    the GVR repository's CIFAR ResNet-18 (src/models.py there): 3x3 stem without
                max-pool, BasicBlocks [2, 2, 2, 2] at widths 64-128-256-512, BatchNorm, global
                average pooling, fc. 11,220,132 parameters for 100 classes; the last stage + fc
                hold 8,445,028 of them (8.39M + 51,300). PyTorch's default initialisation, as there.
    ViT         the GWA paper's "ViT/CIFAR-4" (hlzl/gwa conf/arch/vit_cifar.yaml, itself after
                kentaroy47/vision-transformers-cifar10): patches 4x4, width 512, depth 6, MLP 512,
                8 heads, fixed 2-D sin-cos position embedding, pre-LayerNorm blocks, final
                LayerNorm, global average pooling, zero-initialised head (big_vision's ViT,
                which their src/networks/vit.py follows). 9,499,146 parameters for 10 classes.
    ConvNeXt    the GWA paper's "ConvNeXt Pico" (hlzl/gwa conf/arch/convnext_pico.yaml): a
                ConvNeXt-V2 with depths [2, 2, 6, 2], dims [64, 128, 256, 512] and a 1x1 stride-1
                stem ("downsample: 1 for images <= 32px"), so stages run at 32, 16, 8, 4 pixels;
                blocks: 3x3 depthwise conv, LayerNorm, 4x MLP with GELU and global response
                normalisation (GRN), no layer scale or drop path; trunc-normal(0.02) weights.
                8,437,706 parameters for 10 classes.

Every size is an option (``width``, ``depth``, ``dims``...), so ``--quick`` configs run the
same architectures narrow. GELU is the tanh approximation (flax's default, which the GWA
authors' JAX models use). This is our code, written from the descriptions above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the shortcut (1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: stem conv3x3(3, w), stages of BasicBlocks at w, 2w, 4w, 8w (strides 1, 2, 2, 2)."""

    channels_last = True

    def __init__(self, num_classes: int, *, width: int = 64, blocks: tuple = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages.append(nn.Sequential(*(BasicBlock(cin if k == 0 else cout, cout, 2 if i and k == 0 else 1)
                                          for k in range(n))))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))                    # (B, 8w, 4, 4)
        return self.head(h.mean(dim=(2, 3)))             # global average pool -> (B, 8w) -> (B, C)

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return {"head": [self.head], "last_stage": [self.stages[-1], self.head]}


# ---------------------------------------------------------------- ViT

def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> Tensor:
    """(h * w, width) fixed position embedding: sin and cos of x, then of y, at width/4 frequencies."""
    if width % 4:
        raise ValueError(f"the sin-cos position embedding needs width divisible by 4, got {width}")
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega        # (h*w, width/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_dim, width))
        with torch.no_grad():                            # xavier-uniform kernels (q, k, v each), as big_vision
            for w in (*self.qkv.weight.chunk(3, dim=0), self.proj.weight, self.mlp[0].weight, self.mlp[2].weight):
                nn.init.xavier_uniform_(w)
            for b in (self.qkv.bias, self.proj.bias):
                b.zero_()
            for b in (self.mlp[0].bias, self.mlp[2].bias):
                b.normal_(std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)                             # (B, heads, T, D/heads)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, sin-cos positions, `depth` encoder blocks, LayerNorm, mean over tokens, head."""

    channels_last = False

    def __init__(self, num_classes: int, *, image_size: int = 32, patch: int = 4, width: int = 512, depth: int = 6,
                 mlp_dim: int = 512, heads: int = 8, head_zero_init: bool = True):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
        grid = image_size // patch
        self.embed = nn.Conv2d(3, width, patch, stride=patch)
        nn.init.trunc_normal_(self.embed.weight, std=1 / math.sqrt(3 * patch * patch))   # lecun normal
        nn.init.zeros_(self.embed.bias)
        self.register_buffer("pos", sincos_2d(grid, grid, width), persistent=False)
        self.blocks = nn.Sequential(*(EncoderBlock(width, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        if head_zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)   # (B, T, D)
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))              # (B, D) -> (B, C)

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return {"head": [self.head], "last_stage": [self.blocks[-1], self.norm, self.head]}


# ---------------------------------------------------------------- ConvNeXt-V2

class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response normalisation on (B, H, W, C): x + gamma * (x * N(x)) + beta, with
    N(x)_c = |x_c|_2 over the positions / its mean over channels (gamma = beta = 0 at init)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)                # (B, 1, 1, C)
        return x + self.gamma * (x * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta


class ConvNeXtBlock(nn.Module):
    """x + pw2(GRN(GELU(pw1(LN(dwconv(x)))))), the MLP 4x wide."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1, self.act, self.grn, self.pw2 = nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), \
            GRN(4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)                                    # (B, H, W, C)
        h = self.pw2(self.grn(self.act(self.pw1(self.norm(h)))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt-V2: stem (stem x stem conv, stride stem) + LN, stages with 2x2 stride-2 downsampling
    between them, mean over positions, LayerNorm, head."""

    channels_last = True

    def __init__(self, num_classes: int, *, depths: tuple = (2, 2, 6, 2), dims: tuple = (64, 128, 256, 512),
                 stem: int = 1):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths and dims must have the same length, got {list(depths)} and {list(dims)}")
        kernel = 3 if stem <= 2 else 5                   # the authors' choice for small inputs
        self.downsample = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], stem, stride=stem, bias=False), ChannelNorm(dims[0]))]
            + [nn.Sequential(ChannelNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
               for i in range(1, len(dims))])
        self.stages = nn.ModuleList(nn.Sequential(*(ConvNeXtBlock(d, kernel) for _ in range(n)))
                                    for n, d in zip(depths, dims))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))                           # (B, C_last) -> (B, classes)

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return {"head": [self.head], "last_stage": [self.stages[-1], self.norm, self.head]}


VISION_MODELS: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "vit": ViT, "convnext": ConvNeXt}
