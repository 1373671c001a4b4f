"""Label noise after training: which samples look mislabelled and what a model memorised.

    detection.py      per-sample signals (loss, gradient norm, cosines, AUM, forgetting, GWA) ->
                      suspicion scores -> AUROC and precision against the flipped labels
    memorisation.py   the final model's accuracy on the flipped samples; per-sample label records
    dropping.py       clean-and-retrain's drop rules: which samples a rule removes

The noise models themselves (flipping labels) are part of the data (data/label_noise.py).
"""
from gradalign.experiments.label_noise.detection import (SIGNAL_NAMES, SIGNALS, Signal, detect, forgetting_events,
                                                         most_suspect, precision_at_k, scores)
from gradalign.experiments.label_noise.dropping import DropRule, digest, drop_rules, dropped
from gradalign.experiments.label_noise.memorisation import label_records, memorisation

__all__ = ["DropRule", "SIGNALS", "SIGNAL_NAMES", "Signal", "detect", "digest", "drop_rules", "dropped",
           "forgetting_events", "label_records", "memorisation", "most_suspect", "precision_at_k", "scores"]
