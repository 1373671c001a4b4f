"""Experiment configs: bundled files parse, bad configs fail with messages that say what to fix."""
import pytest

from gradalign.errors import ConfigError
from gradalign.experiments.config import load_config, override, parse_config
from gradalign.experiments.config_sources import bundled_names, parse_override


def minimal(**over):
    raw = {"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 2},
           "arms": [{"name": "base", "method": "baseline", "search": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
                    {"name": "w", "method": "gasw", "params": {"gamma": 2.0}}]}
    raw.update(over)
    return raw


@pytest.mark.parametrize("name", ["gasw", "gaga", "gwa", "gvr", "demo"])
@pytest.mark.parametrize("quick", [False, True])
def test_bundled_configs_parse(name, quick):
    cfg = load_config(name, quick=quick)
    assert cfg.name == name and cfg.arms
    assert name in bundled_names()


def test_bundled_experiments_match_the_issue():
    gasw = load_config("gasw")
    assert [a.method for a in gasw.arms] == ["baseline", "gasw", "gdsw"]
    assert {p.name for p in gasw.arm("gasw").search} == {"lr", "gamma"}
    gaga = load_config("gaga")
    assert gaga.train.budget_samples == 96000 and gaga.train.batch_size == 32 and gaga.tune.trials == 20
    assert {p.name for p in gaga.arm("gaga").search} == {"lr", "tau"}
    gwa = load_config("gwa")
    assert [v.data.label_noise for v in gwa.variants()] == [0.0, 0.1, 0.2]
    gvr = load_config("gvr")
    assert gvr.model.kind == "conv1d"
    assert {a.method for a in gvr.arms} == {"baseline", "two_view", "gvr"}
    assert {a.params.get("gvr_mode") for a in gvr.arms if a.method == "gvr"} == {"autograd", "closed_form"}
    quick = load_config("gasw", quick=True)
    assert quick.tune.trials < gasw.tune.trials and quick.final.seeds < gasw.final.seeds
    assert quick.train.epochs < gasw.train.epochs


def test_defaults_and_types():
    cfg = parse_config(minimal())
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 32 and cfg.model.kind == "mlp"
    assert cfg.final.reference == "base"                # resolved at parse time: the first arm
    sp = cfg.arm("base").search[0]
    assert (sp.name, sp.type, sp.low, sp.high, sp.log) == ("lr", "float", 1e-4, 1e-2, True)
    with pytest.raises(Exception):
        cfg.name = "other"                      # frozen


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.update(bogus=1), "valid keys: name, description"),
    (lambda r: r["train"].update(epoch=3), "unknown key 'epoch'; valid keys: optimizer, lr"),
    (lambda r: r["data"].update(num_samples=-5), "num_samples: expected an integer >= 1"),
    (lambda r: r["data"].update(num_samples=205), "multiple of 10"),
    (lambda r: r["train"].update(budget_samples=100), "either epochs or budget_samples"),
    (lambda r: r["train"].update(optimizer="rmsprop"), "one of 'adam', 'sgd'"),
    (lambda r: r.update(model={"kind": "transformer"}), "one of 'mlp', 'resmlp', 'conv1d'"),
    (lambda r: r["arms"][0].update(method="magic"), "method must be one of baseline, gasw"),
    (lambda r: r["arms"][0].update(params={"gamma": 2.0}), "unknown key 'gamma'; valid keys: lr"),
    (lambda r: r["arms"][0]["search"].update(lr={"low": -1, "high": 1}), "bound -1 is not a number > 0"),
    (lambda r: r["arms"][0]["search"].update(lr={"low": 0.1, "high": 0.01}), "needs low < high"),
    (lambda r: r["arms"][0]["search"].update(lr={"low": 1e-3}), "needs low and high"),
    (lambda r: r["arms"][0]["search"].update(lr={"low": 1e-3, "high": 1e-2, "step": 2}), "unknown key 'step'"),
    (lambda r: r["arms"][1].update(params={"gamma": 2.0}, search={"gamma": {"low": 1, "high": 2}}),
     "both fixed (params) and searched"),
    (lambda r: r["arms"][1].update(name="base"), "arm names must be unique"),
    (lambda r: r.update(final={"reference": "nobody"}), "must name an arm"),
    (lambda r: r.update(arms=[]), "at least one [[arms]]"),
    (lambda r: r.update(experiment={"noise_levels": [0.1, 1.5]}), "noise_levels"),
    (lambda r: r.update(quick={"train": {"epochz": 1}}), "[quick] [train]: unknown key 'epochz'"),
    (lambda r: r["train"].update(eval_every=5), "eval_every"),
    (lambda r: r["arms"][1].update(method="gaga", params={"increment": 64, "max_samples": 32}), "max_samples"),
])
def test_bad_configs_raise_clear_errors(mutate, needle):
    raw = minimal()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="t.toml")
    assert needle in str(info.value) and "t.toml" in str(info.value)


def test_noise_levels_expand_into_variants():
    cfg = parse_config(minimal(experiment={"noise_levels": [0.0, 0.2]}))
    variants = cfg.variants()
    assert [v.variant for v in variants] == ["noise0", "noise0.2"]
    assert [v.data.label_noise for v in variants] == [0.0, 0.2]
    assert parse_config(minimal()).variants()[0].variant == ""


def test_quick_and_overrides():
    raw = minimal(quick={"train": {"epochs": 1}, "tune": {"trials": 1}})
    assert parse_config(raw).train.epochs == 2
    cfg = parse_config(raw, quick=True, overrides={"tune.trials": 4, "arms.w.params.gamma": 1.5})
    assert cfg.train.epochs == 1 and cfg.tune.trials == 4 and cfg.arm("w").params["gamma"] == 1.5
    with pytest.raises(ConfigError, match="no arm 'zz'"):
        override(raw, {"arms.zz.params.lr": 1.0})
    with pytest.raises(ConfigError, match="first part must be one of"):
        override(raw, {"trian.epochs": 1})
    with pytest.raises(ConfigError, match="expected an integer >= 1"):
        parse_config(raw, overrides={"train.epochs": 0})


def test_parse_override_values():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("train.lr = 1e-3") == ("train.lr", 1e-3)
    assert parse_override("train.optimizer=sgd") == ("train.optimizer", "sgd")
    assert parse_override("experiment.noise_levels=[0.0, 0.1]") == ("experiment.noise_levels", [0.0, 0.1])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_arm_hash_tracks_what_decides_a_run():
    cfg = parse_config(minimal())
    arm = cfg.arm("w")
    h = cfg.arm_hash(arm)
    assert h == parse_config(minimal()).arm_hash(arm)
    relabelled = parse_config(minimal(arms=[minimal()["arms"][0], {**minimal()["arms"][1], "label": "X"}]))
    assert relabelled.arm_hash(relabelled.arm("w")) == h              # labels are cosmetic
    other = parse_config(minimal(train={"epochs": 1}))
    assert other.arm_hash(other.arm("w")) != h
    more_trials = parse_config(minimal(tune={"trials": 50}))
    assert more_trials.arm_hash(more_trials.arm("w"), tuning=True) == cfg.arm_hash(arm, tuning=True)
    assert cfg.arm_hash(arm, tuning=True) != h


def test_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'.*gasw"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text('name = "g"\n[[arms]]\nname = "a"\nmethod = "baseline"\n')
    assert load_config(good).arms[0].name == "a"
