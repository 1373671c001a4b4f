"""Run folders that are damaged, mixed or busy, and command-line paths that cannot be used:
one line naming the file and what to do, never a traceback, never a silently wrong table."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradalign.cli import main
from gradalign.errors import RunFolderError
from gradalign.experiments.report import write_report
from gradalign.experiments.runner import reproduce

TINY = """
name = "tiny"
[data]
num_samples = 200
[train]
epochs = {epochs}
batch_size = 16
[tune]
trials = 0
[final]
seeds = 2
[[arms]]
name = "baseline"
method = "baseline"
[[arms]]
name = "gasw"
method = "gasw"
"""


@pytest.fixture(autouse=True)
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def tiny(tmp_path, epochs=2) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(epochs=epochs))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run folder, copied afresh by `folder` for each test that damages it."""
    tmp = tmp_path_factory.mktemp("finished")
    return reproduce(tiny(tmp), tmp / "run", progress=False).run_dir


@pytest.fixture
def folder(finished, tmp_path):
    import shutil
    return Path(shutil.copytree(finished, tmp_path / "run"))


def report_error(run_dir, capsys) -> str:
    """The CLI's `report` on the folder: exit code 2 and exactly one line on stderr."""
    assert main(["report", str(run_dir), "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_csv_cut_at_a_line_boundary_is_refused_by_report_and_retrained_by_reproduce(folder, capsys):
    csv_path = folder / "runs" / "gasw" / "seed1.csv"
    original = csv_path.read_text()
    csv_path.write_text("".join(original.splitlines(keepends=True)[:-1]))     # as if the last line never came
    err = report_error(folder, capsys)
    assert "seed1.csv does not match seed1.json" in err and "gradalign reproduce" in err
    config = json.loads((folder / "config.json").read_text())["source"]           # the tiny.toml it was made from
    reproduce(config, folder, progress=False)                                  # retrains the damaged seed
    assert csv_path.read_text().splitlines()[-1].split(",")[:12] == original.splitlines()[-1].split(",")[:12]
    assert write_report(folder)["variants"][""]["arms"]["gasw"]["metrics"]["test_acc"]["n"] == 2


@pytest.mark.parametrize("damage, needle", [
    (lambda f: (f / "runs/gasw/seed0.csv").write_text((f / "runs/gasw/seed0.csv").read_text()[:-7]),
     "a line is cut short"),
    (lambda f: (f / "runs/gasw/seed0.csv").write_text(""), "no evaluations"),
    (lambda f: (f / "runs/gasw/seed0.json").write_text((f / "runs/gasw/seed0.json").read_text()[:40]),
     "seed0.json is damaged (not valid JSON"),
    (lambda f: (f / "config.json").write_text((f / "config.json").read_text()[:100]), "config.json is damaged"),
    (lambda f: (f / "config.json").write_text('{"config": {}}'), "config.json is damaged"),
])
def test_report_on_a_damaged_folder_names_the_file(folder, capsys, damage, needle):
    damage(folder)
    assert needle in report_error(folder, capsys)


def test_report_refuses_seeds_trained_with_different_parameters(folder, capsys):
    path = folder / "runs" / "gasw" / "seed1.json"
    summary = json.loads(path.read_text())
    summary["params"]["lr"] *= 2                                 # as if trained after tuning moved the best lr
    path.write_text(json.dumps(summary))
    err = report_error(folder, capsys)
    assert "arm 'gasw' has seeds trained with different parameters" in err and "seeds 0" in err


def test_unusable_output_paths_fail_before_training(tmp_path, capsys):
    config = str(tiny(tmp_path))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["reproduce", config, "--out", str(a_file), "--no-progress", "-q"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["reproduce", config, "--out", "/proc/gradalign-cannot-be-here", "--no-progress", "-q"]) == 2
    assert "cannot create the run folder" in capsys.readouterr().err
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    assert main(["train", config, "--arm", "baseline", "--csv", str(a_folder), "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--csv" in err and "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder", "tiny.toml"]  # no temp file left


def test_config_files_that_cannot_be_read(tmp_path, capsys, monkeypatch):
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert main(["list"]) == 0 and capsys.readouterr()
    assert main(["reproduce", str(latin), "--no-progress", "-q"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    assert main(["reproduce", str(tmp_path / "mine"), "--no-progress", "-q"]) == 2
    assert "is a folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gasw").mkdir()                  # e.g. a run folder named like the experiment
    assert main(["train", "gasw", "--arm", "nope", "--no-progress", "-q"]) == 2
    assert "no arm named 'nope'" in capsys.readouterr().err   # the bundled gasw was read, not the folder


def test_a_second_reproduce_on_a_busy_folder_is_refused(tmp_path):
    config = tiny(tmp_path, epochs=40)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradalign.cli", "reproduce", str(config), "--out", str(run_dir), "--no-progress", "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not ((run_dir / ".lock").exists() and (run_dir / ".lock").read_text()) and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"in use by `gradalign reproduce {config}" in second.stderr and f"pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    with pytest.raises(RunFolderError, match="no config.json"):
        write_report(tmp_path)
    # the lock died with the killed process: the folder is usable again at once
    assert reproduce(config, run_dir, overrides={"train.epochs": 1}, seeds=1, progress=False).summary
    assert (run_dir / ".lock").read_text() == ""
