"""Experiments: configs -> runs -> reports.

    config   TOML experiment files parsed into validated dataclasses (load_config)
    data     mnist1d splits, label noise, batches, augmentation
    models   small classifiers with a .head
    train    one training loop for every arm (train_run)
    tune     Optuna tuning of one arm, resumable (tune_arm)
    runner   an experiment end to end, resumable (reproduce)
    stats    confidence intervals, paired differences, AUROC
    report   summary.md, summary.json, evaluations.csv and plots of a run folder (write_report)

Submodules are imported on use, so `import gradalign.experiments` stays light.
"""
