"""Device choice and mixed precision (device.py), on whatever this machine has."""
import contextlib

import pytest
import torch

from gradalign.errors import ConfigError
from gradalign.experiments.training.device import amp_dtype, autocast, gpu_settings, resolve_device


def test_resolve_device():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", small=True) == torch.device("cpu")          # mnist1d stays on the CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_precision():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None and autocast(cpu, "auto") is contextlib.nullcontext
    assert amp_dtype(cpu, "bf16") is torch.bfloat16                          # on a CPU only when asked
    with autocast(cpu, "bf16")():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision"):
        amp_dtype(cpu, "fp16")
    with gpu_settings(cpu):
        pass
