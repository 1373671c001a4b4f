"""The experiments' classifiers by name (build.py): 1-D models for mnist1d (one_d.py) and image
models for CIFAR (vision.py). Every model has ``.head`` (its final nn.Linear) and
``module_groups()``."""
from gradalign.experiments.models.build import MODELS, MODELS_1D, build_model
from gradalign.experiments.models.vision import VISION_MODELS

__all__ = ["MODELS", "MODELS_1D", "VISION_MODELS", "build_model"]
