"""The method table: a new method reaches config, tuning, training, the run folder and the
report through one registered entry plus its library object."""
import csv
import json

import pytest
import torch

import gradalign as ga
from gradalign.errors import ConfigError
from gradalign.experiments import checks
from gradalign.experiments.method_table import METHODS, Method, Param
from gradalign.experiments.config import load_config, parse_config, resolve_params
from gradalign.experiments.report import write_report
from gradalign.experiments.method_table import evaluation_columns as columns
from gradalign.experiments.runner import reproduce
from gradalign.experiments.method_table import Step


class SmallLossFirst:
    """A toy library object: down-weight the half of the batch with the larger losses.

    w_i = 1 for losses at or below the median, `scale` above it; normalised to sum to B.
    """

    def __init__(self, scale: float):
        self.scale = scale
        self.last_mean_norm = float("nan")

    def weights(self, losses: torch.Tensor):
        def weigh(stats: ga.GradientStats) -> torch.Tensor:
            self.last_mean_norm = float(stats.norms.mean())
            w = torch.where(losses <= losses.median(), 1.0, self.scale)
            return w * len(w) / w.sum()
        return weigh


class SmallLossStep(Step):
    columns = ("mean_grad_norm",)

    def __init__(self, *args):
        super().__init__(*args)
        self.method = SmallLossFirst(self.p["scale"])
        self.engine = ga.PerSampleGradients(self.model)
        self._norms = []

    def update(self, out):
        self.engine.backward(out.graph, weights=self.method.weights(out.graph.detach()))
        self._norms.append(self.method.last_mean_norm)
        return len(out.logits)

    def window(self):
        out = super().window()
        out["mean_grad_norm"] = sum(self._norms) / len(self._norms) if self._norms else float("nan")
        self._norms = []
        return out

    def close(self):
        self.engine.remove()


TOY = """
name = "toy"
[data]
num_samples = 200
[train]
epochs = 2
batch_size = 16
[tune]
trials = 2
startup_trials = 1
[final]
seeds = 2
[[arms]]
name = "baseline"
method = "baseline"
params = { lr = 0.003 }
[[arms]]
name = "small_loss"
method = "small_loss_first"
params = { lr = 0.003 }
search.scale = { low = 0.1, high = 0.9 }
"""


@pytest.fixture
def toy_method():
    METHODS.register(Method("small_loss_first", SmallLossStep, (Param("scale", 0.5, checks.unit_open),),
                            report_metrics=("mean_grad_norm",)))
    yield
    METHODS.unregister("small_loss_first")


def test_a_registered_method_runs_end_to_end(tmp_path, toy_method):
    (tmp_path / "toy.toml").write_text(TOY)
    config = load_config(tmp_path / "toy.toml")
    assert resolve_params(config, config.arm("small_loss"))["scale"] == 0.5       # the entry's default
    assert "mean_grad_norm" in columns()
    done = reproduce(tmp_path / "toy.toml", tmp_path / "run", progress=False)
    run_dir = done.run_dir
    with open(run_dir / "runs" / "small_loss" / "seed1.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["mean_grad_norm"]) > 0 for r in rows)
    tuned = json.loads((run_dir / "tuning" / "small_loss.json").read_text())
    assert 0.1 <= tuned["params"]["scale"] <= 0.9 and tuned["complete"] + tuned["pruned"] == 2
    metric = done.summary["variants"][""]["arms"]["small_loss"]["metrics"]["mean_grad_norm"]
    assert metric["n"] == 2 and metric["mean"] > 0
    assert "mean_grad_norm" not in done.summary["variants"][""]["arms"]["baseline"]["metrics"]
    assert "| mean_grad_norm | small_loss |" in (run_dir / "summary.md").read_text()
    METHODS.unregister("small_loss_first")                    # a folder of an unknown method still reports
    try:
        assert write_report(run_dir)["variants"][""]["arms"]["small_loss"]["metrics"]["test_acc"]["n"] == 2
    finally:
        METHODS.register(Method("small_loss_first", SmallLossStep, (Param("scale", 0.5, checks.unit_open),)))


def test_config_checks_come_from_the_entry(toy_method):
    raw = {"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 1},
           "arms": [{"name": "a", "method": "small_loss_first", "params": {"scale": 1.5}}]}
    with pytest.raises(ConfigError, match=r"scale: expected a number in \(0, 1\), got 1.5"):
        parse_config(raw)
    raw["arms"][0]["params"] = {"gamma": 2.0}
    with pytest.raises(ConfigError, match="unknown key 'gamma'; valid keys: lr, momentum, weight_decay, "
                                          "batch_size, augment, scale"):
        parse_config(raw)


def test_registry_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register(Method("gasw", Step))
    with pytest.raises(ValueError, match="method name"):
        METHODS.register(Method("two words", Step))


def test_method_defaults_are_the_library_defaults():
    """One source of truth: the experiments' defaults are the library objects' own."""
    train = load_config("gaga").train
    assert METHODS["gaga"].defaults(train)["tau"] == ga.GSNRAccumulator().tau
    assert METHODS["gasw"].defaults(train)["gamma"] == ga.GASW().gamma
    assert METHODS["gvr"].defaults(train)["alpha"] == ga.GVR(layers=torch.nn.Linear(2, 2)).alpha
    assert METHODS["two_view"].defaults(train)["alpha"] == 0.0
    assert METHODS["baseline"].defaults(train)["lr"] == train.lr


def test_every_step_fills_exactly_its_declared_columns():
    from gradalign.experiments.data import make_mnist1d
    from gradalign.experiments.training import train_run
    splits = make_mnist1d(num_samples=200, seed=42)
    cfg = parse_config({"name": "t", "data": {"num_samples": 200}, "train": {"epochs": 1, "batch_size": 32},
                        "arms": [{"name": m, "method": m} for m in METHODS.names()]})
    own = set(columns()) - set(METHODS.columns())
    for arm in cfg.arms:
        row = train_run(cfg, arm, {}, 0, splits, eval_split="val").rows[-1]
        filled = {k for k, v in row.items() if not (isinstance(v, float) and v != v)} - own
        assert filled == set(METHODS[arm.method].columns), arm.method
