"""Run a study file (an ablation grid, an Optuna search, or a component-cost bench) on Ray,
every trial tracked in MLflow.

By default everything is local and embedded: a Ray cluster on this machine, an MLflow SQLite
store and an Optuna journal under the work dir (./libra-work/<study name>). Add --address to run
the same study on a Ray cluster (keep --work-dir on storage every node can reach), and
--tracking-uri / --optuna-storage for shared servers.

Re-running the same command resumes: finished trials are kept, interrupted ones continue from
their last checkpoint, and MLflow gets no duplicate runs. Exit code: 0 when every trial finished
(or was pruned), 1 when some failed after their retries, 2 for a mistake in the study or flags.

examples:
  libra run studies/quickstart.yaml
  libra run studies/quickstart.yaml --dry-run
  libra run studies/quickstart.yaml --set schedule.epochs=2 --set resources.concurrency=1
  libra run studies/paper_table2_components.yaml --address auto --work-dir /shared/libra-work/t2 \\
      --tracking-uri http://mlflow:5000 --optuna-storage postgresql://optuna@db/optuna
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("study", metavar="STUDY.yaml", help="the study file (see studies/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the study, value read as YAML; repeatable "
                             "(e.g. schedule.epochs=2, resources.concurrency=1, "
                             "grid.detector.balanced_l1_loss.enabled=[true])")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="where checkpoints, the MLflow store and the Optuna journal live "
                             "(default: ./libra-work/<study name>)")
    parser.add_argument("--address", metavar="ADDR",
                        help="join this Ray cluster (e.g. auto, ray://head:10001); default: "
                             "RAY_ADDRESS if set, else start a local cluster")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking server (default: sqlite:////<work dir>/mlflow.db)")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="Optuna RDB storage URL (default: <work dir>/optuna.journal)")
    parser.add_argument("--max-retries", type=int, metavar="N",
                        help="extra attempts for a trial that raises or whose loss goes NaN "
                             "(default: the study's max_retries)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the trials and their resources, run nothing")


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.spec import load_study
    from harness.study import RunOptions, default_work_dir, describe, run_study

    if args.max_retries is not None and args.max_retries < 0:
        raise UserError(f"--max-retries must be >= 0, got {args.max_retries}")
    study = load_study(args.study, args.overrides)
    opts = RunOptions(
        work_dir=args.work_dir or default_work_dir(study),
        address=args.address,
        tracking_uri=args.tracking_uri,
        optuna_storage=args.optuna_storage,
        max_retries=args.max_retries,
        argv=_command_line(args),
    )
    if args.dry_run:
        print(describe(study, opts))
        return 0
    return run_study(study, opts)


def _command_line(args: argparse.Namespace) -> list[str]:
    """The invocation as the user would type it (recorded on the parent run)."""
    argv = ["libra", "run", args.study]
    for override in args.overrides:
        argv += ["--set", override]
    for flag in ("work_dir", "address", "tracking_uri", "optuna_storage", "max_retries"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv
