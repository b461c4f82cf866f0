"""The `libra` sub-commands, one module each (see harness/cli.py)."""
