"""The `libra` command: one sub-command per module, each with its own --help.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
A mistake the user can fix (UserError, ConfigError, DatasetError) ends in one line on stderr and
exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> module; imported lazily so `libra --help` does not pay for torch, Ray and MLflow.
COMMANDS = {
    "run": "harness.commands.run",
    "report": "harness.commands.report",
    "train": "harness.commands.train",
    "eval": "harness.commands.evaluate",
    "data": "harness.commands.data",
    "bench": "harness.commands.bench",
}

_HELP = {
    "run": "run a study (an ablation grid or an Optuna search) on Ray, tracked in MLflow",
    "report": "turn a study's MLflow runs into tables (markdown, CSV, LaTeX) and plots",
    "train": "train and evaluate one configuration (no Ray, no MLflow)",
    "eval": "evaluate a checkpoint with COCO mAP",
    "data": "datasets: generate the synthetic COCO-format set",
    "bench": "measure what each component costs against the baseline",
}


def _available() -> dict[str, str]:
    """The commands whose module exists in this installation."""
    found = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libra",
        description="Libra R-CNN benchmark and ablation harness.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in _available().items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=_HELP[name], description=module.__doc__)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help exits here, before torch is imported below

    from detectors.config import ConfigError
    from detectors.data.errors import DatasetError
    from harness.errors import UserError

    try:
        return int(args._module.run(args) or 0)
    except (UserError, ConfigError, DatasetError) as err:
        print(f"libra {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"libra {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
