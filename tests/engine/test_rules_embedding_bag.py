"""nn.EmbeddingBag: 2-D input or 1-D input with offsets (an empty bag included), modes sum, mean and
max, per_sample_weights, padding_idx and include_last_offset, against a per-sample autograd loop
(bags given by offsets are not per-sample inputs for torch.func) at B = 1 and 7."""
import pytest
import torch
from torch import nn

import gradalign as ga
from tests.support.batches import cross_entropy
from tests.support.compare import compare_all, loop_reference

BAG_LENGTHS = (3, 0, 5, 1, 6, 2, 4)  # with offsets: an empty bag, and bags of every length up to 6


class BagNet(nn.Module):
    """(B, 6) ids, as they come (2-D) or cut into bags of BAG_LENGTHS (offsets); per_sample_weights
    from a Linear of the ids, so their gradient flows on to another layer."""

    def __init__(self, offsets: bool, weighted: bool, **options):
        super().__init__()
        self.offsets = offsets
        self.bag, self.head = nn.EmbeddingBag(12, 4, **options), nn.Linear(4, 3)
        self.weigh = nn.Linear(1, 1) if weighted else None

    def forward(self, ids):
        w = None if self.weigh is None else torch.sigmoid(self.weigh(ids.float().unsqueeze(-1))).squeeze(-1)
        if not self.offsets:
            return self.head(self.bag(ids, per_sample_weights=w))
        lengths = torch.tensor(BAG_LENGTHS[:ids.shape[0]])
        flat = torch.cat([row[:n] for row, n in zip(ids, lengths)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        offsets = offsets if self.bag.include_last_offset else offsets[:-1]
        w = None if w is None else torch.cat([row[:n] for row, n in zip(w, lengths)])
        return self.head(self.bag(flat, offsets, per_sample_weights=w))


def ids(B, gen):
    x = torch.randint(0, 12, (B, 6), generator=gen)
    x[:, 1:3] = 3  # a row looked up twice per bag (and the padding row where padding_idx=3)
    return x, torch.randint(0, 3, (B,), generator=gen)


CONFIGS = [(offsets, False, dict(mode=mode, padding_idx=pad)) for offsets in (False, True)
           for mode in ("sum", "mean", "max") for pad in (None, 3)]
CONFIGS += [(False, True, dict(mode="sum")), (True, True, dict(mode="sum", padding_idx=3)),
            (True, False, dict(mode="mean", include_last_offset=True)),
            (True, False, dict(mode="max", include_last_offset=True, padding_idx=3))]


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("offsets,weighted,options", CONFIGS)
def test_embedding_bag_matches_a_per_sample_loop(offsets, weighted, options, B):
    torch.manual_seed(0)
    compare_all(BagNet(offsets, weighted, **options), ids, cross_entropy, B, seed=B, reference=loop_reference(0))


def test_options_that_mix_samples_are_refused():
    with pytest.raises(ga.UnsupportedModuleError, match="scale_grad_by_freq"):
        ga.PerSampleGradients(nn.EmbeddingBag(5, 2, scale_grad_by_freq=True))
    assert "sparse" in ga.validate(nn.EmbeddingBag(5, 2, sparse=True))[0]
