"""Data sets as splits of (inputs, labels, sample ids), on any device.

    splits.py       Split, Splits, assemble (label noise, stratified validation split), batches
    label_noise.py  the noise models (symmetric, pair), noise levels and their variant names
    mnist1d.py      mnist1d generated from a seed, its 1-D augmentation
    cifar.py        CIFAR-10/100 from the python-version archives (never downloaded)
    pipelines.py    model inputs from stored samples: evaluation inputs and random training views
    sources.py      load_splits / data_sizes for an experiment's [data] table, DATASETS
"""
from gradalign.experiments.data.cifar import DataError
from gradalign.experiments.data.mnist1d import NUM_CLASSES, augment, make_mnist1d, split_sizes
from gradalign.experiments.data.pipelines import NORMALIZATION, NORMALIZE, ImagePipeline, Pipeline1d, pipeline_for
from gradalign.experiments.data.sources import DATASETS, data_sizes, load_splits
from gradalign.experiments.data.splits import Split, Splits, assemble, batches, stratified_mask

__all__ = ["DATASETS", "DataError", "ImagePipeline", "NORMALIZATION", "NORMALIZE", "NUM_CLASSES", "Pipeline1d",
           "Split", "Splits", "assemble", "augment", "batches", "data_sizes", "load_splits", "make_mnist1d",
           "pipeline_for", "split_sizes", "stratified_mask"]
