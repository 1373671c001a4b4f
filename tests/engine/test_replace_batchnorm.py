"""ga.replace_batchnorm: BatchNorm -> GroupNorm with group counts that never zero a feature."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from tests.support.engine_models import classification_batch, cross_entropy
from gradalign.engine.batchnorm import group_count
from tests.support.compare import compare_all


class BatchNormNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(16)
        self.conv3d = nn.Conv3d(1, 4, 1)
        self.bn3d = nn.BatchNorm3d(4, affine=False)
        self.fc = nn.Linear(16 + 4, 8)
        self.bn1d = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):  # (B, 3, 4, 4)
        h = F.relu(self.bn2d(self.conv(x))).mean(dim=(2, 3))
        v = self.bn3d(self.conv3d(x.unsqueeze(1))).mean(dim=(2, 3, 4))
        return self.head(F.relu(self.bn1d(self.fc(torch.cat([h, v], 1)))))


@pytest.mark.parametrize("B", [1, 7, 64])
def test_replaced_model_is_served_and_matches_torch_func(B):
    torch.manual_seed(0)
    model = BatchNormNet()
    with pytest.raises(ga.UnsupportedModuleError, match=r"replace_batchnorm"):
        ga.PerSampleGradients(model)
    swaps = ga.replace_batchnorm(model)
    assert [s.path for s in swaps] == ["bn2d", "bn3d", "bn1d"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ga.validate(model) == []
    compare_all(model, classification_batch(3, 4, 4, classes=3), cross_entropy, B)


def test_group_counts_never_leave_a_single_number_per_group():
    assert [group_count(c) for c in (1, 2, 3, 4, 16, 24, 32, 64, 96, 256)] == [1, 1, 1, 2, 8, 12, 16, 32, 32, 32]
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Unflatten(1, (6, 1, 1)), nn.BatchNorm2d(6))
    swaps = ga.replace_batchnorm(model)
    assert [(m.num_groups, m.num_channels) for m in (model[0], model[2])] == [(1, 6), (3, 6)]
    assert "GroupNorm(1, 6" in swaps[0].new and "GroupNorm(3, 6" in swaps[1].new
    # (B, C) and (B, C, 1, 1) inputs, where one channel per group (Opacus' min(32, C)) outputs zeros
    x = torch.randn(4, 6)
    assert model[0](x).abs().mean() > 0.3 and model(x).abs().mean() > 0.3  # unit-scale outputs
    assert nn.GroupNorm(min(32, 6), 6)(x).abs().max() < 1e-3  # the bug this avoids: zeros


def test_affine_flags_device_dtype_and_mode_are_kept():
    bn = nn.BatchNorm2d(4, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    bn.bias.requires_grad_(False)
    bn.eval()
    model = nn.Sequential(nn.Conv2d(2, 4, 1, dtype=torch.float64), bn)
    ga.replace_batchnorm(model)
    gn = model[1]
    assert isinstance(gn, nn.GroupNorm) and gn.eps == 1e-3 and not gn.training
    assert gn.weight.dtype == torch.float64 and torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert gn.weight.requires_grad and not gn.bias.requires_grad
    no_affine = nn.Sequential(nn.BatchNorm2d(4, affine=False))
    ga.replace_batchnorm(no_affine)
    assert no_affine[0].weight is None and no_affine[0].bias is None


def test_a_shared_batchnorm_becomes_one_shared_groupnorm_and_swaps_are_logged(caplog):
    bn = nn.BatchNorm2d(8)
    model = nn.ModuleDict({"a": nn.Sequential(bn), "b": nn.Sequential(bn)})
    with caplog.at_level(logging.INFO, logger="gradalign"):
        swaps = ga.replace_batchnorm(model)
    assert [s.path for s in swaps] == ["a.0", "b.0"] and model["a"][0] is model["b"][0]
    assert "a.0: BatchNorm2d(8" in caplog.text and "-> GroupNorm(4, 8" in caplog.text


def test_what_cannot_be_replaced_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(1))
    with pytest.raises(ValueError, match=r"2 \(BatchNorm1d\): one feature"):
        ga.replace_batchnorm(model)
    assert isinstance(model[0], nn.BatchNorm2d)  # untouched
    with pytest.raises(ValueError, match="the model itself is a BatchNorm"):
        ga.replace_batchnorm(nn.BatchNorm2d(4))
