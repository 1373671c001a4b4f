"""What a model memorised of the flipped labels."""
import pytest

from gradalign.experiments.data import make_mnist1d
from gradalign.experiments.label_noise import memorisation


def test_memorisation_against_noisy_and_clean_labels():
    splits = make_mnist1d(num_samples=200, seed=3, label_noise=0.25, noise_seed=1, noise_kind="pair")
    full, ids = splits.train_full, splits.flipped_ids
    pred = full.y.clone()                                    # fits every noisy label ...
    pred[ids[:10]] = splits.flipped_clean[:10]              # ... except 10 flipped ones, predicted clean
    pred[ids[10:15]] = (splits.flipped_clean[10:15] + 5) % 10   # and 5 predicted neither (noisy = clean + 1)
    out = memorisation(pred.numpy(), splits, full)
    n = len(ids)
    assert out["flipped_acc_noisy"] == pytest.approx((n - 15) / n)
    assert out["flipped_acc_clean"] == pytest.approx(10 / n)
    assert out["clean_train_acc"] == 1.0
    clean = make_mnist1d(num_samples=200, seed=3)
    assert memorisation(clean.train_full.y.numpy(), clean, clean.train_full) == {}
