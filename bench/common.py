"""Shared helpers for the benchmarks: timing with interleaving, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Imported first by every script: CPU unless told otherwise, and the repository root importable.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object], block: Callable[[object], object] = lambda x: x) -> float:
    """Wall seconds of one call, after the result is ready (`block` waits for async work)."""
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def interleave(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, float]]:
    """Runs each contender once per round, `repeats` rounds, so machine noise hits all alike.

    Each contender returns the seconds of one timed call. Returns median/min/max per name.
    """
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(fn())
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for k, v in samples.items()}


def print_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """Prints (and returns) a plain-text table of `rows` restricted to `columns`."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def machine_info() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
