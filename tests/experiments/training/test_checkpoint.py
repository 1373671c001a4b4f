"""Checkpoints: a run stopped after any evaluation (mid-epoch too) and resumed ends with exactly
the numbers of an uninterrupted run on the CPU; stale checkpoints are not resumed; a process
killed with SIGKILL mid-epoch resumes at its last finished evaluation."""
import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.support.fake_cifar import write_fake_cifar
from gradalign.experiments.data import cifar
from gradalign.experiments.training.checkpoint import RunCheckpoint, rng_state, run_key, set_rng_state
from gradalign.experiments.config import parse_config
from gradalign.experiments.data import load_splits
from gradalign.experiments.runner import reproduce
from gradalign.experiments.training import train_run

CIFAR_TOML = """
name = "tiny-cifar"
[data]
dataset = "cifar10"
val_fraction = 0.25
label_noise = 0.25
[model]
kind = "resnet18"
options = {{ width = 4, blocks = [1, 1, 1, 1] }}
[train]
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
batch_size = 16
{budget}
schedule = "{schedule}"
[tune]
trials = 0
[final]
seeds = 1
[[arms]]
name = "gvr"
method = "gvr"
params = {{ alpha = 0.5, gvr_mode = "autograd", gvr_layers = "last_stage", subset = 8, subset_forward = "separate" }}
"""
MID_EPOCH = 'budget_samples = 200\neval_every = 40'           # evaluations at 48, 80, 128, 160, 200 of 96 per epoch


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    cifar.clear_cache()
    yield
    torch.set_num_threads(old)


@pytest.fixture
def data_dir(tmp_path):
    write_fake_cifar(tmp_path / "data", "cifar10", n_train=96, n_test=32)
    return tmp_path / "data"


class Stop(Exception):
    pass


def comparable(result):
    """Every number of a run but its wall times, as JSON text (so that nan equals nan)."""
    rows = [{k: v for k, v in r.items() if k != "wall_time"} for r in result.rows]
    summary = {k: v for k, v in result.summary.items() if k not in ("wall_time", "resumed_from")}
    return json.dumps([rows, summary], sort_keys=True, default=str)


def interrupted_then_resumed(config, arm, splits, ckpt, stop_at, **kw):
    seen = []

    def on_eval(row):
        seen.append(row)
        if len(seen) == stop_at:
            raise Stop                    # before this evaluation's checkpoint: the previous one holds
    with pytest.raises(Stop):
        train_run(config, arm, None, 0, splits, on_eval=on_eval, checkpoint=ckpt, **kw)
    return train_run(config, arm, None, 0, splits, checkpoint=ckpt, **kw)


@pytest.mark.parametrize("stop_at", [2, 3])          # resume mid-epoch from 48 or 80 samples
def test_cifar_gvr_resumes_exactly(data_dir, tmp_path, stop_at):
    config = parse_config(__import__("tomllib").loads(CIFAR_TOML.format(budget=MID_EPOCH, schedule="cosine_epoch")))
    arm = config.arms[0]
    splits = load_splits(config.data, data_dir)
    plain = train_run(config, arm, None, 0, splits)
    ckpt = RunCheckpoint(tmp_path / "ckpt", "k")
    resumed = interrupted_then_resumed(config, arm, splits, ckpt, stop_at)
    assert resumed.summary["resumed_from"] == (48, 80)[stop_at - 2]       # evaluations at 48, 80, 128, ...
    assert comparable(resumed) == comparable(plain)
    assert "auroc_flipped" in plain.summary and len(plain.rows) == 5


@pytest.mark.parametrize("method, params", [("gasw", "{ gamma = 1.5 }"), ("gaga", "{ increment = 16, max_samples = 16 }"),
                                            ("gaga", "{ increment = 16, max_samples = 512, tau = 1e9 }"),
                                            ("signals", "{}")])
def test_mnist1d_steps_resume_exactly(tmp_path, method, params):
    toml = f"""
name = "tiny"
[data]
num_samples = 200
label_noise = 0.2
[train]
batch_size = 16
epochs = 4
schedule = "cosine"
[[arms]]
name = "a"
method = "{method}"
params = {params}
"""
    config = parse_config(__import__("tomllib").loads(toml))
    splits = load_splits(config.data)
    plain = train_run(config, config.arms[0], None, 0, splits)
    resumed = interrupted_then_resumed(config, config.arms[0], splits, RunCheckpoint(tmp_path / "c", "k"), 3)
    assert comparable(resumed) == comparable(plain)
    assert resumed.records.keys() == plain.records.keys()               # signals: records of the epochs before too
    for k in plain.records:
        np.testing.assert_array_equal(resumed.records[k], plain.records[k])
    # GAGA is saved only between accumulations: with 512-sample accumulations, never here (it starts over)
    assert resumed.summary["resumed_from"] == (0 if "512" in params else 320)


