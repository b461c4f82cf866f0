"""Run a study file (an ablation grid, an Optuna search, or a component-cost bench) on Ray,
every trial tracked in MLflow.

By default everything is local and embedded: a Ray cluster on this machine, an MLflow SQLite
store and an Optuna journal under the work dir (./libra-work/<study name>). Add --address to run
the same study on a Ray cluster (keep --work-dir on storage every node can reach), and
--tracking-uri / --optuna-storage for shared servers.

Re-running the same command resumes: finished trials are kept, interrupted ones continue from
their last checkpoint, and MLflow gets no duplicate runs. The run ends with the results table
and the address that opens the study in MLflow's UI, grouped by configuration. Exit code: 0 when every trial finished
(or was pruned), 1 when some failed after their retries, 2 for a mistake in the study or flags.

A tracking server or database that goes away while the study runs is waited for (one line
says so) for up to LIBRA_STORE_WAIT_S seconds (default 600); nothing is lost. Cluster set-up,
shared storage and the faults that are tested: docs/cluster.md.

--dry-run validates everything a trial would reject (every key, type and range of every trial's
config, the grid's points and the search's ranges) and the places the run would write, then
lists the trials and runs nothing. It contacts one server: an http(s) MLflow tracking URI gets
one read-only request to its /health page. It does not open the Optuna database (that would
create its tables), only checks the URL's form and that its driver is installed, and it does
not contact the Ray cluster (--address is checked when the run starts, within 5 s).

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
                        help="Optuna RDB storage URL, e.g. postgresql://optuna:PW@db:5432/optuna "
                             "(default: <work dir>/optuna.journal)")
    parser.add_argument("--max-retries", type=int, metavar="N",
                        help="extra attempts for a trial that raises or whose loss goes NaN "
                             "(default: the study's max_retries)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the study and the run's settings, print the trials and "
                             "their resources, run nothing (see above for what it contacts)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own log (connection attempts, worker start-up)")


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.spec import load_study

    if args.max_retries is not None and args.max_retries < 0:
        raise UserError(f"--max-retries must be >= 0, got {args.max_retries}")
    study = load_study(args.study, args.overrides)
    _preflight(study, args)
    from harness.study import RunOptions, default_work_dir, describe, run_study  # Ray, MLflow: slow

    opts = RunOptions(
        work_dir=args.work_dir or default_work_dir(study),
        address=args.address,
        tracking_uri=args.tracking_uri,
        optuna_storage=args.optuna_storage,
        max_retries=args.max_retries,
        argv=_command_line(args),
        verbose=args.verbose,
    )
    if args.dry_run:
        print(describe(study, opts))
        return 0
    return run_study(study, opts)


def _preflight(study, args: argparse.Namespace) -> None:
    """What a trial or the driver would trip over later, checked before anything starts."""
    import os

    from harness import preflight

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and not args.dry_run:
        # First, before the heavy imports below: a wrong address fails in seconds.
        preflight.check_ray_address(address, "--address" if args.address else "RAY_ADDRESS")

    # The servers next, still before the heavy imports (MLflow, Optuna, torch): a wrong one
    # fails within seconds of the command's start.
    spec = study.spec.tracking
    uri = args.tracking_uri or spec.uri
    if uri:
        source = preflight.value_source("--tracking-uri", args.tracking_uri, "tracking.uri",
                                        args.study, args.overrides)
        preflight.check_tracking_uri(uri, source)
    storage = args.optuna_storage or spec.optuna_storage
    if storage:
        source = preflight.value_source("--optuna-storage", args.optuna_storage,
                                        "tracking.optuna_storage", args.study, args.overrides)
        preflight.check_optuna_storage(storage, source, contact=not args.dry_run)

    from harness.stores import default_work_dir

    if not address:
        # Trials run on this machine, so their data must be here (on a cluster: on the nodes).
        from detectors.data.loader import check_data_paths

        plans = (study.trials() if study.kind == "grid" else
                 [study.bench_trial() if study.kind == "bench" else study.make_trial({}, study.seeds[0])])
        for data in {plan.config.data for plan in plans}:
            check_data_paths(data)
    preflight.writable_dir("--work-dir" if args.work_dir else "the work dir",
                           args.work_dir or default_work_dir(study.name), create=not args.dry_run)


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
