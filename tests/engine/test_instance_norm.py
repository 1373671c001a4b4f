"""InstanceNorm with affine parameters: each sample normalised on its own, so its per-sample
gradients are exact in training and eval mode, with or without running statistics (with
track_running_stats=True it used to fail inside vmap)."""
import pytest
import torch
from torch import nn

from tests.support.batches import classification_batch, cross_entropy
from tests.support.compare import compare_all, loop_reference


def model(dims: int, track: bool):
    norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(conv(2, 3, 3), norm(3, affine=True, track_running_stats=track), nn.Tanh(),
                         nn.Flatten(), nn.LazyLinear(4))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_instance_norm_matches_a_per_sample_loop(dims, track, training):
    torch.manual_seed(dims)
    net = model(dims, track)
    make = classification_batch(2, *([5] * dims), classes=4)
    net(make(2, torch.Generator().manual_seed(9))[0])      # materialise the lazy layer
    if track:                                                # running statistics away from (0, 1)
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.train(training)
    compare_all(net, make, cross_entropy, B=5, reference=loop_reference(0), forward_seed=0)
