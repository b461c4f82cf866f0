"""Kill rate per file (or per group of functions) from a finished `mutmut run` (mutants/*.meta).

    python scripts/mutation_summary.py detectors/losses.py detectors/sampling.py \
        "detectors/engine.py:x_save_checkpoint,x_load_checkpoint,x__resume,x__checkpoint_state"

A file alone counts all its mutants; FILE:PREFIX,... counts only the mutants of functions whose
mangled name starts with one of the prefixes (mutmut names them module.x_function__mutmut_N,
methods module.xǁClassǁmethod__mutmut_N). Killed = killed or timed out; anything else (survived,
no tests, not checked, suspicious) is not killed and is listed, so a partial run cannot pass for
a complete one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KILLED = {1, 3, -24, 24, 152, 255, 36}  # mutmut's killed and timeout exit codes (mutmut.stats)
NAMES = {0: "survived", 33: "no tests", 5: "no tests", None: "not checked", 34: "skipped"}


def summarise(spec: str) -> tuple[int, int, list[str]]:
    path, _, prefixes = spec.partition(":")
    meta = json.loads((Path("mutants") / f"{path}.meta").read_text())["exit_code_by_key"]
    wanted = [p for p in prefixes.split(",") if p]
    rows = {k: v for k, v in meta.items()
            if not wanted or any(k.split(".")[-1].startswith(p) for p in wanted)}
    killed = sum(1 for v in rows.values() if v in KILLED)
    left = [f"{k} ({NAMES.get(v, f'exit {v}')})" for k, v in sorted(rows.items()) if v not in KILLED]
    return killed, len(rows), left


def main(argv: list[str]) -> int:
    for spec in argv:
        killed, total, left = summarise(spec)
        rate = 100.0 * killed / total if total else float("nan")
        print(f"{spec}: {killed}/{total} killed ({rate:.1f}%)")
        for name in left:
            print(f"    {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
