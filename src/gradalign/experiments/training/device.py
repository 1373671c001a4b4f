"""The training device, mixed precision, and the GPU settings a run switches on.

    dev = resolve_device("auto")            # cuda when torch sees one (CIFAR), else cpu; "cpu", "cuda:1"
    ctx = autocast(dev, "auto")             # a callable giving the forward's context: bf16 autocast
                                            # on a GPU that supports it, else nothing (float32)
    with gpu_settings(dev): ...             # cudnn.benchmark on for the run (restored afterwards)

Randomness stays on the CPU: every generator of a run (data order, augmentation, GVR subsets)
is a CPU torch.Generator whose draws (a few numbers per image) are moved to the device, so a
run draws the same numbers on any device and its generator states can be checkpointed. On a
GPU, results still differ from the CPU's in the last bits (other kernels, and cudnn.benchmark
picks kernels by timing), so exact resumption is promised on the CPU only.

bf16 needs no loss scaling, so there is no GradScaler (and float16 is not offered).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from gradalign.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str | torch.device | None, *, small: bool = False) -> torch.device:
    """The torch.device for "auto", "cpu", "cuda" or "cuda:N".

    "auto": cuda when torch sees a GPU, else cpu; with ``small`` (the mnist1d experiments, whose
    tiny models run faster on a CPU and whose published numbers are CPU numbers) always cpu.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = "cpu" if name is None else name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use one of {', '.join(DEVICES)} (or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}); "
                              "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:                            # "cuda" -> "cuda:N", so tensors' devices compare equal
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a device and [train] precision; None for float32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    supported = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if not supported:
            raise ConfigError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and supported else None       # auto: float32 on a CPU


def autocast(device: torch.device, precision: str):
    """A callable returning the context the forward runs in (nullcontext for float32)."""
    dtype = amp_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def gpu_settings(device: torch.device):
    """cudnn.benchmark on while a CUDA run trains (fixed input shapes: it picks the fastest kernels)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
