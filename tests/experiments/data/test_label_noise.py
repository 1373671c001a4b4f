"""Label noise in the data: the noise kinds, noise levels in configs, the [noise] table."""
import numpy as np
import pytest
import torch

from gradalign.errors import ConfigError
from gradalign.experiments.config import load_config, parse_config
from gradalign.experiments.data import make_mnist1d
from gradalign.experiments.data.label_noise import describe, flip_labels, parse_level, parse_levels


def test_pair_noise_maps_each_class_to_the_next():
    y = np.repeat(np.arange(10), 20)
    noisy, flipped = flip_labels(y, 0.3, np.random.default_rng(4), "pair")
    assert len(flipped) == 60 and np.all(np.diff(flipped) > 0)
    assert np.array_equal(noisy[flipped], (y[flipped] + 1) % 10)
    keep = np.setdiff1d(np.arange(len(y)), flipped)
    assert np.array_equal(noisy[keep], y[keep])
    # the same noise_seed and rate flip the same samples under both kinds; only the new label differs
    sym, flipped_sym = flip_labels(y, 0.3, np.random.default_rng(4), "symmetric")
    assert np.array_equal(flipped, flipped_sym) and np.all(sym[flipped] != y[flipped])


def test_symmetric_noise_is_unchanged_from_before_noise_kinds():
    """The flips the GWA experiment's results were measured with: same draws in the same order."""
    y = np.repeat(np.arange(10), 30)
    rng = np.random.default_rng(0)
    expected = np.sort(rng.choice(300, size=60, replace=False))
    new = (y[expected] + rng.integers(1, 10, size=60)) % 10
    noisy, flipped = flip_labels(y, 0.2, np.random.default_rng(0))
    assert np.array_equal(flipped, expected) and np.array_equal(noisy[flipped], new)


def test_mnist1d_pair_noise_records_clean_labels():
    clean = make_mnist1d(num_samples=200, seed=3)
    pair = make_mnist1d(num_samples=200, seed=3, label_noise=0.25, noise_kind="pair", noise_seed=1)
    sym = make_mnist1d(num_samples=200, seed=3, label_noise=0.25, noise_seed=1)
    ids = pair.flipped_ids
    assert pair.noise_kind == "pair" and len(ids) == 40 and torch.equal(ids, sym.flipped_ids)
    assert torch.equal(pair.flipped_clean, clean.train_full.y[ids])
    assert torch.equal(pair.train_full.y[ids], (clean.train_full.y[ids] + 1) % 10)
    with pytest.raises(ValueError, match="pair-noise rate below 0.5"):
        make_mnist1d(num_samples=200, label_noise=0.5, noise_kind="pair")
    with pytest.raises(ValueError, match="noise kind"):
        make_mnist1d(num_samples=200, label_noise=0.2, noise_kind="asymmetric")


@pytest.mark.parametrize("entry, kind, rate, variant", [
    (0.2, "symmetric", 0.2, "noise0.2"), (0, "symmetric", 0.0, "noise0"), ("pair:0.2", "pair", 0.2, "pair0.2"),
    ("symmetric:0.4", "symmetric", 0.4, "noise0.4"), ("pair:0", "symmetric", 0.0, "noise0"),
])
def test_noise_levels(entry, kind, rate, variant):
    level = parse_level(entry)
    assert (level.kind, level.rate, level.variant) == (kind, rate, variant)
    assert parse_level(level.spec) == level


@pytest.mark.parametrize("entries, needle", [
    ([0.2, "pair:0.2", 0.2], "noise0.2 appears more than once"),
    ([0.0, "pair:0"], "noise0 appears more than once"),
    (["pair:0.6"], "pair-noise rate below 0.5"),
    (["asym:0.2"], "a noise kind in symmetric, pair"),
    (["pair"], "not a rate or 'KIND:RATE'"),
    ([1.5], "a rate in [0, 1]"),
    ([True], "a rate in [0, 1]"),
    (0.2, "expected a list"),
])
def test_bad_noise_levels(entries, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_levels(entries)


def test_describe():
    assert describe("noise0.2") == "symmetric noise 20%" and describe("pair0.2") == "pair noise 20%"
    assert describe("noise0") == "no label noise" and describe("") == "" and describe("other") == "other"


def _raw(**over):
    raw = {"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 2},
           "arms": [{"name": "base", "method": "signals"}, {"name": "w", "method": "gasw"}]}
    raw.update(over)
    return raw


def test_config_variants_carry_the_noise_kind():
    cfg = parse_config(_raw(experiment={"noise_levels": [0.0, 0.4, "pair:0.2"]}))
    assert [(v.variant, v.data.label_noise, v.data.noise_kind) for v in cfg.variants()] == [
        ("noise0", 0.0, "symmetric"), ("noise0.4", 0.4, "symmetric"), ("pair0.2", 0.2, "pair")]
    assert cfg.experiment.noise_levels == (0.0, 0.4, "pair:0.2")
    assert cfg.noise.signals_arm == "base" and cfg.noise.drop_fractions == ()
    # the default kind leaves the hash as before noise kinds existed; pair noise changes it
    plain, explicit = parse_config(_raw()), parse_config(_raw(data={"num_samples": 200, "noise_kind": "symmetric"}))
    pair = parse_config(_raw(data={"num_samples": 200, "noise_kind": "pair", "label_noise": 0.2}))
    arm = plain.arms[0]
    assert plain.arm_hash(arm) == explicit.arm_hash(arm) != pair.arm_hash(arm)


def test_bundled_noise_experiment():
    cfg = load_config("noise")
    assert [v.variant for v in cfg.variants()] == ["noise0", "noise0.2", "noise0.4", "pair0.2"]
    assert [a.method for a in cfg.arms] == ["signals", "gasw", "gdsw", "gaga", "two_view", "gvr"]
    assert all(a.search for a in cfg.arms) and cfg.final.reference == "baseline"
    assert cfg.noise.drop_fractions == (0.1, 0.2) and "random" in cfg.noise.drop_signals and cfg.noise.oracle
    quick = load_config("noise", quick=True)
    assert quick.train.epochs < cfg.train.epochs and quick.final.seeds < cfg.final.seeds


@pytest.mark.parametrize("over, needle", [
    ({"data": {"num_samples": 200, "noise_kind": "pair", "label_noise": 0.5}}, "[data] label_noise: expected a pair"),
    ({"data": {"num_samples": 200, "noise_kind": "flip"}}, "noise_kind: expected one of 'symmetric', 'pair'"),
    ({"experiment": {"noise_levels": ["pair:0.7"]}}, "[experiment] noise_levels"),
    ({"noise": {"reference_signal": "entropy"}}, "reference_signal: expected one of loss, grad_norm"),
    ({"noise": {"signals_arm": "w"}}, "signals_arm: must name an arm whose method records"),
    ({"noise": {"drop_fractions": [0.1, 1.0]}}, "drop_fractions: expected a list of distinct fractions"),
    ({"noise": {"drop_signals": ["loss", "margin"]}}, "drop_signals: expected a list of distinct names"),
    ({"noise": {"oracle": "yes"}}, "oracle: expected true or false"),
    ({"noise": {"drop_frac": [0.1]}}, "unknown key 'drop_frac'; valid keys: signals_arm"),
    ({"noise": {"drop_fractions": [0.1]}, "arms": [{"name": "b", "method": "baseline"}]},
     "clean-and-retrain needs an arm that records"),
])
def test_bad_noise_config(over, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(_raw(**over))
    assert needle in str(info.value)
