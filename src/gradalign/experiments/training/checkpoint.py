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
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("gradalign")
STATE = "state.pt"


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
            state = torch.load(path, map_location=device, weights_only=True)
            if state.get("key") != self.key:
                log.warning("%s was saved for other settings; starting the run from the beginning", self.folder)
                self.clear()
                return None
            monitor = state["monitor"]
            arrays = [np.load(self.folder / "gwa" / f"epoch{k}.npz") for k in range(len(monitor["epoch_scores"]))]
            monitor["sample_ids"] = [a["ids"] for a in arrays]
            monitor["sample_scores"] = [a["scores"] for a in arrays]
            self._saved_epochs = len(arrays)
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            log.warning("%s cannot be read (%s); starting the run from the beginning", self.folder, e)
            self.clear()
            return None
        return state

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
