"""mnist1d splits, label noise, batches and augmentation."""
import random

import numpy as np
import pytest
import torch

from gradalign.experiments.data import Split, augment, batches, make_mnist1d


@pytest.fixture(scope="module")
def seed_splits():
    """The seed setup: 4000 samples -> 3200 train_full / 800 test, 20% label noise."""
    return make_mnist1d(num_samples=4000, seed=42, label_noise=0.2, noise_seed=3)


@pytest.fixture(scope="module")
def clean_splits():
    return make_mnist1d(num_samples=4000, seed=42)


def test_split_sizes_and_types(seed_splits):
    s = seed_splits
    assert (len(s.train_full), len(s.test), len(s.train), len(s.val)) == (3200, 800, 2560, 640)
    for split in (s.train, s.val, s.test, s.train_full):
        assert split.x.dtype == torch.float32 and split.x.shape == (len(split), 40)
        assert split.y.dtype == torch.long and split.ids.dtype == torch.long
        assert split.y.min() >= 0 and split.y.max() <= 9


def test_ids_consistent(seed_splits):
    s = seed_splits
    full = s.train_full.ids.tolist()
    assert full == list(range(3200))
    train, val, test = set(s.train.ids.tolist()), set(s.val.ids.tolist()), set(s.test.ids.tolist())
    assert not train & val and train | val == set(full)
    assert len(test) == 800 and not test & set(full)
    # train and val rows are the train_full rows with the same ids
    for part in (s.train, s.val):
        assert torch.equal(part.x, s.train_full.x[part.ids]) and torch.equal(part.y, s.train_full.y[part.ids])


def test_val_stratified_by_class(clean_splits):
    y_full, y_val = clean_splits.train_full.y, clean_splits.val.y
    expected = 0.2 * torch.bincount(y_full, minlength=10)
    assert torch.all((torch.bincount(y_val, minlength=10) - expected).abs() < 1)


def test_label_noise_exact(seed_splits, clean_splits):
    noisy, clean = seed_splits, clean_splits
    assert noisy.noise_rate == 0.2 and len(noisy.flipped_ids) == round(0.2 * 3200)
    assert torch.equal(noisy.train_full.x, clean.train_full.x)
    changed = torch.nonzero(noisy.train_full.y != clean.train_full.y).flatten()
    assert torch.equal(changed, noisy.flipped_ids)                   # every flip changes its label
    assert torch.equal(noisy.test.y, clean.test.y) and torch.equal(noisy.test.x, clean.test.x)
    # the same partition at every noise rate; val carries the noisy labels
    assert torch.equal(noisy.val.ids, clean.val.ids)
    assert torch.equal(noisy.val.y, noisy.train_full.y[noisy.val.ids])
    assert len(clean.flipped_ids) == 0 and clean.flipped_ids.dtype == torch.long


def test_noise_spreads_over_other_classes(seed_splits, clean_splits):
    new = seed_splits.train_full.y[seed_splits.flipped_ids]
    old = clean_splits.train_full.y[seed_splits.flipped_ids]
    offsets = torch.bincount((new - old) % 10, minlength=10)
    assert offsets[0] == 0 and torch.all(offsets[1:] > 40)          # 640 flips over 9 offsets


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5, 1.0])
def test_noise_count_small(rate):
    s = make_mnist1d(num_samples=100, seed=1, label_noise=rate)
    assert len(s.flipped_ids) == round(rate * 80)


def test_deterministic_by_seed_and_noise_seed():
    a = make_mnist1d(num_samples=200, seed=5, label_noise=0.3, noise_seed=1)
    b = make_mnist1d(num_samples=200, seed=5, label_noise=0.3, noise_seed=1)
    for name in ("train", "val", "test", "train_full"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y) and torch.equal(sa.ids, sb.ids)
    assert torch.equal(a.flipped_ids, b.flipped_ids)
    c = make_mnist1d(num_samples=200, seed=5, label_noise=0.3, noise_seed=2)
    assert torch.equal(c.train_full.x, a.train_full.x) and not torch.equal(c.flipped_ids, a.flipped_ids)
    d = make_mnist1d(num_samples=200, seed=6)
    assert not torch.equal(d.train_full.x, a.train_full.x)


