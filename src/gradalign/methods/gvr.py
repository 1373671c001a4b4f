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

Sharded models (FSDP2, fully_shard): both modes give what data parallel gives (each rank's
penalty on its shard, gradients averaged by FSDP's own reduce-scatter in total.backward()).
mode="autograd" differentiates gradients a second time, and that second backward reads the
parameter values FSDP frees after each backward: the units the penalty's gradients all-gather
stay unsharded until total.backward() reshards them (`unsharded_after_backward`).

Reference: the authors' repository (gradient variance regularisation, CIFAR-100 ResNet-18);
the closed form is ours.

Where the subset's logits come from (`subset_forward`):
- "shared" (default): both modes reuse the full-batch forward restricted to S. That is the
  authors' computation whenever the model does not mix samples (no BatchNorm in training mode),
  and it costs no extra forward.
- "separate" (the authors' route, for BatchNorm models): each view's subset goes through its
  own forward, so train-mode BatchNorm normalises it with the SUBSET's batch statistics, as
  in their code. BatchNorm running statistics are left untouched by those penalty forwards
  and by the second view's full-batch forward; only the first view's full-batch forward
  updates them, once per step. (The authors freeze them for the whole step and update them
  with an extra no-grad forward of view 1 after the optimizer step; ours is the same update
  from the pre-step model, without the extra forward.) On a BatchNorm ResNet the two routes'
  penalties differ by ~5% (METHODS.md).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from gradalign.engine.distributed import unsharded_after_backward
from gradalign.errors import GradAlignError
from gradalign.methods.head import HeadRecorder, is_head_output, residual

PENALTY_MODES = ("auto", "autograd", "closed_form")  # how the penalty's gradients are formed
SUBSET_FORWARDS = ("shared", "separate")             # where the subset's logits come from


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Forwards inside leave every BatchNorm's running statistics (and its counter) untouched.

    Train-mode BatchNorm still normalises with the batch's own statistics; it only stops
    tracking them (``track_running_stats = False`` for the duration, then restored).
    """
    changed = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


class GVR:
    """Two-view loss with the GVR gradient-disagreement penalty.

    Example:
        ```python
        gvr = GVR(alpha=0.01, layers=model.head, subset=32)
        total, info = gvr.loss(model, augment(x), augment(x), y)
        optimizer.zero_grad(); total.backward(); optimizer.step()
        ```

    Args:
        alpha: penalty weight >= 0. With alpha = 0 the total is exactly the two-view loss
            (the control arm); the penalty is still computed, without a graph, for info.
        layers: an nn.Module or a list of them; the penalty covers their trainable parameters.
        subset: number of indices in S; the whole batch when the batch is smaller.
        mode: "autograd" (the gradients by torch.autograd.grad with create_graph=True, for any
            layers: double backprop), "closed_form" (one nn.Linear head only: the penalty from
            its logits and inputs, no create_graph pass) or "auto" (default: closed_form when
            `layers` is one nn.Linear whose output is the logits, else autograd).
        generator: torch.Generator for drawing S (the global RNG when None). A CPU generator
            gives the same S on every device (the indices are moved to the data's device).
        subset_forward: "shared" (slice the full-batch logits; default) or "separate" (one
            forward of each view's subset, the authors' route for BatchNorm models).
    """

    def __init__(self, alpha: float = 0.01, *, layers: nn.Module | list[nn.Module], subset: int = 32,
                 mode: str = "auto", generator: torch.Generator | None = None, subset_forward: str = "shared"):
        if not (isinstance(alpha, (int, float)) and 0 <= alpha < float("inf")):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not (isinstance(subset, int) and subset >= 1):
            raise ValueError(f"subset must be a positive integer, got {subset!r}")
        if mode not in PENALTY_MODES:
            raise ValueError(f"mode must be one of {PENALTY_MODES}, got {mode!r}")
        if subset_forward not in SUBSET_FORWARDS:
            raise ValueError(f"subset_forward must be one of {SUBSET_FORWARDS}, got {subset_forward!r}")
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
        self.subset_forward = subset_forward
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
            x1: the first view of the batch, (B, ...).
            x2: the second view, the same shape as x1.
            y: (B,) class indices or (B, C) probabilities.

        Returns:
            total: the scalar loss of the step (call .backward()).
            info: dict(loss1, loss2, penalty as floats; logits1, logits2 as detached (B, C)
                tensors; subset, the (n,) indices of S).
        """
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have the same shape, got {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)}")
        if x1.dim() == 0 or x1.shape[0] == 0 or y.dim() == 0 or y.shape[0] != x1.shape[0]:
            raise ValueError(f"expected a non-empty batch with one label per sample, got views "
                             f"{tuple(x1.shape)} and labels {tuple(y.shape)}")
        params = self._trainable_params()
        create_graph = self.alpha > 0
        # the tensors the forwards use (FSDP2: unsharded ones); under FSDP2 the penalty's gradients leave the
        # units they all-gather unsharded until total.backward(), whose second backward reads those parameters
        second = (unsharded_after_backward(model) if self.requested_mode != "closed_form" and create_graph
                  else contextlib.nullcontext())
        with _forward_parameters(self.layers) as used, second:
            (loss1, loss2, logits1, logits2, idx, penalty) = self._views_and_penalty(model, x1, x2, y, used, params,
                                                                                      create_graph)
        total = (loss1 + loss2 + self.alpha * penalty) if create_graph else (loss1 + loss2)
        info = dict(loss1=loss1.item(), loss2=loss2.item(), penalty=penalty.item(),
                    logits1=logits1.detach(), logits2=logits2.detach(), subset=idx)
        return total, info

    def _views_and_penalty(self, model, x1, x2, y, used, params, create_graph):
        """(loss1, loss2, logits1, logits2, subset, penalty) of one step."""
        if self.subset_forward == "separate":      # subset forwards first: the full-batch view 2 is the
            idx = self._draw(x1.shape[0], x1.device)  # head's last forward, as a GWA monitor expects
            views = self._forward_views(model, x1[idx], x2[idx], frozen=True)
            penalty = self._penalty(*views, y[idx], None, used(params), create_graph)
            (logits1, _), (logits2, _) = self._forward_views(model, x1, x2, frozen=False, record=False)
            loss1, loss2 = F.cross_entropy(logits1, y), F.cross_entropy(logits2, y)
        else:
            (logits1, z1), (logits2, z2) = self._forward_views(model, x1, x2, frozen=False)
            loss1, loss2 = F.cross_entropy(logits1, y), F.cross_entropy(logits2, y)
            idx = self._draw(x1.shape[0], logits1.device)
            penalty = self._penalty((logits1, z1), (logits2, z2), y, idx, used(params), create_graph)
        return loss1, loss2, logits1, logits2, idx, penalty

    def _forward_views(self, model: nn.Module, x1: Tensor, x2: Tensor, *, frozen: bool, record: bool = True):
        """((logits1, z1), (logits2, z2)); z (the head's input) only in closed form with `record`.

        frozen=True: neither forward updates BatchNorm running statistics; frozen=False: only
        the first does (the second view's forward never does in separate mode, see the module
        docstring; in shared mode both do, as before).
        """
        out = []
        for k, x in enumerate((x1, x2)):
            freeze = frozen or (k == 1 and self.subset_forward == "separate")
            with frozen_batchnorm_stats(model) if freeze else contextlib.nullcontext():
                if self.mode == "closed_form" and record:
                    logits, z, head_out = self._forward_with_input(model, x)
                    if not is_head_output(logits, head_out):
                        self._not_the_head()       # mode is autograd from here on: z is not needed
                    out.append((logits, z))
                else:
                    out.append((model(x), None))
        return out

    def _not_the_head(self) -> None:
        """The chosen Linear's output is not the logits: its closed form would be a wrong penalty."""
        if self.requested_mode == "closed_form":
            raise GradAlignError("mode='closed_form' needs `layers` to be the head whose output is the model's "
                                 "logits; this Linear's output is not: use mode='autograd'")
        warnings.warn("GVR: the chosen Linear's output is not the model's logits, so the closed form does not "
                      "apply; mode 'auto' uses autograd from now on", RuntimeWarning, stacklevel=4)
        self.mode = "autograd"

    def _penalty(self, view1, view2, y: Tensor, idx: Tensor | None, params, create_graph: bool) -> Tensor:
        """|g_1 - g_2|^2 from each view's (logits, z), over the rows idx (None: every row)."""
        (logits1, z1), (logits2, z2) = view1, view2
        if self.mode == "closed_form":
            with torch.set_grad_enabled(create_graph):
                return self._closed_form_penalty(logits1, z1, logits2, z2, y, idx)
        return self._autograd_penalty(logits1, logits2, y, idx, params, create_graph)

    def _autograd_penalty(self, logits1: Tensor, logits2: Tensor, y: Tensor, idx: Tensor | None,
                          params: list[nn.Parameter], create_graph: bool) -> Tensor:
        grads = []
        for logits in (logits1, logits2):
            g = torch.autograd.grad(F.cross_entropy(_rows(logits, idx), _rows(y, idx)), params,
                                    create_graph=create_graph, retain_graph=True, allow_unused=True)
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

    def _forward_with_input(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits = model(x), and the (attached) input z and output of the Linear layer in that forward."""
        recorder = HeadRecorder(self.layers[0], detach=False, grad_only=False)
        try:
            logits = model(x)
            z, head_out, forwards = recorder.take()
        finally:
            recorder.remove()
        if forwards != 1:
            raise GradAlignError(f"the Linear layer ran {forwards} times in model(x), expected once: "
                                 "pass the model's head, or use mode='autograd'")
        if z.dim() != 2 or logits.dim() != 2 or z.shape[0] != x.shape[0] or logits.shape[0] != x.shape[0]:
            raise GradAlignError(f"closed form needs (B, D) head inputs and (B, C) logits, got "
                                 f"{tuple(z.shape)} and {tuple(logits.shape)}: use mode='autograd'")
        return logits, z, head_out

    def _closed_form_penalty(self, logits1: Tensor, z1: Tensor, logits2: Tensor, z2: Tensor,
                             y: Tensor, idx: Tensor | None) -> Tensor:
        """The penalty over the head from logits (B, C) and head inputs (B, D), over rows idx."""
        head = self.layers[0]
        r1, r2 = residual(_rows(logits1, idx), _rows(y, idx)), residual(_rows(logits2, idx), _rows(y, idx))  # (n, C)
        n = r1.shape[0]
        penalty = logits1.new_zeros(())
        if head.weight.requires_grad:
            z1, z2 = _rows(z1, idx).to(r1.dtype), _rows(z2, idx).to(r2.dtype)
            gw = (r1.T @ z1 - r2.T @ z2) / n                                  # (C, D) G_W1 - G_W2
            penalty = penalty + gw.pow(2).sum()
        if head.bias is not None and head.bias.requires_grad:
            penalty = penalty + (r1 - r2).mean(dim=0).pow(2).sum()            # (C,) G_b1 - G_b2
        return penalty


@contextlib.contextmanager
def _forward_parameters(layers: list[nn.Module]):
    """Yields `used(params) -> [tensor]`: for each parameter of `layers`, the tensor their latest
    forward registered in its place (FSDP2 registers unsharded tensors for the forward and the
    sharded DTensor parameters outside it; autograd's graph holds the former), else the parameter."""
    slots = {}  # id(parameter) -> (module, local name)
    for layer in layers:
        for module in layer.modules():
            for local, p in module._parameters.items():
                if p is not None:
                    slots.setdefault(id(p), (module, local))
    seen: dict[tuple[int, str], Tensor] = {}

    def hook(module, args):
        for local, p in module._parameters.items():
            if p is not None:
                seen[(id(module), local)] = p
    handles = [m.register_forward_pre_hook(hook) for m in {id(m): m for m, _ in slots.values()}.values()]
    try:
        yield lambda params: [seen.get((id(slots[id(p)][0]), slots[id(p)][1]), p) for p in params]
    finally:
        for h in handles:
            h.remove()


def _rows(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else t[idx]
