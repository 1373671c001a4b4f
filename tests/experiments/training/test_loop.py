"""The one training loop: every arm runs, evaluations are complete, seeds pair arms."""
import math

import numpy as np
import pytest
import torch

from gradalign.experiments.config import parse_config, resolve_params
from gradalign.experiments.data import make_mnist1d
from gradalign.experiments.method_table import evaluation_columns as columns
from gradalign.experiments.training import TrainingDiverged, train_run

COLUMNS = columns()

METHODS = ["baseline", "gasw", "gdsw", "gaga", "gvr", "two_view"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def splits():
    return make_mnist1d(num_samples=200, seed=42, label_noise=0.2, noise_seed=1)   # 160 train / 40 test


def config(**train):
    raw = {"name": "t", "data": {"num_samples": 200},
           "train": {"epochs": 2, "batch_size": 16, **train},
           "arms": [{"name": m, "method": m} for m in METHODS]}
    raw["arms"].append({"name": "gvr_faithful", "method": "gvr",
                        "params": {"gvr_mode": "autograd", "gvr_layers": "last_stage", "subset": 8}})
    raw["arms"].append({"name": "gaga_seed", "method": "gaga", "params": {"rule": "per_sample", "increment": 16,
                                                                          "max_samples": 64}})
    return parse_config(raw)


@pytest.mark.parametrize("arm", METHODS + ["gvr_faithful", "gaga_seed"])
@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_every_arm_trains_and_evaluates(splits, arm, eval_split):
    cfg = config()
    result = train_run(cfg, cfg.arm(arm), {"lr": 3e-3}, 0, splits, eval_split=eval_split)
    rows = result.rows
    assert len(rows) == 2 and all(set(r) == set(COLUMNS) for r in rows)
    n = len(splits.train) if eval_split == "val" else len(splits.train_full)
    assert [r["samples"] for r in rows] == [n, 2 * n] and [r["epoch"] for r in rows] == [1.0, 2.0]
    last = rows[-1]
    assert math.isfinite(last["train_loss"]) and 0 <= last["train_acc"] <= 1
    if eval_split == "val":             # tuning never looks at the test set
        assert math.isfinite(last["val_acc"]) and math.isnan(last["test_acc"])
    else:
        assert math.isfinite(last["test_acc"]) and math.isnan(last["val_acc"])
    assert all(math.isfinite(r["mean_alignment"]) for r in rows)           # GWA monitor on in every run
    assert result.summary["steps"] == last["step"] > 0
    method = cfg.arm(arm).method
    if method in ("gasw", "gdsw"):
        assert 0 <= last["zero_weight_frac"] <= 1 and 0 <= last["weight_entropy"] <= 1
        assert last["fallbacks"] >= 0
    else:
        assert math.isnan(last["zero_weight_frac"])
    if method == "gaga":
        inc = result.summary["params"]["increment"]
        assert inc <= last["samples_per_step"] <= result.summary["params"]["max_samples"]
    else:
        assert last["samples_per_step"] == 16
    assert math.isfinite(last["penalty"]) == (method in ("gvr", "two_view"))
    assert "auroc_flipped" in result.summary and 0 <= result.summary["auroc_flipped"]["mean"] <= 1
    assert result.summary["gwa_epoch"] in (0, 1, None)


def test_runs_are_deterministic_and_paired(splits):
    cfg = config()
    a = train_run(cfg, cfg.arm("baseline"), {"lr": 3e-3}, 5, splits)
    b = train_run(cfg, cfg.arm("baseline"), {"lr": 3e-3}, 5, splits)
    other_seed = train_run(cfg, cfg.arm("baseline"), {"lr": 3e-3}, 6, splits)
    assert [r["test_loss"] for r in a.rows] == [r["test_loss"] for r in b.rows]
    assert a.rows[-1]["test_loss"] != other_seed.rows[-1]["test_loss"]
    # GASW with gamma = 0 weights every sample 1: same init and batches give the baseline's trajectory
    uniform = train_run(cfg, cfg.arm("gasw"), {"lr": 3e-3, "gamma": 0.0}, 5, splits)
    np.testing.assert_allclose([r["train_loss"] for r in uniform.rows], [r["train_loss"] for r in a.rows], rtol=1e-3)
    # GAGA capped at one increment of the batch size is the baseline too (same samples, same order)
    capped = train_run(cfg, cfg.arm("gaga"), {"lr": 3e-3, "increment": 16, "max_samples": 16}, 5, splits)
    np.testing.assert_allclose([r["train_loss"] for r in capped.rows], [r["train_loss"] for r in a.rows], rtol=1e-3)


def test_sample_budget_and_evaluation_points(splits):
    cfg = parse_config({"name": "t", "data": {"num_samples": 200},
                        "train": {"budget_samples": 500, "eval_every": 160, "batch_size": 16},
                        "arms": [{"name": "g", "method": "gaga", "params": {"increment": 16, "max_samples": 96,
                                                                            "tau": 1e9}},
                                 {"name": "b", "method": "baseline"}]})
    for arm in cfg.arms:
        result = train_run(cfg, arm, {}, 0, splits)
        assert [r["samples"] for r in result.rows] == [160, 320, 480, 500]
        assert result.summary["samples"] == 500
    # tau unreachable: every GAGA step uses max_samples, except the flushed remainder at the end
    assert result.rows and train_run(cfg, cfg.arm("g"), {}, 0, splits).summary["steps"] == math.ceil(500 / 96)


def test_cosine_schedule_reaches_zero(splits):
    cfg = config(schedule="cosine")
    result = train_run(cfg, cfg.arm("baseline"), {"lr": 1e-2}, 0, splits)
    assert result.rows[0]["lr"] < 1e-2 and result.rows[-1]["lr"] == pytest.approx(0.0, abs=1e-6)


def test_cosine_epoch_schedule_is_cosine_annealing_per_epoch(splits, monkeypatch):
    """CosineAnnealingLR(T_max = epochs) stepped once per epoch: constant within an epoch."""
    cfg = config(schedule="cosine_epoch", epochs=4, optimizer="sgd", eval_every=1)
    seen = []
    from gradalign.experiments.training import optimizer as steps
    real = steps.Optimizer.step

    def spy(self, samples_done):
        real(self, samples_done)
        seen.append((samples_done, self.lr))
    monkeypatch.setattr(steps.Optimizer, "step", spy)
    train_run(cfg, cfg.arm("baseline"), {"lr": 0.1}, 0, splits)
    n = len(splits.train_full)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    expected = []
    for _ in range(4):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for samples_done, lr in seen:
        assert lr == pytest.approx(expected[(samples_done - 1) // n], rel=1e-12, abs=1e-15)
    assert len({lr for _, lr in seen}) == 4 and seen[-1][1] > 0          # one value per epoch, never 0


def test_divergence_raises_a_clear_error(splits):
    cfg = config(optimizer="sgd")
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_run(cfg, cfg.arm("baseline"), {"lr": 1e8}, 0, splits)


def test_on_eval_can_stop_a_run(splits):
    cfg = config()
    seen = []

    class Stop(Exception):
        pass

    def on_eval(row):
        seen.append(row)
        raise Stop

    with pytest.raises(Stop):
        train_run(cfg, cfg.arm("gasw"), {}, 0, splits, on_eval=on_eval)
    assert len(seen) == 1 and seen[0]["epoch"] == 1.0


def test_train_split_and_params(splits):
    cfg = parse_config({"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 1, "lr": 0.01},
                        "arms": [{"name": "s", "method": "baseline", "train_split": "train",
                                  "params": {"augment": True}}]})
    arm = cfg.arm("s")
    p = resolve_params(cfg, arm, {"lr": 0.02})
    assert p["lr"] == 0.02 and p["augment"] is True and p["batch_size"] == 32
    result = train_run(cfg, arm, {}, 0, splits, eval_split="test")
    last = result.rows[-1]
    assert last["samples"] == len(splits.train)                 # trained on the carved split
    assert math.isfinite(last["val_acc"]) and math.isfinite(last["test_acc"])
    with pytest.raises(ValueError, match="eval_split"):
        train_run(cfg, arm, {}, 0, splits, eval_split="train")
