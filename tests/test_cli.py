"""The command line: demo and every bundled `reproduce --quick` on tiny budgets, errors, help."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradalign.cli import main

TINY_DATA = ["--set", "data.num_samples=200", "--no-progress", "-q"]
# per experiment: shrink the budget further than --quick (the tests' 2-core time budget)
TINY = {
    "gasw": ["--set", "train.epochs=1"],
    "gaga": ["--set", "train.budget_samples=320", "--set", "train.eval_every=160"],
    "gwa": ["--set", "train.epochs=2", "--set", "experiment.noise_levels=[0.0, 0.2]"],
    "gvr": ["--set", "train.epochs=1", "--set", "train.batch_size=32"],
    "noise": ["--set", "train.epochs=2", "--set", 'experiment.noise_levels=[0.2, "pair:0.2"]',
              "--set", 'noise.drop_signals=["aum", "random"]'],
}


@pytest.fixture(autouse=True)
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_demo_prints_table_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--set", "train.epochs=1"] + TINY_DATA) == 0
    printed = capsys.readouterr().out
    assert "| mode | tuned (or fixed) | test acc | final train loss |" in printed
    for label in ("baseline Adam", "GASW", "GDSW", "GAGA", "two views", "GVR"):
        assert label in printed
    assert f"plot:   {out / 'comparison.png'}" in printed and (out / "comparison.png").exists()


@pytest.mark.parametrize("name", ["gasw", "gaga", "gwa", "gvr", "noise"])
def test_reproduce_quick(tmp_path, capsys, name):
    out = tmp_path / name
    args = ["reproduce", name, "--quick", "--trials", "1", "--seeds", "2", "--out", str(out)]
    assert main(args + TINY_DATA + TINY[name]) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and str(out / "summary.md") in printed
    summary = json.loads((out / "summary.json").read_text())
    for variant in summary["variants"].values():
        for arm in variant["arms"].values():
            assert arm["seeds"] == [0, 1]
    if name == "gaga":
        assert (out / "gaga_dynamics.png").exists()
    if name == "gwa":
        assert (out / "gwa_noise0.2.png").exists() and "AUROC" in (out / "summary.md").read_text()
    if name == "noise":
        assert (out / "detection_auroc.png").exists() and (out / "clean_retrain.png").exists()
        assert set(summary["noise"]["clean"]["pair0.2"]) == {"all data", "aum-0.2", "random-0.2", "oracle"}
    # the same command again resumes: nothing left to do, the report is rewritten
    before = {p: p.stat().st_mtime_ns for p in out.rglob("seed*.json")}
    assert main(args + TINY_DATA + TINY[name]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("seed*.json")} == before


def test_report_train_tune_and_list(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "gasw", "--quick", "--trials", "0", "--seeds", "1", "--out", str(out)]
                + TINY_DATA + TINY["gasw"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "-q"]) == 0
    assert "GDSW" in capsys.readouterr().out
    csv_path = tmp_path / "one.csv"
    assert main(["train", "gasw", "--arm", "gasw", "--param", "lr=0.003", "--param", "gamma=1.5", "--seed", "3",
                 "--csv", str(csv_path), "--set", "train.epochs=2"] + TINY_DATA) == 0
    printed = capsys.readouterr().out
    assert '"gamma": 1.5' in printed and csv_path.exists()
    assert main(["tune", "gasw", "--arm", "gdsw", "--trials", "1", "--out", str(tmp_path / "t"),
                 "--set", "train.epochs=1"] + TINY_DATA) == 0
    assert "gdsw: best" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "tuning.json").read_text())["arms"]["gdsw"]["complete"] == 1
    assert main(["list"]) == 0
    assert "gaga" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["reproduce", "nope"], "unknown experiment 'nope'"),
    (["reproduce", "gasw", "--set", "train.epochs=0"], "epochs: expected an integer >= 1"),
    (["reproduce", "gasw", "--set", "train.epoch=3"], "unknown key 'epoch'; valid keys"),
    (["train", "gasw", "--arm", "nobody"], "no arm named 'nobody'"),
    (["train", "gasw", "--arm", "baseline", "--param", "gamma=2"], "unknown key 'gamma'"),
    (["report", "."], "not a run folder"),
])
def test_bad_config_or_option_exits_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--no-progress", "-q"] if argv[0] != "report" else argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["reproduce", "gasw", "--trials", "-1"], ["reproduce", "gasw", "--seeds", "0"],
                                  ["reproduce"], ["frobnicate"], ["reproduce", "gasw", "--set", "noequals"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).parent / "gradalign"
    result = subprocess.run([str(script), "reproduce", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--quick", "--trials", "--seeds", "--storage", "--out", "--set", "--threads", "--no-progress"):
        assert option in result.stdout


CIFAR_TINY = {   # fake archives; shrink --quick further: fewer images and epochs
    "gvr-cifar100": ["--set", "data.train_size=200", "--set", "data.test_size=100", "--set", "train.epochs=1",
                     "--set", "model.options.width=4"],
    "gwa-cifar10": ["--set", "data.train_size=100", "--set", "data.test_size=50", "--set", "train.epochs=3"],
}


@pytest.mark.parametrize("name", sorted(CIFAR_TINY))
def test_reproduce_cifar_quick(tmp_path, capsys, name):
    from tests.support.fake_cifar import write_fake_cifar
    dataset = "cifar100" if "100" in name else "cifar10"
    write_fake_cifar(tmp_path / "data", dataset, n_train=300, n_test=100)
    out = tmp_path / name
    args = ["reproduce", name, "--quick", "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--out", str(out),
            "--no-progress", "-q"] + CIFAR_TINY[name]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    if name == "gwa-cifar10":
        assert set(summary["variants"]) == {"vit", "convnext"} and "## Results (convnext)" in md
        assert "epoch chosen by" in md and (out / "gwa_vit.png").exists()
        rows = summary["variants"]["vit"]["selection"]["rows"]
        assert {(r["arm"], r["metric"]) for r in rows} >= {("full", "test_acc@gwa"), ("split", "test_acc@val")}
    else:
        arms = summary["variants"][""]["arms"]
        assert set(arms) == {"sgd", "two_view", "gvr"} and arms["gvr"]["params"]["subset_forward"] == "separate"
        assert "data: cifar100, 200 training images" in md and "GVR (separate" in printed
    for variant in summary["variants"].values():
        assert all(arm["seeds"] == [0, 1] for arm in variant["arms"].values())
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("url, needle", [
    ("notaurl", "is not a storage URL"),
    ("foo://host/db", "unknown database 'foo'"),
    ("sqlite:////no/such/folder/studies.db", "the folder /no/such/folder does not exist"),
    ("postgresql://user:pw@127.0.0.1:1/db", "cannot connect"),
])
def test_a_bad_storage_url_exits_2_before_anything_is_written(tmp_path, capsys, url, needle):
    out = tmp_path / "run"
    assert main(["reproduce", "gasw", "--quick", "--storage", url, "--out", str(out), "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert "pw@" not in err                                       # the password is masked in the message too


def test_report_refuses_names_that_would_leave_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "gasw", "--quick", "--trials", "0", "--seeds", "1", "--out", str(out)] + TINY["gasw"]
                + TINY_DATA) == 0
    meta = json.loads((out / "config.json").read_text())
    for variants, arm in ((["../../escaped"], "baseline"), ([""], "../x")):
        bad = json.loads(json.dumps(meta))
        bad["variants"] = variants
        bad["config"]["arms"][0]["name"] = arm
        (out / "config.json").write_text(json.dumps(bad))
        assert main(["report", str(out), "-q"]) == 2
        assert "is not a plain name" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "escaped").exists()
