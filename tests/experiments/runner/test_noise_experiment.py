"""`gradalign reproduce noise --quick` on a tiny budget: the run folder holds the per-sample
records and the clean-and-retrain runs, the report recomputes everything from the files, and
damaged records are refused by the report and retrained by reproduce."""
import json
import shutil

import numpy as np
import pytest
import torch

from gradalign.cli import main
from gradalign.experiments.label_noise import SIGNAL_NAMES
from gradalign.experiments.report import write_report

ARGS = ["reproduce", "noise", "--quick", "--trials", "1", "--seeds", "2", "--set", "data.num_samples=200",
        "--set", "train.epochs=2", "--set", 'experiment.noise_levels=[0.0, 0.4]', "--set",
        'noise.drop_signals=["loss", "forgetting"]', "--no-progress", "-q"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    old = torch.get_num_threads()
    out = tmp_path_factory.mktemp("noise") / "run"
    assert main(ARGS + ["--out", str(out)]) == 0
    torch.set_num_threads(old)
    return out


def test_records_clean_runs_and_report(folder):
    npz = np.load(folder / "runs" / "noise0.4" / "baseline" / "seed1.npz")
    assert npz["loss"].shape == (160, 2) and npz["flipped"].sum() == 64
    oracle = json.loads((folder / "clean" / "noise0.4" / "oracle" / "seed0.json").read_text())
    assert oracle["dropped"] == oracle["dropped_flipped"] == 64 and oracle["train_size"] == 96
    loss = json.loads((folder / "clean" / "noise0.4" / "loss-0.2" / "seed0.json").read_text())
    assert loss["dropped"] == 32 and loss["train_size"] == 128 and loss["method"] == "baseline"
    assert not (folder / "clean" / "noise0").exists()            # nothing to clean without noise
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["noise"]["variants"] == ["noise0.4"]
    signals = summary["noise"]["detection"]["noise0.4"]["signals"]
    assert set(signals) == set(SIGNAL_NAMES) and all(s["auroc"]["n"] == 2 for s in signals.values())
    assert set(summary["noise"]["clean"]["noise0.4"]) == {"all data", "loss-0.2", "forgetting-0.2", "oracle"}
    text = (folder / "summary.md").read_text()
    for needle in ("## Label noise: every method", "Memorised", "## Which signal finds the mislabelled samples",
                   "### Clean-and-retrain, symmetric noise 40%", "area under the margin", "no label noise"):
        assert needle in text, needle
    arms = summary["variants"]["noise0.4"]["arms"]
    assert arms["gasw"]["metrics"]["flipped_acc_noisy"]["n"] == 2
    assert "flipped_acc_noisy" not in summary["variants"]["noise0"]["arms"]["gasw"]["metrics"]


def test_report_recomputes_from_the_files(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = json.loads((copy / "summary.json").read_text())["noise"]
    for p in list(copy.glob("*.png")) + [copy / "summary.json", copy / "summary.md"]:
        p.unlink()
    again = write_report(copy)
    assert json.loads(json.dumps(again["noise"])) == before
    assert (copy / "detection_epochs.png").exists() and "Clean-and-retrain" in (copy / "summary.md").read_text()


def test_damaged_records_are_refused_and_retrained(folder, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    npz = copy / "runs" / "noise0.4" / "baseline" / "seed0.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    assert main(["report", str(copy), "-q"]) == 2
    assert "seed0.npz is damaged" in capsys.readouterr().err
    npz.unlink()
    assert main(["report", str(copy), "-q"]) == 2
    assert "seed0.npz is missing" in capsys.readouterr().err
    old = torch.get_num_threads()
    assert main(ARGS + ["--out", str(copy)]) == 0                 # retrains the seed (and nothing else)
    torch.set_num_threads(old)
    assert npz.exists() and main(["report", str(copy), "-q"]) == 0
