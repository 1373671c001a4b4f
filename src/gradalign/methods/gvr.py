"""GVR: gradient variance regularisation between two augmented views of each batch.

Per training step, as in the authors' code:

    S        = one random subset of `subset` batch indices, the same for both views
    g_v      = grad of mean_{i in S} CE(model(x_v)_i, y_i) wrt the chosen layers' parameters
    penalty  = sum over those parameters of |g_1 - g_2|^2        (batch-mean gradients)
    total    = CE(model(x_1), y) + CE(model(x_2), y) + alpha * penalty    (full-batch means)

mode="autograd" (faithful): g_v by torch.autograd.grad with create_graph=True, so
total.backward() differentiates through the penalty (double backprop).
mode="closed_form": for one nn.Linear head logits = W z + b, the batch-mean gradient of the
mean CE over S is
    G_W = (1/n) sum_{i in S} (p_i - y_i) z_i^T   (C, D),     G_b = (1/n) sum_{i in S} (p_i - y_i)
from the logits and the head's input z, both still attached to the graph, so ordinary
autograd differentiates the same penalty without a create_graph pass.
mode="auto": closed_form when `layers` is one nn.Linear whose output is the model's logits
(checked at every step), otherwise autograd.

Reference: the authors' repository (gradient variance regularisation, CIFAR-100 ResNet-18);
the closed form is ours.

Unlike the authors' code, which runs separate forwards on the subset, both modes reuse the
full-batch forward restricted to S. That is the same computation when the model does not
mix samples (no BatchNorm in training mode); with BatchNorm the statistics differ.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradalign.errors import GradAlignError
from gradalign.methods.head import HeadRecorder, is_head_output, residual

PENALTY_MODES = ("auto", "autograd", "closed_form")  # how the penalty's gradients are formed


class GVR:
    """Two-view loss with the GVR gradient-disagreement penalty.

    Example:
        gvr = GVR(alpha=0.01, layers=model.head, subset=32)
        total, info = gvr.loss(model, augment(x), augment(x), y)
        optimizer.zero_grad(); total.backward(); optimizer.step()

    Args:
        alpha: penalty weight >= 0. With alpha = 0 the total is exactly the two-view loss
            (the control arm); the penalty is still computed, without a graph, for info.
        layers: an nn.Module or a list of them; the penalty covers their trainable parameters.
        subset: number of indices in S; the whole batch when the batch is smaller.
        mode: "auto", "autograd" or "closed_form" (one nn.Linear only); see the module docstring.
        generator: torch.Generator for drawing S (the global RNG when None).
    """

    def __init__(self, alpha: float = 0.01, *, layers: nn.Module | list[nn.Module], subset: int = 32,
                 mode: str = "auto", generator: torch.Generator | None = None):
        if not (isinstance(alpha, (int, float)) and 0 <= alpha < float("inf")):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not (isinstance(subset, int) and subset >= 1):
            raise ValueError(f"subset must be a positive integer, got {subset!r}")
        if mode not in PENALTY_MODES:
            raise ValueError(f"mode must be one of {PENALTY_MODES}, got {mode!r}")
        self.layers = [layers] if isinstance(layers, nn.Module) else list(layers)
        if not self.layers or not all(isinstance(m, nn.Module) for m in self.layers):
            raise ValueError(f"layers must be an nn.Module or a non-empty list of them, got {layers!r}")
        single_linear = len(self.layers) == 1 and isinstance(self.layers[0], nn.Linear)
        if mode == "closed_form" and not single_linear:
            raise ValueError("mode='closed_form' needs `layers` to be one nn.Linear (the head); got "
                             f"{[type(m).__name__ for m in self.layers]}: use mode='autograd'")
        self.alpha = float(alpha)
        self.subset = subset
        self.requested_mode = mode
        self.mode = "closed_form" if mode == "closed_form" or (mode == "auto" and single_linear) else "autograd"
        self.generator = generator
        self._trainable_params()  # refuse layers with nothing to penalise now, not at the first step

    def _trainable_params(self) -> list[nn.Parameter]:
        """The penalised parameters: those of `layers` that require grad now, each once."""
        seen, params = set(), []
        for m in self.layers:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError(f"the chosen layers {[type(m).__name__ for m in self.layers]} have no "
                             "trainable parameters: pass the modules whose gradients should agree")
        return params

    def _draw(self, batch_size: int, device: torch.device) -> Tensor:
        if batch_size <= self.subset:
            return torch.arange(batch_size, device=device)
        g = self.generator
        perm = torch.randperm(batch_size, generator=g, device=g.device if g is not None else "cpu")
        return perm[: self.subset].to(device)

    def loss(self, model: nn.Module, x1: Tensor, x2: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        """Total loss of one step and diagnostics.

        Args:
            model: maps (B, ...) inputs to (B, C) logits.
            x1, x2: two views of the batch, the same shape (B, ...).
            y: (B,) class indices or (B, C) probabilities.
        Returns:
            total (scalar tensor, call .backward()), and info = dict(loss1, loss2, penalty as
            floats; logits1, logits2 as detached (B, C) tensors).
        """
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have the same shape, got {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)}")
        if x1.dim() == 0 or x1.shape[0] == 0 or y.dim() == 0 or y.shape[0] != x1.shape[0]:
            raise ValueError(f"expected a non-empty batch with one label per sample, got views "
                             f"{tuple(x1.shape)} and labels {tuple(y.shape)}")
        params = self._trainable_params()
        if self.mode == "closed_form":
            (logits1, z1, out1), (logits2, z2, out2) = self._forward_with_input(model, x1), self._forward_with_input(model, x2)
            if not (is_head_output(logits1, out1) and is_head_output(logits2, out2)):
                self._not_the_head()
        else:
            logits1, logits2 = model(x1), model(x2)
        loss1, loss2 = F.cross_entropy(logits1, y), F.cross_entropy(logits2, y)
        idx = self._draw(x1.shape[0], logits1.device)
        create_graph = self.alpha > 0
        if self.mode == "closed_form":
            with torch.set_grad_enabled(create_graph):
                penalty = self._closed_form_penalty(logits1, z1, logits2, z2, y, idx)
        else:
            penalty = self._autograd_penalty(logits1, logits2, y, idx, params, create_graph)
        total = (loss1 + loss2 + self.alpha * penalty) if create_graph else (loss1 + loss2)
        info = dict(loss1=loss1.item(), loss2=loss2.item(), penalty=penalty.item(),
                    logits1=logits1.detach(), logits2=logits2.detach())
        return total, info

    def _autograd_penalty(self, logits1: Tensor, logits2: Tensor, y: Tensor, idx: Tensor,
                          params: list[nn.Parameter], create_graph: bool) -> Tensor:
        grads = []
        for logits in (logits1, logits2):
            g = torch.autograd.grad(F.cross_entropy(logits[idx], y[idx]), params, create_graph=create_graph,
                                    retain_graph=True, allow_unused=True)
            grads.append(g)
        if all(g is None for g in grads[0] + grads[1]):
            raise GradAlignError("none of the chosen layers' parameters take part in model(x): "
                                 "pass modules of this model")
        penalty = logits1.new_zeros(())
        for p, g1, g2 in zip(params, *grads):
            g1 = torch.zeros_like(p) if g1 is None else g1
            g2 = torch.zeros_like(p) if g2 is None else g2
            penalty = penalty + (g1 - g2).pow(2).sum()
        return penalty

    def _not_the_head(self) -> None:
        """The chosen Linear's output is not the logits: its closed form would be a wrong penalty."""
        if self.requested_mode == "closed_form":
            raise GradAlignError("mode='closed_form' needs `layers` to be the head whose output is the model's "
                                 "logits; this Linear's output is not: use mode='autograd'")
        warnings.warn("GVR: the chosen Linear's output is not the model's logits, so the closed form does not "
                      "apply; mode 'auto' uses autograd from now on", RuntimeWarning, stacklevel=3)
        self.mode = "autograd"

    def _forward_with_input(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits = model(x), and the (attached) input z and output of the Linear layer in that forward."""
        recorder = HeadRecorder(self.layers[0], detach=False, grad_only=False)
        try:
            logits = model(x)
            z, out, forwards = recorder.take()
        finally:
            recorder.remove()
        if forwards != 1:
            raise GradAlignError(f"the Linear layer ran {forwards} times in model(x), expected once: "
                                 "pass the model's head, or use mode='autograd'")
        if z.dim() != 2 or logits.dim() != 2 or z.shape[0] != x.shape[0] or logits.shape[0] != x.shape[0]:
            raise GradAlignError(f"closed form needs (B, D) head inputs and (B, C) logits, got "
                                 f"{tuple(z.shape)} and {tuple(logits.shape)}: use mode='autograd'")
        return logits, z, out

    def _closed_form_penalty(self, logits1: Tensor, z1: Tensor, logits2: Tensor, z2: Tensor,
                             y: Tensor, idx: Tensor) -> Tensor:
        head = self.layers[0]
        r1, r2 = residual(logits1[idx], y[idx]), residual(logits2[idx], y[idx])   # (n, C) p_i - y_i
        n = idx.numel()
        penalty = logits1.new_zeros(())
        if head.weight.requires_grad:
            gw = (r1.T @ z1[idx] - r2.T @ z2[idx]) / n                        # (C, D) G_W1 - G_W2
            penalty = penalty + gw.pow(2).sum()
        if head.bias is not None and head.bias.requires_grad:
            penalty = penalty + (r1 - r2).mean(dim=0).pow(2).sum()            # (C,) G_b1 - G_b2
        return penalty
