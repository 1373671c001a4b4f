"""The `gradalign` command line: demo, reproduce, train, tune, report, list.

    gradalign demo                          # every method on mnist1d, a few minutes on 2 cores
    gradalign reproduce gasw --quick        # tune, train over seeds, report
    gradalign reproduce gaga --trials 20 --seeds 5 --storage sqlite:///studies.db --out runs/gaga
    gradalign report runs/gaga              # rewrite summary.md, summary.json and the plots
    gradalign train gasw --arm gasw --param lr=0.0045 --param gamma=2.09
    gradalign tune gaga --arm gaga --trials 10
    gradalign train gasw --arm gasw --param lr=0.003 --nproc 2     # data parallel, 2 processes
    gradalign train gasw --arm gasw --param lr=0.003 --nproc 2 --shard   # the model sharded (FSDP2)
    gradalign reproduce gvr-cifar100 --data-dir ~/data --device cuda   # CIFAR archives, a GPU

Exit codes: 0 success, 1 a run failed (e.g. every trial diverged, a disk error), 2 a bad
option, configuration or run folder (damaged, or in use by another process), 130 interrupted
(finished trials and runs stay on disk; run the same command again to resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gradalign.errors import ConfigError, GradAlignError

log = logging.getLogger("gradalign")

EPILOG = ("Bundled experiments: gasw, gaga, gwa, gvr, noise (and demo) on mnist1d; gvr-cifar100 and gwa-cifar10 "
          "on CIFAR (--data-dir); `gradalign list` describes them. Any path to a TOML file with the same schema works "
          "too.")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear the progress bars (tqdm.write to stderr)."""

    def emit(self, record):
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


def _setup_logging(quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _pos_int(text: str) -> int:
    value = _nonneg_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _key_value(text: str):
    from gradalign.experiments.config import parse_override
    try:
        return parse_override(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(p: argparse.ArgumentParser, *, experiment: bool = True, threads: bool = True) -> None:
    if threads:
        p.add_argument("--threads", type=_pos_int, default=1,
                       help="torch CPU threads (default 1: the small models gain nothing from more, and a single "
                            "thread stays fast when other processes share the cores)")
    if experiment:
        p.add_argument("--quick", action="store_true",
                       help="apply the experiment's [quick] settings: fewer trials, seeds and samples, so the run "
                            "takes a few minutes on 2 CPU cores")
        p.add_argument("--set", dest="overrides", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="override one configuration value, e.g. --set train.epochs=10 or "
                            "--set arms.gasw.params.gamma=1.5 (values are TOML; repeatable; applied after --quick)")
        p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                       help="folder with the CIFAR 'python version' archives (cifar-10-python.tar.gz, "
                            "cifar-100-python.tar.gz, or their extracted folders), from "
                            "https://www.cs.toronto.edu/~kriz/cifar.html; never downloaded (default: ./data)")
        p.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                       help="where to train: auto (default: a CUDA GPU for the CIFAR experiments when torch sees "
                            "one, else the CPU; mnist1d stays on the CPU), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")


TUNE_EPILOG = """\
Many workers on one study: start the same command anywhere with the same --storage; the
study ends with exactly --trials finished trials per arm, none run twice.

  many machines, one PostgreSQL server (pip install "gradalign[postgres]"):
    createdb -h dbhost gradalign                       # once
    gradalign tune gasw --storage postgresql://user:pw@dbhost/gradalign --out runs/gasw   # on each machine
  a worker that dies (killed, machine lost) stops its heartbeat; after 2 x --heartbeat
  seconds its trial is marked FAIL and retried with the same parameters by another worker.

  several workers on one machine, no server: a journal file (Optuna's JournalFileBackend)
    gradalign tune gasw --storage journal:runs/gasw/journal.log --out runs/gasw   # in each terminal
  (no heartbeat: a killed worker's trial stays RUNNING and is not counted; each worker
  runs until the count is reached, so the total can overshoot by one per extra worker)

Then `gradalign reproduce gasw --storage <the same URL> --out runs/gasw` trains the final
seeds with the tuned parameters (finished trials are not run again).
"""


def _tensorboard_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each final run's evaluations as TensorBoard scalars under <out>/tensorboard/ "
                        "(watch with `tensorboard --logdir <out>/tensorboard`; needs the tensorboard package)")


