"""`gradalign train --nproc 2` (two gloo processes through torch's launcher), with DDP or the
model sharded by FSDP2 (`--shard`), against one process: the same global batches, so the same
numbers up to float summation order."""
import csv
import subprocess
import sys

import pytest

from gradalign.experiments.runner import run_single

SETTINGS = ["--quick", "--set", "train.epochs=1", "--set", "data.num_samples=1000", "--no-progress"]


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
@pytest.mark.parametrize("arm,params", [("baseline", {"lr": 0.003}), ("gasw", {"lr": 0.003, "gamma": 2.0})])
def test_two_processes_match_one(tmp_path, arm, params, shard):
    out = tmp_path / "two.csv"
    cmd = [sys.executable, "-m", "gradalign.cli", "train", "gasw", "--arm", arm, "--nproc", "2", "--csv", str(out),
           *SETTINGS, *[a for k, v in params.items() for a in ("--param", f"{k}={v}")], *(["--shard"] if shard else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("evaluations:") == 1                # only rank 0 prints
    two = read(out)
    one = run_single("gasw", arm, params, 0, quick=True, progress=False,
                     overrides={"train.epochs": 1, "data.num_samples": 1000}).rows
    assert [int(r["samples"]) for r in two] == [r["samples"] for r in one] == [800]
    for got, ref in zip(two, one):
        assert int(got["step"]) == ref["step"]
        for key in ("train_loss", "test_loss", "mean_alignment"):
            assert float(got[key]) == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
        assert float(got["test_acc"]) == pytest.approx(ref["test_acc"], abs=2 / 800)   # a near-tie may flip


def test_shard_needs_several_processes(tmp_path):
    cmd = [sys.executable, "-m", "gradalign.cli", "train", "gasw", "--arm", "gasw", "--shard", *SETTINGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--shard" in done.stderr and "--nproc N" in done.stderr
