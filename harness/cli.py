"""The `libra` command: one sub-command per module, each with its own --help.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
A mistake the user can fix (UserError, ConfigError, DatasetError, CheckpointError, an argument
argparse rejects, a path the system refuses) ends in one line on stderr and exit code 2, never
a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import NoReturn

# name -> module; imported lazily so `libra --help` does not pay for torch, Ray and MLflow.
COMMANDS = {
    "run": "harness.commands.run",
    "report": "harness.commands.report",
    "train": "harness.commands.train",
    "eval": "harness.commands.evaluate",
    "data": "harness.commands.data",
    "bench": "harness.commands.bench",
    "proposals": "harness.commands.proposals",
}

_HELP = {
    "run": "run a study (an ablation grid or an Optuna search) on Ray, tracked in MLflow",
    "report": "turn a study's MLflow runs into tables (markdown, CSV, LaTeX) and plots",
    "train": "train and evaluate one configuration (no Ray, no MLflow)",
    "eval": "evaluate a checkpoint with COCO mAP",
    "data": "datasets: generate the synthetic COCO-format set",
    "bench": "measure what each component costs against the baseline",
    "proposals": "pre-compute proposals for Fast R-CNN (the paper's ablation protocol)",
}

EXIT_CODES = """\
exit codes (every command):
  0    done (for `libra run`: every trial finished or was pruned)
  1    `libra run`: some trials failed after their retries (listed, nothing lost);
       any command: an unexpected error, shown with its traceback (a bug: please report it)
  2    a mistake in the command line or in a file, folder or server it names: one line on
       stderr saying what is wrong and what to do; nothing was started or recorded
  130  interrupted (Ctrl-C); re-run the same command to resume

examples:
  libra run studies/quickstart.yaml --dry-run     # check a study, list its trials
  libra train configs/cpu_small.yaml --dry-run    # check a run configuration
  libra run studies/quickstart.yaml               # run it, then: libra report studies/quickstart.yaml
  libra COMMAND --help                            # every option of a command, with its default
"""


def version() -> str:
    """The installed package's version, else the source tree's (run from a checkout)."""
    from importlib import metadata

    try:
        return metadata.version("libra-harness")
    except metadata.PackageNotFoundError:
        return "0.1.0 (source tree, not installed)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (examples); each option shows its default once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or \
                action.option_strings == [] or isinstance(action.default, list) and not action.default:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the fix is in --help), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _set_formatter(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _set_formatter(child)


def _available() -> dict[str, str]:
    """The commands whose module exists in this installation."""
    found = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="libra",
        description="Libra R-CNN benchmark and ablation harness.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"libra {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in _available().items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=_HELP[name], description=module.__doc__)
        module.add_arguments(cmd)
        _set_formatter(cmd)  # after add_arguments: nested parsers (libra data synth) too
        cmd.set_defaults(_module=module)
    return parser


# The exception types that mean "the user's mistake": (module, class). Looked up only in modules
# already imported (an error of a type whose module never loaded cannot have been raised), so a
# command that fails early never pays for importing torch just to name its error.
USER_ERRORS = (
    ("harness.errors", "UserError"),
    ("detectors.config", "ConfigError"),
    ("detectors.data.errors", "DatasetError"),
    ("detectors.errors", "CheckpointError"),
)


def _is_user_error(err: BaseException) -> bool:
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(err, getattr(module, class_name)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help exits here, before torch is imported below
    args._argv = list(sys.argv[1:] if argv is None else argv)  # what the user typed, for the records
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"libra {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if _is_user_error(err):
            print(f"libra {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.filename is not None:
            # A path the system refuses (read-only, a file where a folder goes, a full disk, ...).
            print(f"libra {args.command}: error: {err.filename}: {err.strerror or err}; check the "
                  "path and its permissions", file=sys.stderr)
            return 2
        raise  # not a mistake we know: a bug, keep its traceback (exit 1)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