def _heartbeat(p: argparse.ArgumentParser) -> None:
    from gradalign.experiments.tuning import DEFAULT_HEARTBEAT
    p.add_argument("--heartbeat", type=_pos_int, default=DEFAULT_HEARTBEAT, metavar="SECONDS",
                   help=f"database storages: seconds between a worker's heartbeats (default {DEFAULT_HEARTBEAT}); "
                        "the trial of a worker silent for twice this is failed and retried")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradalign", description="Train and diagnose networks through their per-sample gradients: "
        "run the bundled experiments (GASW/GDSW, GAGA, GWA, GVR on mnist1d; GVR and GWA on CIFAR) and report them.",
        epilog=EPILOG)
    from gradalign import __version__
    parser.add_argument("--version", action="version", version=f"gradalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="compare every method on mnist1d in a few minutes",
                       description="Train baseline Adam, GASW, GDSW, GAGA, the two-view control and GVR on mnist1d "
                       "with fixed settings (no tuning), 2 seeds each; print the table and the plot's path.")
    p.add_argument("--out", type=Path, help="run folder (default: runs/demo, or runs/demo-quick)")
    p.add_argument("--seeds", type=_pos_int, default=None, help="seeds per method (default: 2)")
    _tensorboard_flag(p)
    _common(p)

    p = sub.add_parser("reproduce", help="tune, train over seeds and report one experiment", epilog=EPILOG,
                       description="Run an experiment end to end: tune every arm with Optuna on a validation split "
                       "carved from the training set, train every arm with its best settings on the same seeds, and "
                       "write the report. Re-running with the same --out resumes: finished trials and seeds are skipped, and a "
                       "run in progress continues from its last epoch (its checkpoint).")
    p.add_argument("experiment", help="gasw, gaga, gwa, gvr, noise, gvr-cifar100 or gwa-cifar10, or a path to a TOML "
                   "experiment file")
    p.add_argument("--trials", type=_nonneg_int, help="completed Optuna trials per tuned arm (overrides the config; "
                   "0 skips tuning and uses the fixed settings)")
    p.add_argument("--seeds", type=_pos_int, help="final seeds per arm (overrides the config)")
    p.add_argument("--storage", help="Optuna storage URL, e.g. sqlite:///studies.db or postgresql://... "
                   "(default: sqlite:///<out>/study.db); several workers can share one")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<experiment>, or runs/<experiment>-quick)")
    _tensorboard_flag(p)
    _heartbeat(p)
    _common(p)

    p = sub.add_parser("train", help="train one arm once with given parameters and print its evaluations",
                       epilog=EPILOG)
    p.add_argument("experiment", help="experiment name or TOML path (gives data, model and budget)")
    p.add_argument("--arm", required=True, help="the arm to train, by name (see the experiment's [[arms]])")
    p.add_argument("--param", action="append", type=_key_value, default=[], metavar="NAME=VALUE",
                   help="a parameter of the arm, e.g. --param lr=0.003 --param gamma=2 (repeatable)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed for initialisation and data order (default 0)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test: train on the full training set, evaluate on test (default); "
                        "val: train on the carved training split, evaluate on validation")
    p.add_argument("--csv", type=Path, help="also write every evaluation to this CSV file")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="also write every evaluation as TensorBoard scalars into DIR (watch with `tensorboard "
                        "--logdir DIR`; needs the tensorboard package)")
    p.add_argument("--nproc", type=_pos_int, default=1,
                   help="data-parallel processes on this machine (default 1): relaunches the command with "
                        "torchrun (gloo on CPU, nccl on GPU); every rank trains on its shard of the same global "
                        "batches, only rank 0 prints and writes. Same as `torchrun --nproc_per_node N -m "
                        "gradalign.cli train ...`")
    p.add_argument("--shard", action="store_true",
                   help="with --nproc N (or torchrun): shard the model with FSDP2 (torch.distributed.fsdp."
                        "fully_shard, each child module holding parameters a unit) instead of DDP; every rank "
                        "holds its part of the parameters and optimizer state, the numbers are those of one process")
    _common(p)

    p = sub.add_parser("tune", help="tune arms with Optuna only, print the best parameters",
                       epilog=TUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="experiment name or TOML path")
    p.add_argument("--arm", action="append", default=[], help="arm to tune (repeatable; default: every tuned arm)")
    p.add_argument("--trials", type=_nonneg_int, help="completed trials per arm (overrides the config)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<out>/study.db): "
                   "postgresql://user@host/db for many machines, journal:<file> for many workers on one")
    _heartbeat(p)
    p.add_argument("--out", type=Path, help="folder for the default study.db and tuning.json "
                   "(default: runs/<experiment>, or runs/<experiment>-quick)")
    _common(p)

    p = sub.add_parser("report", help="write summary.md, summary.json and the plots of a run folder",
                       description="Rebuild the report of a run folder made by `gradalign reproduce` (also of an "
                       "unfinished one: whatever seeds exist) and print its tables.")
    p.add_argument("run_dir", type=Path, help="the run folder")
    _common(p, experiment=False, threads=False)

    sub.add_parser("list", help="list the bundled experiments")
    return parser


