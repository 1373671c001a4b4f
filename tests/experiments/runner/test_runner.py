"""The runner end to end on a tiny experiment, resuming after interruptions, and the report."""
import csv
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch

import gradalign.experiments.runner.final_runs as final_runs
import gradalign.experiments.tuning.study as tune
from gradalign.errors import ConfigError
from gradalign.experiments.report import write_report
from gradalign.experiments.runner import reproduce

TINY = """
name = "tiny"
description = "a tiny experiment for tests"
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
[experiment]
noise_levels = {noise}
[[arms]]
name = "baseline"
method = "baseline"
search.lr = {{ low = 1e-3, high = 1e-2, log = true }}
[[arms]]
name = "gasw"
method = "gasw"
label = "GASW"
params = {{ lr = 0.003 }}
search.gamma = {{ low = 0.5, high = 3.0 }}
[[arms]]
name = "gaga"
method = "gaga"
params = {{ increment = 16, max_samples = 64 }}
"""


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def tiny(tmp_path, noise="[]"):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(noise=noise))
    return path


def trial_counts(run_dir, name_filter=""):
    storage = f"sqlite:///{run_dir / 'study.db'}"
    out = {}
    for s in optuna.get_all_study_summaries(storage):
        trials = optuna.load_study(study_name=s.study_name, storage=storage).trials
        out[s.study_name.split("/")[-2]] = [t.state.name for t in trials]
    return out


def mtimes(run_dir):
    return {p.relative_to(run_dir): p.stat().st_mtime_ns for p in (run_dir / "runs").rglob("seed*.*")}


def test_end_to_end_layout_and_report(tmp_path):
    done = reproduce(tiny(tmp_path), tmp_path / "run", progress=False)
    run_dir = done.run_dir
    assert done.summary == json.loads((run_dir / "summary.json").read_text())
    for name in ("config.json", "study.db", "evaluations.csv", "summary.md", "summary.json", "comparison.png",
                 "gaga_dynamics.png", "tuning/baseline.json", "tuning/gasw.json"):
        assert (run_dir / name).exists(), name
    for arm in ("baseline", "gasw", "gaga"):
        for seed in (0, 1):
            assert (run_dir / "runs" / arm / f"seed{seed}.csv").exists()
            summary = json.loads((run_dir / "runs" / arm / f"seed{seed}.json").read_text())
            assert summary["seed"] == seed and summary["eval_split"] == "test"
    assert not (run_dir / "tuning" / "gaga.json").exists()           # nothing searched: no study
    with open(run_dir / "evaluations.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2 and {"arm", "seed", "test_acc", "gwa", "samples_per_step"} <= set(rows[0])
    result = json.loads((run_dir / "summary.json").read_text())
    arms = result["variants"][""]["arms"]
    assert set(arms) == {"baseline", "gasw", "gaga"}
    acc = arms["gasw"]["metrics"]["test_acc"]
    assert acc["n"] == 2 and acc["lo"] <= acc["mean"] <= acc["hi"]
    assert set(arms["gasw"]["metrics"]["test_acc"]["diff"]) == {"mean", "lo", "hi", "p_value", "n"}
    assert "diff" not in arms["baseline"]["metrics"]["test_acc"]
    assert set(arms["gasw"]["tuned"]) == {"gamma"} and arms["gasw"]["params"]["lr"] == 0.003
    md = (run_dir / "summary.md").read_text()
    assert "| mode | tuned (or fixed) | test acc | final train loss |" in md and "GASW" in md
    assert "minus baseline" in md and "comparison.png" in md
    assert all(s == ["COMPLETE"] * 2 or s.count("COMPLETE") + s.count("PRUNED") == 2
               for s in trial_counts(run_dir).values())


def test_resume_skips_finished_seeds_and_trials(tmp_path):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "run"
    reproduce(cfg, run_dir, seeds=1, progress=False, report=False)
    before, counts = mtimes(run_dir), trial_counts(run_dir)
    assert len(before) == 3 * 2 and all(len(s) == 2 for s in counts.values())
    reproduce(cfg, run_dir, seeds=2, progress=False)
    after = mtimes(run_dir)
    assert len(after) == 3 * 2 * 2
    assert all(after[p] == t for p, t in before.items())              # seed 0 untouched
    assert trial_counts(run_dir) == counts                            # no trial repeated
    reproduce(cfg, run_dir, trials=3, seeds=2, progress=False, report=False)
    assert all(len(s) == 3 for s in trial_counts(run_dir).values())   # one more trial each


def test_interrupted_trial_and_run_resume(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "run"
    real_tune_train, real_run_train = tune.train_run, final_runs.train_run
    calls = {"tune": 0, "run": 0}

    def interrupt_second_trial(*args, **kw):
        calls["tune"] += 1
        if calls["tune"] == 2:
            raise KeyboardInterrupt
        return real_tune_train(*args, **kw)

    monkeypatch.setattr(tune, "train_run", interrupt_second_trial)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, run_dir, progress=False)
    states = trial_counts(run_dir)["baseline"]
    assert states.count("COMPLETE") == 1 and states.count("FAIL") == 1
    monkeypatch.setattr(tune, "train_run", real_tune_train)

    def interrupt_fourth_run(*args, **kw):
        calls["run"] += 1
        if calls["run"] == 4:                                         # seed 1, first arm
            raise KeyboardInterrupt
        return real_run_train(*args, **kw)

    monkeypatch.setattr(final_runs, "train_run", interrupt_fourth_run)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, run_dir, progress=False)
    counts = trial_counts(run_dir)
    # the interrupted trial was run again as a new trial; the finished one was not repeated
    assert counts["baseline"].count("FAIL") == 1 and len(counts["baseline"]) == 3
    done = mtimes(run_dir)
    assert len(done) == 3 * 2 and not list((run_dir / "runs").rglob("*.tmp*"))
    monkeypatch.setattr(final_runs, "train_run", real_run_train)
    reproduce(cfg, run_dir, progress=False)
    assert trial_counts(run_dir) == counts
    after = mtimes(run_dir)
    assert len(after) == 3 * 2 * 2 and all(after[p] == t for p, t in done.items())


