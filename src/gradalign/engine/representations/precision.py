"""Precision of the statistics: factors captured in bfloat16/float16 are upcast to float32, and
statistics are read with autocast off, so every product and sum runs in float32 (float64 for a
float64 model)."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """A floating tensor narrower than float32 (bfloat16, float16) as float32; others as they are."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def full_precision(device: torch.device | None):
    """A context with autocast off on `device` (where it is on): statistics read inside an
    autocast region are still computed in float32 from the upcast factors."""
    if device is None or device.type not in ("cpu", "cuda", "xpu", "mps", "hpu") or not autocast_on(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def in_full_precision(method):
    """Decorate a method of an object with a `_device` so that it runs with autocast off there."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with full_precision(self._device):
            return method(self, *args, **kwargs)
    return wrapper
