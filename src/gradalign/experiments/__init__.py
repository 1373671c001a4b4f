"""Experiments: configs -> runs -> reports.

    arms            the method table: one entry per method (parameters, step, report extras)
    steps           training steps: view -> forward -> monitor -> update -> optimizer
    config          TOML experiment files parsed into validated dataclasses (load_config)
    config_sources  bundled names and paths, the --set override language
    checks          value checks shared by config and arms
    data            mnist1d splits, batches, augmentation
    noise           label-noise kinds and levels, the [noise] table, memorisation of flipped labels
    models          small classifiers with a .head
    train           one training loop for every arm (train_run)
    tune            Optuna tuning of one arm, resumable (tune_arm)
    rundir          the run folder: paths, atomic writes, columns, reading results back
    runner          an experiment end to end, resumable (reproduce, tune_only, run_single)
    signals         the "signals" method: the baseline recording per-sample signals per epoch
    detection       signals -> rankings -> AUROC and precision against the flipped labels
    clean           clean-and-retrain: drop the most suspect samples, retrain
    intervals       confidence intervals, paired differences, AUROC
    report          summary.md, summary.json, evaluations.csv of a run folder (write_report)
    noise_report    the report's label-noise section (methods, detection, clean-and-retrain)
    plots           the report's figures

Submodules are imported on use, so `import gradalign.experiments` stays light.
"""