def _kill_when(cmd, ready, timeout=120, delay=0.0):
    """Start `cmd`, SIGKILL it `delay` seconds after ready() first holds (no clean-up can run);
    False if it ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                time.sleep(delay)
                if proc.poll() is not None:
                    return False
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def arm_trials(run_dir, arm):
    storage = f"sqlite:///{run_dir / 'study.db'}"
    name = next(s.study_name for s in optuna.get_all_study_summaries(storage) if f"/{arm}/" in s.study_name)
    return optuna.load_study(study_name=name, storage=storage).trials


def _trials(run_dir, states=("COMPLETE", "PRUNED", "FAIL", "RUNNING")):
    """Trials of every study in those states, read with sqlite3 directly: loading a study through
    Optuna takes longer than a tiny trial, and a poll would see the tuning only after it ended."""
    try:
        with sqlite3.connect(f"file:{run_dir / 'study.db'}?mode=ro", uri=True, timeout=0.1) as db:
            marks = ", ".join("?" * len(states))
            return db.execute(f"SELECT count(*) FROM trials WHERE state IN ({marks})", states).fetchone()[0]
    except sqlite3.Error:  # the database may not exist yet, or be mid-write
        return 0


def _final_progress(run_dir):
    """What the final runs have saved so far: finished runs and checkpoint states (by time)."""
    found = []
    for f in list((run_dir / "runs").rglob("seed*.json")) + list((run_dir / "checkpoints").rglob("state.pt")):
        try:
            found.append((str(f), f.stat().st_mtime_ns))
        except FileNotFoundError:            # a checkpoint removed as its run was written
            pass
    return sorted(found)


def _evaluations(run_dir):
    """Every value of every final run's CSV, wall time aside."""
    out = {}
    for path in sorted((run_dir / "runs").rglob("seed*.csv")):
        with open(path) as f:
            out[str(path.relative_to(run_dir))] = [{k: v for k, v in r.items() if k != "wall_time"}
                                                   for r in csv.DictReader(f)]
    return out


