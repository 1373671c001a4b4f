"""ga.replace_batchnorm: swap every BatchNorm of a model for a GroupNorm the engine serves.

BatchNorm in training mode normalises each sample with statistics of the whole batch, so
per-sample gradients are undefined and the engine refuses it. GroupNorm normalises each
sample on its own (what Opacus' ModuleValidator.fix does), but its group count matters: a
group that holds a single number normalises to zero, and one of two numbers to +-1. The
input's spatial extent is unknown here, so the count is chosen to hold however small it is:

    BatchNorm1d(C)      GroupNorm(1, C): its input may be (B, C) with no positions at all,
                        so one group normalises all C features together (as LayerNorm).
    BatchNorm2d/3d(C)   GroupNorm(G, C) with G the largest divisor of C that is at most 32
                        and leaves at least 2 channels per group (C = 16 -> 8, 64 -> 32,
                        3 -> 1); with positions, groups hold 2 H W numbers or more.

Opacus picks min(32, C) groups, which gives one channel per group for C <= 32, so a
BatchNorm1d on (B, C) inputs becomes a layer whose output is zero.
The per-channel affine weight and bias (both layers have one) and eps are copied, and the
requires_grad flags, device, dtype and training mode are kept; running statistics are
dropped. Swap before creating the optimizer: the new parameters are new tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("gradalign")
_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Replacement:
    """One swap: where, what was there, what is there now."""

    path: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.path}: {self.old} -> {self.new}"


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor G of num_channels with G <= max_groups and num_channels / G >= 2 (1 when none)."""
    return max((g for g in range(1, min(max_groups, num_channels // 2) + 1) if num_channels % g == 0), default=1)


def _group_norm_for(bn: _BatchNorm, max_groups: int) -> nn.GroupNorm:
    C = bn.num_features
    groups = 1 if isinstance(bn, nn.BatchNorm1d) else group_count(C, max_groups)
    like = bn.weight if bn.affine else bn.running_mean
    gn = nn.GroupNorm(groups, C, eps=bn.eps, affine=bn.affine,
                      device=like.device if like is not None else None, dtype=like.dtype if like is not None else None)
    for name in ("weight", "bias") if bn.affine else ():
        old = getattr(bn, name)
        if old is None:  # BatchNorm(..., bias=False)
            gn.register_parameter(name, None)
            continue
        with torch.no_grad():
            getattr(gn, name).copy_(old)
        getattr(gn, name).requires_grad_(old.requires_grad)
    return gn.train(bn.training)


def replace_batchnorm(model: nn.Module, *, max_groups: int = 32) -> list[Replacement]:
    """Replace every BatchNorm submodule of `model` (in place) by a GroupNorm; return the swaps.

    Each swap is also logged (logger "gradalign", level INFO). A BatchNorm instance used at
    several paths is replaced by one GroupNorm at all of them.

    Example:
        ```python
        for swap in ga.replace_batchnorm(model):
            print(swap)          # layer1.0.bn1: BatchNorm2d(16, ...) -> GroupNorm(8, 16, ...)
        engine = ga.PerSampleGradients(model)
        optimizer = torch.optim.Adam(model.parameters())    # after the swap
        ```

    Raises:
        ValueError: the model itself is a BatchNorm (nothing to swap it in), a lazy BatchNorm
            has not seen its first input, or a BatchNorm1d has one feature (no group count
            avoids a zero output on (B, 1) inputs); nothing is changed then.
    """
    found = [(path, m) for path, m in model.named_modules(remove_duplicate=False) if isinstance(m, _BatchNorm)]
    problems = []
    for path, m in found:
        where = f"{path or '<model>'} ({type(m).__name__})"
        if not path:
            problems.append(f"{where}: the model itself is a BatchNorm; wrap it in a container first")
        elif isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            problems.append(f"{where}: lazy BatchNorm without its size; run one forward first")
        elif isinstance(m, nn.BatchNorm1d) and m.num_features < 2:
            problems.append(f"{where}: one feature, which any GroupNorm normalises to zero on (B, 1) "
                            "inputs; remove or replace this layer by hand")
    if problems:
        raise ValueError("replace_batchnorm changed nothing:\n  " + "\n  ".join(problems))
    new_for: dict[int, nn.GroupNorm] = {}
    swaps = []
    for path, m in found:
        gn = new_for.setdefault(id(m), _group_norm_for(m, max_groups))
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, gn)
        swaps.append(Replacement(path, repr(m), repr(gn)))
        log.info("replace_batchnorm: %s", swaps[-1])
    return swaps