def _print_tables(result: dict, run_dir: Path) -> None:
    from gradalign.experiments.report import main_table
    for variant, summary in result["variants"].items():
        if variant:
            print(f"\n{variant}")
        print("\n".join(main_table(summary)))
    print(f"\nreport: {run_dir / 'summary.md'}")
    for name in result["plots"]:
        print(f"plot:   {run_dir / name}")


def _cmd_reproduce(args, experiment: str | None = None) -> int:
    from gradalign.experiments.runner import reproduce
    from gradalign.experiments.tuning import DEFAULT_HEARTBEAT
    done = reproduce(experiment or args.experiment, args.out, quick=args.quick, trials=getattr(args, "trials", None),
                     seeds=args.seeds, storage=getattr(args, "storage", None), overrides=dict(args.overrides),
                     progress=not args.no_progress, threads=args.threads,
                     heartbeat=getattr(args, "heartbeat", None) or DEFAULT_HEARTBEAT,
                     data_dir=args.data_dir, device=args.device, tensorboard=args.tensorboard)
    _print_tables(done.summary, done.run_dir)
    return 0


def _cmd_demo(args) -> int:
    return _cmd_reproduce(args, "demo")


def _writable_file(path: Path, option: str) -> None:
    """Refuse an output path that cannot be written, before any training starts."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give the path of a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {path} is not writable: choose another path")


def _cmd_train(args) -> int:
    from gradalign.experiments.method_table import evaluation_columns
    from gradalign.experiments.run_folder import rows_to_csv, write_atomic
    from gradalign.experiments.training import parallel as par
    from gradalign.experiments.runner import run_single
    if args.csv:
        _writable_file(args.csv, "--csv")
    if args.nproc > 1 and not par.launched_by_torchrun():
        return par.relaunch(args.nproc, args.argv)
    parallel = par.init_from_env(sharded=args.shard)
    if args.shard and parallel is None:
        raise ConfigError("--shard shards the model over data-parallel processes: give --nproc N (N > 1) or "
                          "launch with torchrun --nproc_per_node N")
    rank = None if parallel is None else parallel.rank
    try:
        result = run_single(args.experiment, args.arm, dict(args.param), args.seed, quick=args.quick,
                            overrides=dict(args.overrides), eval_split=args.split,
                            progress=not args.no_progress and rank in (None, 0),
                            threads=args.threads, parallel=parallel, data_dir=args.data_dir, device=args.device,
                            tensorboard=args.tensorboard)
    finally:
        if parallel is not None:
            parallel = None                               # it holds the group: par.finish frees it
            par.finish()
    if rank not in (None, 0):                            # only rank 0 prints and writes
        return 0
    keys = ("epoch", "samples", "train_loss", "train_acc", "val_acc", "test_acc", "gwa")
    print("  ".join(f"{k:>10}" for k in keys))
    for row in result.rows:
        print("  ".join(f"{row[k]:>10.4g}" for k in keys))
    print(json.dumps({k: v for k, v in result.summary.items() if k in ("params", "final", "gwa_epoch", "auroc_flipped",
                                                                          "steps", "wall_time")}, default=str))
    if args.csv:
        write_atomic(args.csv, rows_to_csv(result.rows, evaluation_columns()))
        print(f"evaluations: {args.csv}")
    return 0


def _cmd_tune(args) -> int:
    from gradalign.experiments.runner import tune_only
    run_dir, storage, results = tune_only(args.experiment, args.out, arms=args.arm, quick=args.quick,
                                          trials=args.trials, storage=args.storage, overrides=dict(args.overrides),
                                          progress=not args.no_progress, threads=args.threads,
                                          heartbeat=args.heartbeat, data_dir=args.data_dir, device=args.device)
    for key, r in results.items():
        print(f"{key}: best {r['params']} (val acc {r['value']:.4f}; {r['complete']} complete, {r['pruned']} pruned, "
              f"{r['failed']} diverged)")
    print(f"studies in {storage}; best parameters in {run_dir / 'tuning.json'}")
    return 0


def _cmd_report(args) -> int:
    from gradalign.experiments.report import write_report
    _print_tables(write_report(args.run_dir), args.run_dir)
    return 0


def _cmd_list(args) -> int:
    from gradalign.experiments.config import bundled_names, load_config
    for name in bundled_names():
        cfg = load_config(name)
        print(f"{name:13} {cfg.description}")
    return 0


COMMANDS = {"demo": _cmd_demo, "reproduce": _cmd_reproduce, "train": _cmd_train, "tune": _cmd_tune,
            "report": _cmd_report, "list": _cmd_list}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    _setup_logging(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"gradalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except GradAlignError as e:
        print(f"gradalign {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:           # the disk, not the code: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"gradalign {args.command}: failed: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials and runs are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
