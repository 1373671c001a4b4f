"""Per-sample losses for sequence models, in the (B,) form the engine needs."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from gradalign.engine.representations import upcast


def token_losses(logits: Tensor, labels: Tensor, *, shift: bool = False, ignore_index: int = -100) -> Tensor:
    """(B,) per-sample losses: each sample's token cross-entropies averaged over its own tokens.

    l_i = (1 / n_i) sum_{t: labels_it != ignore_index} CE(logits_it, labels_it), n_i the sample's
    counted tokens (padding labelled ignore_index, -100 as in Hugging Face, is left out); a sample
    with no counted token has loss 0. Averaging per sample, not over the batch's tokens, keeps
    every sample's weight 1/B whatever its length (HF's `labels=` loss averages over the batch's
    tokens instead, a scalar, which the engine cannot split).

    Args:
        logits: (B, T, V) scores.
        labels: (B, T) token ids or ignore_index.
        shift: causal language models: position t predicts token t + 1 (as HF shifts `labels=`),
            so logits[:, :-1] are scored against labels[:, 1:].

    Example:
        ```python
        out = gpt2(input_ids=ids, attention_mask=mask)
        losses = ga.token_losses(out.logits, ids.masked_fill(mask == 0, -100), shift=True)
        stats = engine.backward(losses, weights=ga.GASW(2.0))
        ```
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(upcast(logits).transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    counted = (labels != ignore_index).sum(1)
    return per_token.sum(1) / counted.clamp_min(1).to(per_token.dtype)
