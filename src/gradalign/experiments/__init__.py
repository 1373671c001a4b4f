"""Experiments: configs -> runs -> reports, as packages named after concepts, each importing only
from the ones above it in this list (the import contracts in pyproject.toml check it):

    checks         value checks shared by the method table and the configuration
    stats          intervals over seeds, paired differences, AUROC
    models         the classifiers by name (1-D models for mnist1d, image models for CIFAR)
    data           splits, label-noise kinds, mnist1d, CIFAR, input pipelines
    label_noise    mislabel detection, memorisation, clean-and-retrain's drop rules
    method_table   what an arm's method means: parameters, training step, report extras
    run_folder     the run folder: layout, atomic files, lock, reading results back
    config         TOML experiment files parsed into validated dataclasses
    training       the training loop of one arm, checkpoints, device, data parallel
    tuning         Optuna tuning of one arm, storages
    report         summary.md / summary.json / figures of a run folder
    runner         an experiment end to end (reproduce, tune_only, run_single)

ARCHITECTURE.md maps each concept to its files. Subpackages are imported on use, so
`import gradalign.experiments` stays light.
"""
