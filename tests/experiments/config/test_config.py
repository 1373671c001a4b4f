"""Experiment configs: bundled files parse, bad configs fail with messages that say what to fix."""
import pytest

from gradalign.errors import ConfigError
from gradalign.experiments.config import load_config, override, parse_config
from gradalign.experiments.config import bundled_names, parse_override


def minimal(**over):
    raw = {"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 2},
           "arms": [{"name": "base", "method": "baseline", "search": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
                    {"name": "w", "method": "gasw", "params": {"gamma": 2.0}}]}
    raw.update(over)
    return raw


@pytest.mark.parametrize("name", ["gasw", "gaga", "gwa", "gvr", "demo", "gvr-cifar100", "gwa-cifar10"])
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


def test_cifar_configs_match_the_issue():
    gvr = load_config("gvr-cifar100")
    t = gvr.train
    assert (gvr.data.dataset, gvr.model.kind, gvr.model.options) == ("cifar100", "resnet18", {"width": 64})
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs, t.schedule) == \
        ("sgd", 0.05, 0.9, 5e-4, 128, 200, "cosine_epoch")
    assert (gvr.data.crop_padding, gvr.data.flip, gvr.data.cutout, gvr.data.cutout_p) == (4, True, 16, 0.5)
    assert [a.method for a in gvr.arms] == ["baseline", "two_view", "gvr"] and gvr.tune.trials == 0
    faithful = gvr.arm("gvr").params
    assert faithful == {"alpha": 0.01, "gvr_mode": "autograd", "gvr_layers": "last_stage", "subset": 32,
                        "subset_forward": "separate"}
    gwa = load_config("gwa-cifar10")
    vit, convnext = gwa.variants()
    assert (vit.variant, vit.model.kind, vit.train.lr, vit.train.batch_size, vit.train.epochs) == ("vit", "vit", 1e-4, 256, 200)
    assert (convnext.model.kind, convnext.train.lr, convnext.train.batch_size, convnext.train.epochs) == \
        ("convnext", 1e-3, 512, 103)
    assert convnext.model.options["dims"] == [64, 128, 256, 512] and vit.model.options["width"] == 512
    assert [a.train_split for a in gwa.arms] == ["train_full", "train"] and gwa.data.val_fraction == 0.1
    for name in ("gvr-cifar100", "gwa-cifar10"):
        quick = load_config(name, quick=True)
        assert all(v.data.train_size in (1000, 2000) and v.data.test_size == 1000 for v in quick.variants())


def test_variants_merge_and_overrides_apply_to_each():
    raw = minimal(variants={"a": {"train": {"epochs": 3, "lr": 0.01}}, "b": {"model": {"hidden": 8}}})
    cfg = parse_config(raw)
    a, b = cfg.variants()
    assert (a.variant, a.train.epochs, a.train.lr, a.model.hidden) == ("a", 3, 0.01, 256)
    assert (b.variant, b.train.epochs, b.model.hidden) == ("b", 2, 8)
    over = parse_config(raw, overrides={"train.epochs": 5, "variants.b.model.hidden": 4})
    assert [v.train.epochs for v in over.variants()] == [5, 5] and over.variants()[1].model.hidden == 4
    noisy = parse_config({**raw, "experiment": {"noise_levels": [0.0, 0.2]}})
    assert [v.variant for v in noisy.variants()] == ["a-noise0", "a-noise0.2", "b-noise0", "b-noise0.2"]
    quick = parse_config({**raw, "quick": {"variants": {"a": {"train": {"epochs": 1}}}}}, quick=True)
    assert quick.variants()[0].train.epochs == 1
    with pytest.raises(ConfigError, match=r"\[variants.a\]: unknown key 'arms'"):
        parse_config(minimal(variants={"a": {"arms": []}}))
    with pytest.raises(ConfigError, match=r"\[variants.a\] \[train\] lr: expected a number > 0"):
        parse_config(minimal(variants={"a": {"train": {"lr": -1}}}))


@pytest.mark.parametrize("mutate, needle", [
    ({"data": {"dataset": "cifar11"}}, "dataset: expected one of 'mnist1d', 'cifar10', 'cifar100'"),
    ({"data": {"dataset": "cifar10"}}, "'mlp' does not take cifar10 inputs; use resnet18, vit, convnext"),
    ({"model": {"kind": "vit"}}, "'vit' does not take mnist1d inputs; use mlp, resmlp, conv1d"),
    ({"train": {"epochs": 2, "schedule": "step"}}, "expected one of 'none', 'cosine', 'cosine_epoch'"),
    ({"train": {"epochs": 2, "precision": "fp16"}}, "expected one of 'auto', 'fp32', 'bf16'"),
    ({"data": {"dataset": "cifar10", "cutout_p": 2}, "model": {"kind": "resnet18"}}, "cutout_p: expected a number in"),
])
def test_bad_cifar_settings(mutate, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        parse_config(minimal(**mutate))


def test_new_keys_at_their_defaults_keep_old_hashes():
    """Run folders made before the CIFAR keys existed stay valid: those keys enter the hash only when set."""
    cfg = parse_config(minimal())
    assert set(cfg.data.identity()) == {"num_samples", "seed", "val_fraction", "label_noise", "noise_seed"}
    assert "precision" not in cfg.train.identity()
    assert cfg.arm_hash(cfg.arms[1]) == "ead5a25b30dc"     # the hash this config had before them (commit 3b3df50)
    changed = parse_config(minimal(train={"epochs": 2, "precision": "fp32"}))
    assert changed.arm_hash(changed.arms[1]) != cfg.arm_hash(cfg.arms[1])
