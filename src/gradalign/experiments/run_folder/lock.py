"""The run folder as a place two processes share: creating it, and its advisory lock (`lock`
keeps two processes from training into one folder)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from gradalign.errors import ConfigError, RunFolderError

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks, folders are not locked)
    fcntl = None


def prepare_folder(run_dir: Path, name: str) -> None:
    """Create the run folder, or refuse one that is a file, unwritable, or another experiment's."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder: choose a folder for the results")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {run_dir} ({e.strerror}): choose another --out") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the run folder {run_dir} is not writable: choose another --out or fix its permissions")
    meta = Path(run_dir) / "config.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())["config"]["name"]
        except (OSError, KeyError, json.JSONDecodeError):
            return
        if old != name:
            raise ConfigError(f"{run_dir} holds results of experiment {old!r}, not {name!r}: "
                              "choose another --out folder")


@contextlib.contextmanager
def lock(run_dir: Path, *, exclusive: bool):
    """Hold the folder's advisory lock (<run_dir>/.lock) for the duration.

    exclusive (reproduce): the only process training into the folder; shared (tune): any
    number of tuning workers, none while a reproduce holds it. The lock is the kernel's
    (flock), so a killed process releases it; it does not span machines on NFS: give each
    machine its own --out and share the studies through --storage.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = Path(run_dir) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another gradalign process (e.g. `gradalign tune`)"
            raise RunFolderError(f"the run folder {run_dir} is in use by {holder}: wait for it to finish, "
                                 "or choose another --out") from None
        if exclusive:
            f.seek(0)
            f.truncate()
            f.write(f"`{' '.join(['gradalign'] + sys.argv[1:])}` (pid {os.getpid()} on {socket.gethostname()}, "
                    f"since {time.strftime('%Y-%m-%d %H:%M:%S')})")
            f.flush()
        try:
            yield
        finally:
            if exclusive:
                f.seek(0)
                f.truncate()
                f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
