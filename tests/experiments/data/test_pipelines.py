"""The image pipeline: normalisation, crop with zero padding, flip, Cutout after normalisation,
independent views, determinism from the generator, memory format; the 1-D pipeline unchanged."""
import pytest
import torch

from gradalign.experiments.data import NORMALIZATION, ImagePipeline, Pipeline1d, pipeline_for
from gradalign.experiments.config import DataConfig
from gradalign.experiments.data import augment

MEAN, STD = NORMALIZATION["cifar100"]


def images(B=64, seed=0):
    return torch.randint(0, 256, (B, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(x):
    return (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_prepare_is_normalisation_only():
    x = images()
    torch.testing.assert_close(ImagePipeline(MEAN, STD).prepare(x), normalised(x))
    symmetric = pipeline_for(DataConfig(dataset="cifar10", normalize="symmetric")).prepare(x)
    assert symmetric.min() >= -1 and symmetric.max() <= 1 and symmetric.min() < -0.99


def test_crop_is_a_shift_with_zero_padding():
    """Without flip and Cutout each view is the image shifted by (dy, dx) in [-4, 4], zeros shifted in."""
    x = images(32)
    pipe = ImagePipeline(MEAN, STD, flip=False, cutout=0)
    view = pipe.view(x, torch.Generator().manual_seed(1))
    raw = view * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)   # back to [0, 1]
    padded = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    shifts = set()
    for b in range(len(x)):
        match = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.allclose(raw[b], padded[b, :, dy:dy + 32, dx:dx + 32], atol=1e-5)]
        assert len(match) == 1, b
        shifts.add(match[0])
    assert len(shifts) > 10                                          # offsets vary per image


def test_flip_and_cutout_statistics():
    x = images(2000)
    pipe = ImagePipeline(MEAN, STD, crop_padding=0, flip=True, cutout=16, cutout_p=0.5)
    view = pipe.view(x, torch.Generator().manual_seed(2))
    ref = normalised(x)
    zeros = (view == 0).all(dim=1)                                   # (B, H, W) pixels zero in every channel
    kept = ~zeros.unsqueeze(1)
    same = ((view - ref).abs() * kept).flatten(1).amax(1) < 1e-5
    flipped = ((view - ref.flip(3)).abs() * kept).flatten(1).amax(1) < 1e-5
    assert (same ^ flipped).all() and 0.45 < flipped.float().mean() < 0.55
    holed = zeros.flatten(1).any(1)
    assert 0.45 < holed.float().mean() < 0.55                         # Cutout with p = 0.5
    sizes = zeros.flatten(1).sum(1)[holed]
    assert sizes.max() == 256 and sizes.min() >= 8 * 8                 # 16x16, clipped at the border to >= 8x8


def test_views_are_independent_and_reproducible():
    x = images(16)
    pipe = ImagePipeline(MEAN, STD)
    g = torch.Generator().manual_seed(3)
    v1, v2 = pipe.view(x, g), pipe.view(x, g)
    assert not torch.equal(v1, v2)
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(pipe.view(x, g2), v1) and torch.equal(pipe.view(x, g2), v2)


def test_channels_last_and_shape_errors():
    x = images(4)
    pipe = ImagePipeline(MEAN, STD, channels_last=True)
    assert pipe.view(x, torch.Generator()).is_contiguous(memory_format=torch.channels_last)
    assert pipe.prepare(x).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pipe.prepare(x[0])


def test_signal_pipeline_is_the_mnist1d_augmentation():
    x = torch.randn(8, 40)
    pipe = pipeline_for(DataConfig())
    assert isinstance(pipe, Pipeline1d) and pipe.prepare(x) is x
    assert torch.equal(pipe.view(x, torch.Generator().manual_seed(4)), augment(x, torch.Generator().manual_seed(4)))
