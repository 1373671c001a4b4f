"""Optuna storages for one machine or many, from the `--storage` URL.

    sqlite:///<path>            the default (<out>/study.db): one machine; no heartbeat, as before
    journal:<path>              Optuna's journal file (JournalFileBackend): several workers on ONE
                                machine (or a shared file system with working locks); no heartbeat
    postgresql://... (mysql://...)  a database server: many machines. Workers send a heartbeat
                                every `heartbeat` seconds while a trial runs; a trial silent for
                                2 x heartbeat (its worker was killed, its machine lost) is marked
                                FAIL and re-queued once more with the SAME parameters
                                (`RetryHeartbeatStaleTrialCallback`, up to 3 times)

`postgresql://` URLs go through psycopg 3 (`pip install "gradalign[postgres]"`), i.e. they are
read as `postgresql+psycopg://` unless psycopg2 is installed or another driver is named.

`check_storage(url)` opens a URL given on the command line before anything is written (a bad URL
is a ConfigError: exit code 2, one line); `masked(url)` is the URL with its password replaced by
``***``, the only form in which a URL is written to a file or printed.
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from gradalign.errors import ConfigError

if TYPE_CHECKING:                   # optuna is imported when a storage is opened: `--help` stays fast
    import optuna
    from optuna.storages import BaseStorage

DEFAULT_HEARTBEAT = 30          # seconds; a dead worker's trial is retried after 2x this
MAX_RETRY = 3                   # retries of one trial whose worker died

_cache: dict[tuple[str, int | None], BaseStorage | str] = {}


def _driver_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg2") is None:
            if importlib.util.find_spec("psycopg") is None:
                raise ConfigError(f"{url.split('@')[-1]!r}: a PostgreSQL storage needs a driver: "
                                  'pip install "gradalign[postgres]" (psycopg 3)')
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def masked(url: str) -> str:
    """The URL with its password (``user:password@``) replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def check_storage(url: str, heartbeat: int | None = DEFAULT_HEARTBEAT) -> None:
    """Open the storage at `url` once; ConfigError saying what is wrong (not a URL, an unknown
    database, a folder that does not exist, a server that cannot be reached) and how to fix it."""
    shown = masked(url)
    hint = "give e.g. sqlite:///studies.db, journal:studies.log or postgresql://user@host/db"
    if url.startswith("journal:"):
        folder = Path(url[len("journal:"):]).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--storage {shown}: the folder {folder} does not exist")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        parsed = make_url(_driver_url(url))
        parsed.get_dialect()
    except NoSuchModuleError:                     # (a subclass of ArgumentError)
        raise ConfigError(f"--storage {shown}: unknown database {parsed.drivername!r}: {hint}") from None
    except ArgumentError:
        raise ConfigError(f"--storage {shown!r} is not a storage URL: {hint}") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        folder = Path(database).expanduser().resolve().parent if database not in ("", ":memory:") else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise ConfigError(f"--storage {shown}: cannot create {database} (the folder {folder} does not exist "
                              "or is not writable)")
        return
    try:
        import optuna
        optuna.get_all_study_summaries(open_storage(url, heartbeat))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the driver's own error, reduced to one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {shown}: cannot connect ({masked(reason)}); check the host, port, user and "
                          "that the server is running") from None


def uses_heartbeat(url: str) -> bool:
    """Whether workers on this storage send heartbeats (database servers only)."""
    return not (url.startswith("sqlite") or url.startswith("journal:"))


def open_storage(url: str, heartbeat: int | None = DEFAULT_HEARTBEAT) -> BaseStorage | str:
    """The storage for `url` (one object per URL and process, so connections are shared)."""
    key = (url, heartbeat)
    if key not in _cache:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage
            _cache[key] = JournalStorage(JournalFileBackend(url[len("journal:"):]))
        elif not uses_heartbeat(url) or heartbeat is None:
            _cache[key] = url                                  # sqlite: exactly as before
        else:
            import optuna
            from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
            for attempt in range(3):     # workers starting together race to create the tables
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        _cache[key] = RDBStorage(
                            _driver_url(url), engine_kwargs={"pool_pre_ping": True},
                            heartbeat_interval=int(heartbeat), grace_period=2 * int(heartbeat),
                            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
                    break
                except Exception:  # noqa: BLE001 - e.g. a duplicate CREATE TABLE; the tables exist now
                    if attempt == 2:
                        raise
                    time.sleep(1.0 + random.random())
    return _cache[key]


def heartbeat_interval(study: optuna.Study) -> int | None:
    """The study's heartbeat interval in seconds, None when its storage has none."""
    storage = study._storage
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark the trials of dead workers FAIL (and re-queue them), where heartbeats are on."""
    if heartbeat_interval(study) is not None:
        import optuna
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def beat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record one heartbeat of the trial now (Optuna finds a RUNNING trial stale only once it has one)."""
    study._storage.record_heartbeat(trial._trial_id)


class Heartbeat:
    """Records the trial's heartbeat every interval while the `with` block runs (what
    Study.optimize does for its trials; we ask and tell by hand)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self.interval = heartbeat_interval(study)
        self.storage, self.trial_id = study._storage, trial._trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a lost connection retries at the next beat
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="optuna-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
