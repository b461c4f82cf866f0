"""The Libra components, declared once: everything the harness shows or varies per component.

A component is an on/off switch in `DetectorConfig` plus the names people read it by. The
harness derives every per-component list from `components()`: the short codes in trial labels
("+ibs -bfp +bl1"), the MLflow tags (`libra.flag.<name>`), the report's check-mark columns, the
grid table of `libra run --dry-run` and the bench's variants (baseline, +<name> each, all on).

Adding a fourth component (see docs/architecture.md): its module, its settings dataclass as a
field of `DetectorConfig` (detectors/config.py, with an `enabled` switch), its wiring in
detectors/build.py, and one `Component(...)` line in `_DECLARED` below. Nothing in harness/.

`register` adds a component at run time (a notebook, a plug-in, a test); the switch may be any
bool field of a `DetectorConfig` settings block. This module imports nothing from detectors/,
so config.py can use it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Component:
    """One on/off component of the detector.

    name:     identity; MLflow tag `libra.flag.<name>`, bench variant `+<name>`, report column key
    code:     short label in trial and run names ("ibs": "+ibs" on, "-ibs" off)
    title:    column header in reports and the --dry-run grid table ("IoU-sampling")
    settings: the `DetectorConfig` field holding its settings block (default: `name`)
    switch:   the bool field of that block that turns it on
    """

    name: str
    code: str
    title: str
    settings: Optional[str] = None
    switch: str = "enabled"

    @property
    def block(self) -> str:
        return self.settings or self.name

    @property
    def key(self) -> str:
        """The dotted config key of the switch: "detector.iou_balanced_sampling.enabled"."""
        return f"detector.{self.block}.{self.switch}"

    def enabled(self, detector: Any) -> bool:
        """Whether it is on in `detector` (a DetectorConfig)."""
        return bool(getattr(getattr(detector, self.block), self.switch))

    def turned(self, detector: Any, on: bool) -> Any:
        """`detector` (a frozen DetectorConfig) with this switch set to `on`, all else kept."""
        block = dataclasses.replace(getattr(detector, self.block), **{self.switch: on})
        return dataclasses.replace(detector, **{self.block: block})


_DECLARED = (
    Component("iou_balanced_sampling", code="ibs", title="IoU-sampling"),
    Component("balanced_feature_pyramid", code="bfp", title="BFP"),
    Component("balanced_l1_loss", code="bl1", title="BL1"),
)
_registry: list[Component] = list(_DECLARED)


def components() -> tuple[Component, ...]:
    """Every component, in declaration order (the order of table columns and bench variants)."""
    return tuple(_registry)


def by_key() -> dict[str, Component]:
    """Dotted switch key -> component."""
    return {c.key: c for c in _registry}


def register(component: Component) -> Component:
    """Add `component` after the declared ones; its name, code and key must be new."""
    for other in _registry:
        for attr in ("name", "code", "key"):
            if getattr(other, attr) == getattr(component, attr):
                raise ValueError(f"component {attr} {getattr(component, attr)!r} is already declared")
    _registry.append(component)
    return component


def unregister(name: str) -> None:
    """Remove a registered component (the declared three stay)."""
    if any(c.name == name for c in _DECLARED):
        raise ValueError(f"{name!r} is a declared component; it cannot be removed")
    _registry[:] = [c for c in _registry if c.name != name]


def count_word(n: Optional[int] = None) -> str:
    """How many components there are, in words ("three"): for "all three components off"."""
    n = len(_registry) if n is None else n
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return words[n] if n < len(words) else str(n)
