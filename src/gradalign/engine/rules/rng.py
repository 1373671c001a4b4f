"""The RNG state a module's forward draws its dropout masks from, saved before the forward and
restored around a rule's recompute, so that the recompute draws the same masks (attention's
dropout, the dropout between a recurrent network's layers). The global stream is left as it was.
"""
from __future__ import annotations

import contextlib

import torch

RngState = tuple  # (CPU state, (device, CUDA state) or None)


def save_rng(device: torch.device) -> RngState:
    """The CPU generator's state, and the CUDA generator's of `device` when it is a CUDA device."""
    cuda = (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replaying(state: RngState | None):
    """Inside the block the generators start from `state` (nothing changes for None); afterwards
    they are as they were before the block."""
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=[cuda[0]] if cuda else []):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        yield
