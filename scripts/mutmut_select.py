"""Run mutmut with a test selection other than pyproject's [tool.mutmut] one.

    python scripts/mutmut_select.py tests/harness/test_effects.py -- run --max-children 1 "harness.effects.*"

Arguments before `--` replace `pytest_add_cli_args_test_selection` (files or pytest node ids);
the rest go to mutmut's own command line. Why: mutmut reads its settings only from
pyproject.toml and first runs the whole selection once, traced; the report's statistics need
only a few fast files, and adding them to the shared selection would make every run of the
detectors' files (whose selection includes the slow engine tests) collect both. Every other
setting is pyproject's, so both selections mutate the same code the same way. mutants/ holds the
last run's verdicts only: a run with the other selection re-collects its test map.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: mutmut_select.py TEST [TEST ...] -- MUTMUT-ARGS (e.g. run --max-children 1)",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    tests, rest = argv[:split], argv[split + 1:]
    if not tests:
        print("mutmut_select.py: name at least one test file or node id before --", file=sys.stderr)
        return 2
    from mutmut import configuration

    original = configuration._config_reader

    def reader():
        read = original()
        # The mutant runs are forked from this process, so they inherit the override.
        return lambda key, default: list(tests) if key == "pytest_add_cli_args_test_selection" \
            else read(key, default)

    configuration._config_reader = reader
    configuration._config = None  # the config is cached on first use: read it again
    from mutmut.__main__ import cli

    return cli.main(args=rest, prog_name="mutmut", standalone_mode=False) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
