"""Reading YAML config files and applying `--set dotted.key=value` overrides to nested mappings."""
from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Mapping

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


def parse_assignment(text: str) -> tuple[str, Any]:
    """'a.b.c=value' -> ('a.b.c', value parsed as a YAML scalar/list: 0.5, true, [8, 11], null)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set detector.balanced_l1_loss.alpha=0.3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(mapping: dict, key: str, value: Any) -> None:
    """mapping['a']['b']['c'] = value for key 'a.b.c', creating intermediate mappings."""
    parts = key.split(".")
    node = mapping
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a mapping")
        node = child
    node[parts[-1]] = value


def apply_overrides(mapping: Mapping, assignments: Iterable[str]) -> dict:
    """A deep copy of `mapping` with each 'key=value' assignment applied in order."""
    result = copy.deepcopy(dict(mapping))
    for text in assignments or ():
        key, value = parse_assignment(text)
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
