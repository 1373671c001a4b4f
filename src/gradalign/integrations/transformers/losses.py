"""Per-sample losses from a Hugging Face model's logits, the (B,) form the engine needs.

The Trainer's own loss is one scalar over the batch (its tokens), which the engine cannot
split; these are the same losses kept per sample:

    (B, C) logits, sequence classification (the model config's `problem_type`, chosen as
        Hugging Face chooses it: one label -> "regression", integer labels ->
        "single_label_classification", else "multi_label_classification"):
        single label: l_i = CE(logits_i, y_i)
        regression:   l_i = mean_c (logits_ic - y_ic)^2       (MSE, one output: (logits_i - y_i)^2)
        multi label:  l_i = mean_c BCE(logits_ic, y_ic)
    (B, T, V) logits, language modelling and token classification: `ga.token_losses`, each
        sample's token cross-entropies averaged over its own tokens (labels -100 left out);
        causal language models score position t against token t + 1 (`shift`), as HF does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradalign as ga
from gradalign.errors import GradAlignError

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is one of transformers' causal language models (the Trainer's own test:
    its class is in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), so that labels are shifted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def problem_type(model: nn.Module, logits: Tensor, labels: Tensor) -> str:
    """The classification problem as Hugging Face's sequence classifiers decide it."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "problem_type", None)
    if chosen is not None:
        if chosen not in PROBLEM_TYPES:
            raise GradAlignError(f"config.problem_type {chosen!r} is not one of {PROBLEM_TYPES}")
        return chosen
    if logits.shape[1] == 1:
        return "regression"
    if not labels.is_floating_point():
        return "single_label_classification"
    return "multi_label_classification"


def per_sample_losses(logits: Tensor, labels: Tensor | None, *, shift: bool, problem: str | None = None) -> Tensor:
    """(B,) per-sample losses of (B, C) or (B, T, V) logits (module docstring).

    Args:
        logits: the model's output logits (cast to float32 at least).
        labels: (B,) class ids, (B, C) targets, or (B, T) token ids with -100 for positions
            that do not count.
        shift: causal language modelling: position t predicts token t + 1.
        problem: for (B, C) logits, one of PROBLEM_TYPES (default: single label for integer
            labels, else multi label).
    """
    if labels is None:
        raise GradAlignError("the batch has no 'labels': PerSampleTrainer needs them for the per-sample losses "
                             "(or override PerSampleTrainer.compute_per_sample_losses)")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if logits.dim() == 3:
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"token labels must be (B, T) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
        return ga.token_losses(logits, labels, shift=shift)
    if logits.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected (B, C) or (B, T, V) logits and labels for the same B, got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    problem = problem or ("single_label_classification" if not labels.is_floating_point()
                          else "multi_label_classification")
    B = logits.shape[0]
    if problem == "single_label_classification":
        return F.cross_entropy(logits, labels.view(B).long(), reduction="none")
    if problem == "regression":
        return F.mse_loss(logits.view(B, -1), labels.to(logits.dtype).view(B, -1), reduction="none").mean(1)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").view(B, -1).mean(1)
