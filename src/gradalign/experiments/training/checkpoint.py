"""Checkpoints of one run in progress, so a killed run resumes where it stopped.

    ckpt = RunCheckpoint(run_path.with_suffix(".ckpt"), key)   # key: hash of config, params, seed
    state = ckpt.load(device)       # None: nothing saved, or saved for another key (then removed)
    ckpt.save(state, monitor_state) # after an evaluation; atomic
    ckpt.clear()                    # when the run is finished and written

The folder holds ``state.pt`` (torch.save of the model, optimizer, schedule, every generator,
the global RNGs, the step's own state, the evaluation rows so far and the loop's counters,
written to a temporary name and renamed) and ``gwa/epoch<k>.npz``: each finished GWA epoch's
per-sample ids and scores, written once (to a temporary name, renamed) before the state that
counts it, so a kill at any moment leaves a consistent checkpoint. ``state.pt`` is read with
``torch.load(weights_only=True)``: plain containers and tensors only, never arbitrary objects.
Before it is read, every file's zip CRCs are checked (``state.pt`` and the ``.npz`` files are zip
archives), and after it, the state's structure; a damaged or malformed checkpoint is discarded
with a warning naming the file, and the run starts from the beginning (so it ends exactly as an
uninterrupted one). A state that loads but cannot be applied (a tensor of the wrong shape) is
discarded the same way by the training loop (`discard`).

What the training loop puts into the state and how it resumes (the data order of the epoch in
progress is replayed from its generator state and the batches already trained on are
skipped) is loop.py's; the key (config.arm_hash, the parameters, the seed, the split) is the
runner's: a changed configuration or parameter never resumes a stale checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("gradalign")
STATE = "state.pt"
# the state's entries and their types (what loop.TrainingRun.save writes)
_STATE_TYPES = {"model": dict, "optim": dict, "step": dict, "generators": dict, "order_epoch_start": torch.Tensor,
                "epoch_pos": int, "rng": dict, "rows": list, "samples": int, "next_eval": int, "elapsed": float,
                "monitor": dict, "key": str}


class DamagedCheckpoint(Exception):
    """A checkpoint file that is not what save() wrote (the message names the file and the fault)."""


def _check_zip(path: Path) -> None:
    """DamagedCheckpoint unless `path` is a whole zip archive (every member's CRC intact)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DamagedCheckpoint(f"{path} is damaged ({e})") from None
    if bad is not None:
        raise DamagedCheckpoint(f"{path} is damaged (member {bad} fails its CRC)")


def _check_state(path: Path, state) -> None:
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path} holds a {type(state).__name__}, not a run's state")
    for key, kind in _STATE_TYPES.items():
        if not isinstance(state.get(key), kind):
            raise DamagedCheckpoint(f"{path}: '{key}' is {type(state.get(key)).__name__}, expected {kind.__name__}")
    if not isinstance(state["monitor"].get("epoch_scores"), list):
        raise DamagedCheckpoint(f"{path}: the GWA monitor's state has no list of epoch scores")


def run_key(config_hash: str, params: dict, seed: int) -> str:
    """What a checkpoint must match to be resumed: the arm's configuration hash, its tuned
    parameters and the seed."""
    blob = json.dumps({"config": config_hash, "params": params, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict:
    """The global RNG states: torch (CPU and every CUDA device), numpy and Python's random."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": list(random.getstate()[1]) + [random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    *internal, gauss = state["python"]
    random.setstate((3, tuple(internal), gauss))


class RunCheckpoint:
    """The checkpoint folder of one run, tied to a key that identifies what the run computes."""

    def __init__(self, folder: Path | str, key: str, *, root: Path | str | None = None):
        """root: a folder above `folder` (e.g. <run>/checkpoints) whose emptied subfolders clear() removes."""
        self.folder, self.key = Path(folder), key
        self.root = Path(root) if root is not None else None
        self._saved_epochs = 0          # GWA epoch files the current state.pt counts

    @property
    def exists(self) -> bool:
        return (self.folder / STATE).exists()

    def load(self, device: torch.device | str = "cpu") -> dict | None:
        """The saved state with the monitor's per-epoch arrays filled in, or None.

        A checkpoint made for another key (the configuration or parameters changed) or one
        that cannot be read is removed, with a warning, and None is returned.
        """
        path = self.folder / STATE
        if not path.exists():
            return None
        try:
            _check_zip(path)
            state = torch.load(path, map_location=device, weights_only=True)
            _check_state(path, state)
            if state["key"] != self.key:
                log.warning("%s was saved for other settings; starting the run from the beginning", self.folder)
                self.clear()
                return None
            monitor = state["monitor"]
            arrays = []
            for k in range(len(monitor["epoch_scores"])):
                _check_zip(self.folder / "gwa" / f"epoch{k}.npz")
                with np.load(self.folder / "gwa" / f"epoch{k}.npz", allow_pickle=False) as a:
                    arrays.append((a["ids"], a["scores"]))
            monitor["sample_ids"] = [ids for ids, _ in arrays]
            monitor["sample_scores"] = [scores for _, scores in arrays]
            self._saved_epochs = len(arrays)
        except DamagedCheckpoint as e:
            self.discard(str(e))
            return None
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            self.discard(f"{path} cannot be read ({e})")
            return None
        return state

    def discard(self, why: str) -> None:
        """Remove a checkpoint that cannot be resumed, with a warning that says why."""
        log.warning("%s; discarding the checkpoint and starting the run from the beginning", why)
        self.clear()

    def save(self, state: dict, monitor_state: dict) -> None:
        """Write the state (with `monitor_state`, a GWAMonitor.state_dict()) atomically."""
        gwa = self.folder / "gwa"
        gwa.mkdir(parents=True, exist_ok=True)
        ids, scores = monitor_state["sample_ids"], monitor_state["sample_scores"]
        for k in range(self._saved_epochs, len(ids)):      # epochs the saved state does not count yet
            tmp = gwa / f".epoch{k}.tmp{os.getpid()}.npz"
            np.savez(tmp, ids=ids[k], scores=scores[k])
            os.replace(tmp, gwa / f"epoch{k}.npz")
        monitor = {k: v for k, v in monitor_state.items() if k not in ("sample_ids", "sample_scores")}
        tmp = self.folder / f".{STATE}.tmp{os.getpid()}"
        try:
            torch.save({**state, "key": self.key, "monitor": monitor}, tmp)
            os.replace(tmp, self.folder / STATE)
            self._saved_epochs = len(ids)
        finally:
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint (the run finished, or the checkpoint is stale)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self._saved_epochs = 0
        if self.root is not None and self.root in self.folder.parents:
            for parent in [*self.folder.relative_to(self.root).parents][:-1] + [Path(".")]:
                try:
                    (self.root / parent).rmdir()             # only when empty
                except OSError:
                    break
