"""The classifier head, shared by GWA and GVR: its recorded input z and the residual p - y.

For a head logits = W z + b under cross-entropy, the gradient of CE_i with respect to W is
r_i z_i^T with r_i = p_i - y_i (p_i = softmax(logits_i); (sum_c y_ic) p_i - y_i for soft or
multi-hot targets whose rows do not sum to 1) and with respect to b it is r_i,
so both methods need the head's input z from the same forward and r.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def label_distribution(targets: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, C) rows y_i: one-hot for (B,) class indices, or (B, C) soft labels as given."""
    if targets.is_floating_point():
        return targets.to(dtype)
    return F.one_hot(targets.long(), num_classes).to(dtype)


def residual(logits: Tensor, targets: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(B, C) r_i = (sum_c y_ic) softmax(logits_i) - y_i, the gradient of CE_i = -sum_c y_ic
    log softmax(logits_i)_c wrt logits_i, in `dtype` (default: the logits' dtype). For class
    indices and probability targets (rows summing to 1) this is p_i - y_i; multi-hot or
    unnormalised soft targets keep their row sums, as F.cross_entropy does."""
    dtype = dtype or logits.dtype
    y = label_distribution(targets, logits.shape[1], dtype)
    p = torch.softmax(logits.to(dtype), dim=1)
    if targets.is_floating_point():  # rows of y need not sum to 1
        p = p * y.sum(dim=1, keepdim=True)
    return p - y


def is_head_output(logits: Tensor, output: Tensor) -> bool:
    """Whether `logits` are the recorded head `output`: the same memory (a detach or a view), or
    equal values. Methods that read W z_i off the logits (GWA) or differentiate the penalty
    through them (GVR's closed form) need exactly this."""
    if logits.shape != output.shape:
        return False
    if logits.data_ptr() == output.data_ptr() and logits.stride() == output.stride():
        return True
    return bool(torch.equal(logits.detach().to(output.dtype), output.detach()))


class HeadRecorder:
    """A forward hook on an nn.Linear head that keeps its latest input z (B, D) and output.

    Args:
        head: the classifier's final nn.Linear.
        detach: keep detached copies (GWA: nothing held in the graph) or the attached
            tensors (GVR's closed form differentiates through z).
        grad_only: record only forwards run with grad enabled (training forwards), so that
            evaluation under torch.no_grad() leaves the record alone.
    """

    def __init__(self, head: nn.Linear, *, detach: bool, grad_only: bool):
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the head must be an nn.Linear (the classifier's last layer); got {type(head).__name__}")
        self.head, self.detach, self.grad_only = head, detach, grad_only
        self._input: Tensor | None = None
        self._output: Tensor | None = None
        self._forwards = 0
        self._handle = head.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.grad_only and not torch.is_grad_enabled():
            return
        z = args[0]
        self._input, self._output = (z.detach(), output.detach()) if self.detach else (z, output)
        self._forwards += 1

    def peek(self) -> tuple[Tensor | None, Tensor | None]:
        """(latest input z, latest output) since the previous take(), without clearing them."""
        return self._input, self._output

    def take(self) -> tuple[Tensor | None, Tensor | None, int]:
        """(latest input z, latest output, forwards recorded) since the previous take(); clears them."""
        out = self._input, self._output, self._forwards
        self._input, self._output, self._forwards = None, None, 0
        return out

    def remove(self) -> None:
        """Detach the hook and drop the record; the head is as it was. Idempotent."""
        self._handle.remove()
        self.take()
