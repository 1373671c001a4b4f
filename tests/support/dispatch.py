"""Counting what operators do, for tests that prove a pass or a copy is (not) made."""
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class Counts(TorchDispatchMode):
    """Within it, `count` adds weigh(func, args) for every operator call (0: the call does not count)."""

    def __init__(self, weigh: Callable[[object, tuple], int]):
        super().__init__()
        self.weigh, self.count = weigh, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += self.weigh(func, args)
        return func(*args, **(kwargs or {}))
