"""Reading a run config file (YAML) with `--set dotted.key=value` overrides, for `libra train`."""
from __future__ import annotations

import copy
import os
from typing import Iterable, Mapping

import yaml

from harness.errors import UserError


def load_yaml(path: str) -> dict:
    """Parse a YAML mapping from `path`; a missing file or bad YAML is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values")
    return data


def apply_overrides(mapping: Mapping, assignments: Iterable[str]) -> dict:
    """A deep copy of `mapping` with each 'key=value' assignment applied in order."""
    from harness.spec import parse_override, set_dotted  # the same --set syntax as `libra run`

    result = copy.deepcopy(dict(mapping))
    for text in assignments or ():
        key, value = parse_override(text)
        set_dotted(result, key, value)
    return result


def load_train_config(path: str, assignments: Iterable[str] = ()):
    """A TrainConfig from a YAML file plus overrides, data paths made absolute against the file.

    Errors name the file and the dotted key (ConfigError's message is prefixed with the path).
    """
    from detectors.config import ConfigError, TrainConfig

    mapping = apply_overrides(load_yaml(path), assignments)
    try:
        cfg = TrainConfig.from_dict(mapping)
    except ConfigError as err:
        raise UserError(f"{path}: {err}") from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return type(cfg)(detector=cfg.detector, data=cfg.data.resolved(base_dir), schedule=cfg.schedule)
