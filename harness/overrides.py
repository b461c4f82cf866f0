"""Reading a run config file (YAML) with `--set dotted.key=value` overrides, for `libra train`."""
from __future__ import annotations

import copy
import os
from typing import Iterable, Mapping

from harness.errors import UserError
from harness.yaml_io import load_yaml_file


def load_yaml(path: str, what: str = "config") -> dict:
    """Parse a YAML mapping from `path`; a missing file or bad YAML is a UserError naming it."""
    data = load_yaml_file(path, what)  # limits, duplicate keys: harness/yaml_io.py
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
