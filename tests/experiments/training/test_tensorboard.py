"""--tensorboard: every evaluation as TensorBoard scalars, read back with tensorboard's own reader."""
import csv

import pytest
import torch

from gradalign.cli import main
from gradalign.experiments.training import tensorboard as tb

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
SMALL = ["--quick", "--set", "data.num_samples=200", "--set", "train.epochs=2", "--no-progress", "-q"]


@pytest.fixture(autouse=True)
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def scalars(folder):
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_writes_every_evaluation_as_scalars(tmp_path):
    logdir, table = tmp_path / "tb", tmp_path / "rows.csv"
    assert main(["train", "gasw", "--arm", "gasw", "--param", "lr=0.003", "--tensorboard", str(logdir),
                 "--csv", str(table)] + SMALL) == 0
    rows = list(csv.DictReader(open(table)))
    got = scalars(logdir)
    assert {"loss/train", "acc/test", "gwa/score", "optimizer/lr", "method/weight_entropy"} <= set(got)
    assert [s for s, _ in got["acc/test"]] == [int(r["samples"]) for r in rows]
    assert [v for _, v in got["acc/test"]] == pytest.approx([float(r["test_acc"]) for r in rows])
    assert [v for _, v in got["loss/train"]] == pytest.approx([float(r["train_loss"]) for r in rows])


def test_reproduce_logs_each_final_run_in_the_run_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["reproduce", "gaga", "--quick", "--trials", "0", "--seeds", "1", "--out", str(out), "--tensorboard",
                 "--set", "data.num_samples=200", "--set", "train.budget_samples=320", "--set", "train.eval_every=160",
                 "--no-progress", "-q"]) == 0
    for arm in ("baseline", "gaga"):
        got = scalars(out / "tensorboard" / arm / "seed0")
        assert [s for s, _ in got["acc/test"]] == [160, 320], arm


def test_without_tensorboard_installed_the_flag_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tb.importlib.util, "find_spec", lambda name: None)
    assert main(["reproduce", "gasw", "--quick", "--out", str(tmp_path / "run"), "--tensorboard", "--no-progress",
                 "-q"]) == 2
    assert 'pip install "gradalign[tensorboard]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
