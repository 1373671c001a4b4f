"""The run folder of an experiment: its layout (layout.py), atomic files (files.py), the folder
lock (lock.py), and reading results back (loading.py)."""
from gradalign.experiments.run_folder.files import (check_npz, read_npz, rows_to_csv, write_atomic, write_json,
                                                    write_meta, write_npz, write_run)
from gradalign.experiments.run_folder.layout import (cell, checkpoint_path, default_run_dir, default_storage,
                                                     retrain_path, run_path, tensorboard_path, tuning_path)
from gradalign.experiments.run_folder.loading import (finished_run, load_meta, load_retrained, load_runs, load_tuning,
                                                      read_json, read_rows, read_run)
from gradalign.experiments.run_folder.lock import lock, prepare_folder

__all__ = ["cell", "check_npz", "checkpoint_path", "default_run_dir", "default_storage", "finished_run", "load_meta",
           "load_retrained", "load_runs", "load_tuning", "lock", "prepare_folder", "read_json", "read_npz", "read_rows",
           "read_run", "retrain_path", "rows_to_csv", "run_path", "tensorboard_path", "tuning_path", "write_atomic",
           "write_json", "write_meta", "write_npz", "write_run"]