def test_global_rng_state_restored():
    random.seed(123)
    np.random.seed(456)
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    make_mnist1d(num_samples=50, seed=7, label_noise=0.5)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 4005}, "multiple of 10"),
    ({"num_samples": 10}, "at least 20"),
    ({"num_samples": 40.0}, "num_samples"),
    ({"seed": -1}, "seed"),
    ({"noise_seed": 2**32}, "noise_seed"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"num_samples": 20, "val_fraction": 0.01}, "non-empty"),
    ({"label_noise": -0.1}, "label_noise"),
    ({"label_noise": 1.5}, "label_noise"),
    ({"label_noise": float("nan")}, "label_noise"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mnist1d(**kwargs)


def _toy_split(n=23):
    return Split(torch.randn(n, 40), torch.arange(n) % 10, torch.arange(100, 100 + n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_cover_each_sample_once(drop_last):
    split = _toy_split()
    out = list(batches(split, 5, torch.Generator().manual_seed(0), drop_last=drop_last))
    sizes = [len(ids) for _, _, ids in out]
    assert sizes == ([5, 5, 5, 5] if drop_last else [5, 5, 5, 5, 3])
    ids = torch.cat([ids for _, _, ids in out])
    if not drop_last:
        assert sorted(ids.tolist()) == split.ids.tolist()
    assert len(set(ids.tolist())) == len(ids)
    for x, y, i in out:                                             # rows stay together
        assert torch.equal(x, split.x[i - 100]) and torch.equal(y, split.y[i - 100])


def test_batches_deterministic_and_shuffled():
    split = _toy_split()
    first = [ids for _, _, ids in batches(split, 4, torch.Generator().manual_seed(3))]
    again = [ids for _, _, ids in batches(split, 4, torch.Generator().manual_seed(3))]
    g = torch.Generator().manual_seed(3)
    epoch1 = torch.cat([ids for _, _, ids in batches(split, 4, g)])
    epoch2 = torch.cat([ids for _, _, ids in batches(split, 4, g)])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(epoch1, epoch2) and not torch.equal(epoch1, split.ids)


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True])
def test_batches_bad_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(_toy_split(), batch_size, torch.Generator()))


def test_augment_shapes_and_independent_views():
    x = torch.randn(64, 40)
    g = torch.Generator().manual_seed(0)
    v1, v2 = augment(x, g), augment(x, g)
    assert v1.shape == v2.shape == x.shape and v1.dtype == x.dtype
    assert not torch.equal(v1, v2) and not torch.equal(v1, x)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0)), v1)   # deterministic by seed


def test_augment_shift_pads_with_zeros():
    x = torch.arange(1.0, 41.0).repeat(200, 1)                      # rows 1..40, no zeros
    out = augment(x, torch.Generator().manual_seed(1), max_shift=3, scale=(1.0, 1.0), noise_std=0.0)
    shifts = set()
    for row in out:
        nz = torch.nonzero(row).flatten()
        first, last = int(nz[0]), int(nz[-1])
        shift = first if first > 0 else -(39 - last)                # right shift pads the front
        assert torch.equal(row[nz], torch.arange(1.0, 41.0)[nz - shift])
        assert len(nz) == 40 - abs(shift)                           # vacated positions are zero, no wrap
        shifts.add(shift)
    assert shifts == set(range(-3, 4))


def test_augment_scale_and_noise():
    x = torch.ones(2000, 40)
    g = torch.Generator().manual_seed(2)
    scaled = augment(x, g, max_shift=0, scale=(0.8, 1.2), noise_std=0.0)
    factor = scaled[:, 0]
    assert torch.allclose(scaled, factor[:, None].expand_as(scaled))   # one factor per sample
    assert 0.8 <= factor.min() and factor.max() <= 1.2 and factor.std() > 0.1
    noisy = augment(x, g, max_shift=0, scale=(1.0, 1.0), noise_std=0.05)
    assert abs((noisy - 1).std().item() - 0.05) < 0.003 and abs((noisy - 1).mean().item()) < 0.003


@pytest.mark.parametrize("kwargs", [{"max_shift": 40}, {"max_shift": -1}, {"scale": (1.2, 0.8)},
                                    {"scale": (0.0, 1.0)}, {"noise_std": -0.1}])
def test_augment_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 40), torch.Generator(), **kwargs)


def test_augment_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        augment(torch.zeros(2, 1, 40), torch.Generator())
