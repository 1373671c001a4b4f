"""Model inputs from stored samples: evaluation inputs and random training views, batched in torch.

A pipeline has two methods, both on whole batches on the data's device:

    pipeline.prepare(x)             the model's input for evaluation (no randomness)
    pipeline.view(x, generator)     one random training view; each call draws afresh, so two
                                    calls give the two independent views of GVR's arms

Pipeline1d (mnist1d): prepare is the identity, view is mnist1d.augment (shift, scale, noise).

ImagePipeline (CIFAR, uint8 (B, 3, 32, 32) in): in this order, each drawn per image,
    1. random crop: zero-pad ``crop_padding`` pixels on every side, crop back to the image
       size at a uniform offset (torchvision's RandomCrop(32, padding=4));
    2. horizontal flip with probability 1/2;
    3. scale to [0, 1] and normalise per channel, (x - mean) / std;
    4. Cutout: with probability ``cutout_p``, a ``cutout`` x ``cutout`` square set to 0 AFTER
       normalisation, its top-left corner uniform in [-cutout/2, size - cutout/2) on each axis
       and clipped to the image (as the GVR repository's Cutout does).
``cutout = 0`` or ``crop_padding = 0`` or ``flip = false`` turn a step off. prepare does
step 3 only. With ``channels_last`` the result is in that memory format (convnets on a GPU).

Randomness: the draws come from a CPU torch.Generator (its state is what checkpoints save)
and are moved to the data's device, a few numbers per image, so a run gives the same
views on any device. No torchvision, no PIL, no DataLoader: the whole data set stays on the
training device as uint8 and every batch is transformed there.

Normalisation constants: "dataset" uses the GVR repository's per-channel mean and std
(CIFAR-10: 0.4914 0.4822 0.4465 / 0.2023 0.1994 0.2010; CIFAR-100: 0.5071 0.4867 0.4408 /
0.2675 0.2565 0.2761); "symmetric" maps [0, 1] to [-1, 1] (mean = std = 0.5), the value range
the GWA authors' input pipeline uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradalign.experiments.data.mnist1d import augment

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
SYMMETRIC = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NORMALIZE = ("dataset", "symmetric")


class Pipeline1d:
    """1-D inputs (mnist1d): stored inputs are model inputs; views by mnist1d.augment."""

    def prepare(self, x: Tensor) -> Tensor:
        return x

    def view(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return augment(x, generator)


@dataclass(frozen=True)
class ImagePipeline:
    """Crop, flip, normalise, Cutout for uint8 image batches (B, C, H, W); see the module docstring."""

    mean: tuple
    std: tuple
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 16
    cutout_p: float = 0.5
    channels_last: bool = False

    def _normalise(self, x: Tensor) -> Tensor:
        """uint8 or [0, 1] float (B, C, H, W) -> normalised float32."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def prepare(self, x: Tensor) -> Tensor:
        _check(x)
        return self._layout(self._normalise(x))

    def view(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check(x)
        B, _, H, W = x.shape
        cpu = {"generator": generator, "device": generator.device}
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (B, 2), **cpu).to(x.device)              # (B, 2) top, left
        flips = (torch.rand(B, **cpu) < 0.5).to(x.device)                               # (B,)
        holes = (torch.rand(B, **cpu) < self.cutout_p).to(x.device)                     # (B,)
        half = self.cutout // 2
        corners = torch.randint(-half, max(min(H, W) - half, 1 - half), (B, 2), **cpu).to(x.device)
        out = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if p:
            padded = torch.nn.functional.pad(out, (p, p, p, p))                         # zeros: black pixels
            rows = (offsets[:, :1] + torch.arange(H, device=x.device)).view(B, 1, H, 1)
            cols = (offsets[:, 1:] + torch.arange(W, device=x.device)).view(B, 1, 1, W)
            C = out.shape[1]
            out = padded.gather(2, rows.expand(B, C, H, W + 2 * p)).gather(3, cols.expand(B, C, H, W))
        if self.flip:
            out = torch.where(flips.view(B, 1, 1, 1), out.flip(3), out)
        out = self._normalise(out)
        if self.cutout:
            r = torch.arange(H, device=x.device).view(1, H, 1)
            c = torch.arange(W, device=x.device).view(1, 1, W)
            top, left = corners[:, 0].view(B, 1, 1), corners[:, 1].view(B, 1, 1)
            hole = (r >= top) & (r < top + self.cutout) & (c >= left) & (c < left + self.cutout) & holes.view(B, 1, 1)
            out = out.masked_fill(hole.unsqueeze(1), 0.0)
        return self._layout(out)


def _check(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"image pipelines expect a batch (B, C, H, W); got shape {tuple(x.shape)}")


def pipeline_for(data, *, channels_last: bool = False) -> Pipeline1d | ImagePipeline:
    """The pipeline of an experiment's [data] table (config.DataConfig)."""
    if data.dataset == "mnist1d":
        return Pipeline1d()
    mean, std = NORMALIZATION[data.dataset] if data.normalize == "dataset" else SYMMETRIC
    return ImagePipeline(mean, std, crop_padding=data.crop_padding, flip=data.flip, cutout=data.cutout,
                         cutout_p=data.cutout_p, channels_last=channels_last)
