"""Tuning on a real PostgreSQL server: two `gradalign tune` workers on one study, one killed
mid-trial. The server is a throw-away cluster (initdb into a temporary folder, a Unix socket
only, no TCP), run as the `postgres` user when the tests run as root; it is stopped and
removed after the test, also on failure. Skipped, with the reason in the summary, only
where no PostgreSQL binaries (initdb, pg_ctl) or no psycopg driver exist."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

TRIALS = 4
HEARTBEAT = 1


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture
def postgres_url():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("NO POSTGRESQL: initdb/pg_ctl not found (PATH or /usr/lib/postgresql/*/bin); "
                    "the PostgreSQL tuning test did not run")
    if importlib_missing("psycopg"):
        pytest.skip('NO POSTGRESQL DRIVER: psycopg is not installed (pip install "gradalign[postgres]")')
    root = Path(tempfile.mkdtemp(prefix="gradalign-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:                      # initdb refuses root: run the server as postgres
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", 54000 + os.getpid() % 1000
    started = False
    try:
        subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                                  "-o", f"-k {root} -p {port} -c listen_addresses=''", "start"],
                       check=True, capture_output=True, timeout=120)
        started = True
        yield f"postgresql://postgres@/postgres?host={root}&port={port}"
    finally:
        if started:
            subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def importlib_missing(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is None


def _worker(url: str, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gradalign.cli", "tune", "gasw", "--arm", "baseline", "--quick",
           "--trials", str(TRIALS), "--storage", url, "--heartbeat", str(HEARTBEAT), "--out", str(out),
           "--set", "data.num_samples=1000", "--set", "train.epochs=4", "--set", "tune.pruning=false",
           "--no-progress"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _trials(url: str):
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://", 1))
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return []
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage).get_trials(deepcopy=False)


def test_two_workers_one_killed_mid_trial(postgres_url, tmp_path):
    a = _worker(postgres_url, tmp_path / "a", tmp_path / "a.log")
    b = _worker(postgres_url, tmp_path / "b", tmp_path / "b.log")
    try:
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and a.poll() is None:
            mine = [t for t in _trials(postgres_url)    # kill A while it trains one of its trials (its
                    if t.state == TrialState.RUNNING and t.params  # parameters drawn: the retry must reuse them)
                    and t.user_attrs.get("worker", "").endswith(f":{a.pid}")]
            if not mine:
                time.sleep(0.05)
                continue
            a.send_signal(signal.SIGKILL)
            a.wait()
            # the trial A held when it died, read after the kill (the one seen may have finished since)
            stale = [t.number for t in _trials(postgres_url)
                     if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(f":{a.pid}")]
            assert stale, "worker A was killed between two trials; nothing was left RUNNING to recover"
            killed = stale[0]
        assert killed is not None, "worker A never ran a trial:\n" + (tmp_path / "a.log").read_text()[-2000:]
        assert b.wait(timeout=180) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()

    trials = _trials(postgres_url)
    by_number = {t.number: t for t in trials}
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS, [(t.number, t.state.name) for t in trials]          # not one more or less
    assert by_number[killed].state == TrialState.FAIL                                     # marked failed ...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE                  # ... retried once,
    assert retries[0].params == by_number[killed].params                                  # same parameters
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    other_fails = [t for t in trials if t.state == TrialState.FAIL and t.number != killed]
    assert all(t.user_attrs.get("surplus") and not t.intermediate_values for t in other_fails)  # never trained
    assert len({tuple(sorted(t.params.items())) for t in finished}) == TRIALS            # none run twice


def test_a_password_in_the_storage_url_is_never_written_or_printed(postgres_url, tmp_path, capsys, caplog):
    """The server trusts local connections, so any password connects; it must appear nowhere."""
    from gradalign.cli import main
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@", 1)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="gradalign"):
        assert main(["tune", "gasw", "--arm", "baseline", "--quick", "--trials", "1", "--storage", url, "--out", str(out),
                     "--set", "data.num_samples=200", "--set", "train.epochs=1", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "postgres:***@" in printed.out
    for text in [printed.out, printed.err, caplog.text] + [p.read_text() for p in out.rglob("*.json")]:
        assert "s3cret-pw" not in text
