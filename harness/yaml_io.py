"""Reading the YAML files users hand us (study files, run configs), with limits and strict keys.

`yaml.safe_load` constructs no objects, but it still accepts what a study file never needs and
what costs a user minutes to notice: a duplicate key (the last silently wins), an alias bomb (a
1 KB file that expands into gigabytes once anything walks it), a file of tens of megabytes, a
nesting thousands deep, a binary or image file. `load_yaml_file` refuses each in one UserError
line that names the file, and the line and key where it can.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import yaml

from harness.errors import UserError

MAX_FILE_BYTES = 1024 * 1024  # the largest shipped study is ~3 KB; a 1 MB YAML file is a mistake
MAX_ALIASES = 100  # anchors are handy for a few repeated blocks, never for hundreds
MAX_DEPTH = 50  # a study nests ~5 deep (grid -> cases -> mapping)
MAX_EXPANDED_NODES = 100_000  # values after expanding aliases; a study has a few hundred


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and bounds aliases and nesting while composing.

    The bounds are checked on the node graph before any Python object is built, so a bomb is
    refused in microseconds instead of after expanding.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name) at line {mark.line + 1}; "
                               "write the values out instead of referencing an anchor this often")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are not duplicates
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:  # an unhashable key; SafeLoader reports it
                continue
            if key in first_line:
                raise _Refused(f"duplicate key {key!r} at line {line} (first at line "
                               f"{first_line[key]}); keep one of them")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """A limit or rule of `_StrictLoader`; turned into a UserError naming the file."""


def _expanded_size(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes the document has once every alias is expanded (memoised: linear time).

    An alias shares its anchor's node, so a "billion laughs" file is a small graph here; this
    is what anything that walks the loaded value (copying, hashing, printing it) would visit.
    """
    ident = id(node)
    if ident in sizes:
        return sizes[ident]
    if ident in open_nodes:
        raise _Refused(f"an anchor contains an alias of itself (line {node.start_mark.line + 1})")
    open_nodes.add(ident)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
                     for k, v in node.value)
    open_nodes.discard(ident)
    if total > MAX_EXPANDED_NODES:
        raise _Refused(f"expands to more than {MAX_EXPANDED_NODES} values through its aliases "
                       f"(line {node.start_mark.line + 1}); write the values out")
    sizes[ident] = total
    return total


def check_readable_file(path: str, what: str) -> None:
    """A UserError unless `path` is an existing regular file; `what` names it ("--config FILE").

    A folder is reported as a folder, not as missing.
    """
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give the file itself")
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path} (no such file)")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} is not a regular file")


def load_yaml_file(path: str, what: str = "", *, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """The parsed content of a YAML file, within the limits above.

    Args:
        path: the file; reported as given.
        what: a prefix naming the role in messages, e.g. "study file" or "--config".
        max_bytes: refuse larger files (read no further than this).
    Raises:
        UserError: one line naming the file (and the line and key where it can).
    """
    prefix = f"{what} " if what else ""
    check_readable_file(path, what.strip() or "file")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UserError(f"{prefix}{path} is {size / 1e6:.1f} MB; a YAML file here is at most "
                        f"{max_bytes // 1024} KB; is it the right file?")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as err:
        raise UserError(f"{prefix}{path}: cannot read it ({err.strerror or err})") from None
    if b"\x00" in raw:
        raise UserError(f"{prefix}{path} is a binary file, not YAML; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{prefix}{path} is not UTF-8 text (byte {err.start}); is it the right "
                        "file?") from None
    return loads(text, f"{prefix}{path}")


def loads(text: str, shown: str) -> Any:
    """Parse YAML `text` with the strict loader; errors are UserErrors prefixed by `shown`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Refused as err:
        raise UserError(f"{shown}: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{shown}: not valid YAML{_where(err)}: {_problem(err)}") from None
    except RecursionError:
        raise UserError(f"{shown}: nested too deeply to read") from None


def _where(err: yaml.YAMLError) -> str:
    mark: Optional[Any] = getattr(err, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def _problem(err: yaml.YAMLError) -> str:
    return " ".join(str(getattr(err, "problem", None) or err).split())
