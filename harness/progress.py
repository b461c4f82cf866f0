"""The driver's progress view: trials done / running / failed / pruned and the best so far.

On a terminal, a tqdm bar whose postfix is the status, with events printed above it; otherwise
(CI, a log file) one timestamped line per event.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, total: int, metric: str, direction: str, *,
                 stream: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.total = total
        self.metric = metric
        self.maximize = direction == "maximize"
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = self.running = self.failed = self.pruned = 0
        self.best: Optional[float] = None
        self.best_label = ""
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="trial", file=stream, dynamic_ncols=True)

    # The events ---------------------------------------------------------------------------
    def skipped(self, count: int, why: str) -> None:
        if count:
            self.done += count
            self._advance(count)
            self._say(f"{count} trial(s) {why}", status=True)

    def started(self, label: str, attempt: int) -> None:
        self.running += 1
        again = f" (attempt {attempt})" if attempt > 1 else ""
        self._say(f"start    {label}{again}")

    def epoch(self, label: str, metrics: dict, epochs: int) -> None:
        shown = f"epoch {int(metrics['epoch'])}/{epochs} loss {metrics.get('loss', math.nan):.3f}"
        if self.metric in metrics:
            shown += f" {self.metric} {metrics[self.metric]:.4f}"
        self._say(f"         {label}: {shown}")

    def retrying(self, label: str, attempt: int, reason: str) -> None:
        self._say(f"retry    {label} (attempt {attempt} failed: {reason})")

    def finished(self, label: str, value: Optional[float], state: str = "finished",
                 ran: bool = True) -> None:
        """A trial ended (finished or pruned); ran=False: answered from an earlier record."""
        if ran:
            self.running -= 1
        if state == "pruned":
            self.pruned += 1
        self.done += 1
        self._advance(1)
        if value is not None and math.isfinite(value) and state == "finished":
            better = self.best is None or (value > self.best if self.maximize else value < self.best)
            if better:
                self.best, self.best_label = value, label
        shown = f" {self.metric} {value:.4f}" if value is not None and math.isfinite(value) else ""
        self._say(f"{state:<9}{label}{shown}", status=True)

    def failed_trial(self, label: str, reason: str, ran: bool = True) -> None:
        if ran:
            self.running -= 1
        self.failed += 1
        self.done += 1
        self._advance(1)
        self._say(f"FAILED   {label}: {reason}", status=True)

    def interrupted(self, count: int) -> None:
        self._say(f"interrupted: {count} running trial(s) will resume from their last checkpoint")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # Rendering ----------------------------------------------------------------------------
    def status(self) -> str:
        best = (f" | best {self.metric} {self.best:.4f} ({self.best_label})"
                if self.best is not None else "")
        return (f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
                f"{self.pruned} pruned{best}")

    def _advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def _say(self, line: str, status: bool = False) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
            self._bar.set_postfix_str(self.status(), refresh=True)
            return
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {line}", file=self.stream, flush=True)
        if status:
            print(f"[{stamp}]   {self.status()}", file=self.stream, flush=True)