def test_stale_or_unreadable_checkpoints_start_over(tmp_path):
    toml = '\nname = "t"\n[data]\nnum_samples = 100\n[train]\nbatch_size = 16\nepochs = 3\n[[arms]]\nname = "a"\nmethod = "baseline"\n'
    config = parse_config(__import__("tomllib").loads(toml))
    splits = load_splits(config.data)

    def stop_at_epoch_2(row):
        if row["epoch"] == 2:
            raise Stop
    ckpt = RunCheckpoint(tmp_path / "c", run_key("hash", {"lr": 0.1}, 0))
    with pytest.raises(Stop):
        train_run(config, config.arms[0], None, 0, splits, checkpoint=ckpt, on_eval=stop_at_epoch_2)
    assert ckpt.load()["samples"] == 80
    other = RunCheckpoint(tmp_path / "c", run_key("hash", {"lr": 0.2}, 0))     # other parameters: not resumed
    assert train_run(config, config.arms[0], None, 0, splits, checkpoint=other).summary["resumed_from"] == 0
    assert other.load()["samples"] == 160                                     # its own checkpoint now
    (tmp_path / "c" / "state.pt").write_bytes(b"garbage")
    assert other.load() is None and not (tmp_path / "c").exists()


def test_rng_states_round_trip():
    import random
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def csv_numbers(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in csv.DictReader(f)]


def test_sigkill_mid_epoch_resumes_at_the_last_evaluation(data_dir, tmp_path):
    """A real SIGKILL (no clean-up runs) after the first checkpoint; the same command finishes the
    run from there, with the CSV of an uninterrupted run."""
    toml = tmp_path / "tiny-cifar.toml"
    toml.write_text(CIFAR_TOML.format(budget="epochs = 6\neval_every = 1", schedule="cosine"))
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    state = run_dir / "checkpoints" / "gvr" / "seed0" / "state.pt"
    cmd = [sys.executable, "-m", "gradalign.cli", "reproduce", str(toml), "--data-dir", str(data_dir),
           "--out", str(run_dir), "--device", "cpu", "--no-progress", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not state.exists():
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = torch.load(state, weights_only=True)
    assert 0 < saved["samples"] < 6 * 96 and not (run_dir / "runs" / "gvr" / "seed0.json").exists()
    reproduce(toml, run_dir, data_dir=data_dir, device="cpu", progress=False, report=False)
    summary = json.loads((run_dir / "runs" / "gvr" / "seed0.json").read_text())
    assert summary["resumed_from"] >= saved["samples"] > 0
    assert not (run_dir / "checkpoints").exists()                                # removed once written
    reproduce(toml, ref_dir, data_dir=data_dir, device="cpu", progress=False, report=False)
    assert csv_numbers(run_dir / "runs" / "gvr" / "seed0.csv") == csv_numbers(ref_dir / "runs" / "gvr" / "seed0.csv")


def _damage(folder, how):
    """Damage a saved checkpoint the way a disk, a bug or a hand could."""
    state = folder / "state.pt"
    if how == "bytes flipped":                    # still a zip, but a member's CRC fails
        raw = bytearray(state.read_bytes())
        middle = len(raw) // 2
        raw[middle:middle + 200] = bytes(b ^ 0xFF for b in raw[middle:middle + 200])
        state.write_bytes(bytes(raw))
    elif how == "a list":
        torch.save([1, 2, 3], state)
    elif how == "monitor of another type":
        saved = torch.load(state, weights_only=True)
        torch.save({**saved, "monitor": [0.5]}, state)
    elif how == "tensor of the wrong shape":
        saved = torch.load(state, weights_only=True)
        model = dict(saved["model"])
        name = next(iter(model))
        model[name] = torch.zeros(3, 3)
        torch.save({**saved, "model": model}, state)
    elif how == "garbled npz":
        npz = folder / "gwa" / "epoch0.npz"
        npz.write_bytes(npz.read_bytes()[:40] + b"\x00" * 64)


@pytest.mark.parametrize("how", ["bytes flipped", "a list", "monitor of another type", "tensor of the wrong shape",
                                 "garbled npz"])
def test_a_damaged_checkpoint_is_discarded_with_a_warning_and_the_run_retrained_exactly(tmp_path, how, caplog):
    toml = '\nname = "t"\n[data]\nnum_samples = 100\n[train]\nbatch_size = 16\nepochs = 3\n[[arms]]\nname = "a"\nmethod = "baseline"\n'
    config = parse_config(__import__("tomllib").loads(toml))
    splits = load_splits(config.data)
    arm = config.arms[0]
    uninterrupted = train_run(config, arm, None, 0, splits)

    def stop_at_epoch_2(row):
        if row["epoch"] == 2:
            raise Stop
    ckpt = RunCheckpoint(tmp_path / "c", run_key("hash", {}, 0))
    with pytest.raises(Stop):
        train_run(config, arm, None, 0, splits, checkpoint=ckpt, on_eval=stop_at_epoch_2)
    _damage(tmp_path / "c", how)
    with caplog.at_level("WARNING", logger="gradalign"):
        again = train_run(config, arm, None, 0, splits, checkpoint=ckpt)
    assert again.summary["resumed_from"] == 0
    assert comparable(again) == comparable(uninterrupted)
    assert "discarding the checkpoint" in caplog.text and str(tmp_path / "c") in caplog.text