def test_sigkill_at_random_points_ends_with_the_uninterrupted_numbers(tmp_path):
    """The resume promise as written: SIGKILL at random points during tuning (5 times) and during
    the final runs (5 times), then a re-run: every final run's numbers equal an uninterrupted
    run's, no finished trial is repeated and no finished run is written again."""
    cfg = (tiny(tmp_path).read_text().replace("trials = 2", "trials = 4").replace("num_samples = 200", "num_samples = 400")
           .replace("seeds = 2", "seeds = 4"))   # 12 final runs: enough saves that 5 kills land on a fast machine
    (tmp_path / "tiny.toml").write_text(cfg)
    reference = reproduce(tmp_path / "tiny.toml", tmp_path / "reference", progress=False, report=False).run_dir
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradalign.cli", "reproduce", str(tmp_path / "tiny.toml"), "--out", str(run_dir),
           "--no-progress", "-q"]
    rng = random.Random(0)
    kills = []                             # "tuning" or "final runs", where each kill landed
    for _ in range(15):                    # a moment after a trial starts (asked and RUNNING)
        if kills.count("tuning") == 5:
            break
        started = _trials(run_dir)
        if _kill_when(cmd, lambda: _trials(run_dir) > started, delay=rng.uniform(0.0, 0.4)):
            kills.append("tuning" if _trials(run_dir, ("COMPLETE", "PRUNED")) < 8 else "final runs")
    assert kills.count("tuning") == 5, kills
    finished = {(t.number, tuple(t.params.items())) for t in arm_trials(run_dir, "baseline")
                if t.state.name in ("COMPLETE", "PRUNED")}
    for _ in range(15):                    # a moment after a final run saved a checkpoint or finished
        if kills.count("final runs") >= 5:
            break
        progress = _final_progress(run_dir)
        if _kill_when(cmd, lambda: _final_progress(run_dir) != progress, delay=rng.uniform(0.0, 0.1)):
            kills.append("final runs" if _trials(run_dir, ("COMPLETE", "PRUNED")) == 8 else "tuning")
    assert kills.count("final runs") >= 5, kills
    before = mtimes(run_dir)
    reproduce(tmp_path / "tiny.toml", run_dir, progress=False, report=False)
    assert _evaluations(run_dir) == _evaluations(reference)
    assert all(mtimes(run_dir)[p] == t for p, t in before.items())               # finished runs kept
    trials = arm_trials(run_dir, "baseline")
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4      # stale RUNNING ones not counted
    assert finished <= {(t.number, tuple(t.params.items())) for t in trials}     # nor repeated
    ours = [t.params for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    theirs = [t.params for t in arm_trials(reference, "baseline") if t.state.name in ("COMPLETE", "PRUNED")]
    assert ours == theirs                                                         # the same trials, in order


def test_changed_config_retrains_and_other_experiment_is_refused(tmp_path):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "run"
    reproduce(cfg, run_dir, trials=0, seeds=1, progress=False, report=False)
    before = mtimes(run_dir)
    reproduce(cfg, run_dir, trials=0, seeds=1, overrides={"train.epochs": 1}, progress=False, report=False)
    after = mtimes(run_dir)
    assert all(after[p] != t for p, t in before.items())              # stale runs trained again
    rows = list(csv.DictReader(open(run_dir / "runs" / "gaga" / "seed0.csv")))
    assert len(rows) == 1
    with pytest.raises(ConfigError, match="holds results of experiment 'tiny'"):
        reproduce(cfg, run_dir, overrides={"name": "other"}, progress=False)


def test_noise_variants_and_gwa_report(tmp_path):
    cfg = tiny(tmp_path, noise="[0.0, 0.2]")
    run_dir = reproduce(cfg, tmp_path / "run", trials=0, seeds=2, progress=False,
                        overrides={"arms.gasw.train_split": "train"}).run_dir
    assert (run_dir / "runs" / "noise0.2" / "gasw" / "seed1.json").exists()
    for name in ("comparison_noise0.png", "comparison_noise0.2.png", "gwa_noise0.png", "gwa_noise0.2.png"):
        assert (run_dir / name).exists(), name
    result = json.loads((run_dir / "summary.json").read_text())
    noisy = result["variants"]["noise0.2"]["arms"]
    assert "auroc_flipped" in noisy["baseline"]["metrics"] and "auroc_flipped" not in \
        result["variants"]["noise0"]["arms"]["baseline"]["metrics"]
    assert "test_acc@val" in noisy["gasw"]["metrics"] and "test_acc@val" not in noisy["baseline"]["metrics"]
    assert {"test_acc@gwa", "test_acc@last"} <= set(noisy["baseline"]["metrics"])
    md = (run_dir / "summary.md").read_text()
    assert "## Results (symmetric noise 20%)" in md and "AUROC flipped labels" in md


def test_report_on_a_partial_folder(tmp_path):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "run"
    reproduce(cfg, run_dir, trials=0, seeds=1, progress=False, report=False)
    (run_dir / "runs" / "gaga" / "seed0.json").unlink()              # as if interrupted there
    result = write_report(run_dir)
    arms = result["variants"][""]["arms"]
    assert arms["gaga"]["seeds"] == [] and arms["gasw"]["seeds"] == [0]
    with pytest.raises(ConfigError, match="not a run folder"):
        write_report(tmp_path)
