"""Benchmark figures: our number, the same-run baseline, their ratio, and the target check.

The machines are shared and noisy, so a figure is never an absolute number alone: every
benchmark measures a baseline in the same run (memory bandwidth, a bare WSGI app, TFF) and
reports the ratio next to both absolute values (issue #8).
"""

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Literal

Direction = Literal["higher", "lower"]


@dataclasses.dataclass(frozen=True)
class Figure:
    """One row of the results table."""

    # Benchmark id and what was measured, e.g. "B1" / "aggregation 1.66M x 100".
    benchmark: str
    name: str
    # Our measured value and its unit (e.g. 312.0 "updates/s").
    ours: float
    unit: str
    # The baseline measured in the same run (None when the issue defines none).
    baseline: float | None
    baseline_name: str
    # What is compared to the target: "ratio" (ours / baseline) or "absolute" (ours).
    target_on: Literal["ratio", "absolute"]
    target: float
    # "higher": the compared value must be >= target; "lower": <= target.
    direction: Direction
    # Where each side ran (processes, cores) and anything a reader needs.
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        """Ours divided by the baseline; None without a (non-zero) baseline."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.ours / self.baseline

    @property
    def compared(self) -> float | None:
        """The value checked against the target."""
        return self.ratio if self.target_on == "ratio" else self.ours

    @property
    def passed(self) -> bool | None:
        """Whether the target is met (None when the compared value is missing)."""
        value = self.compared
        if value is None or not math.isfinite(value):
            return None
        return value >= self.target if self.direction == "higher" else value <= self.target

    def as_json(self) -> dict[str, object]:
        """The figure with its derived fields, for the JSON results file."""
        out: dict[str, object] = dataclasses.asdict(self)
        out.update(ratio=self.ratio, passed=self.passed)
        return out


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def _target(f: Figure) -> str:
    sign = ">=" if f.direction == "higher" else "<="
    what = "x" if f.target_on == "ratio" else f" {f.unit}"
    return f"{sign} {f.target:g}{what}"


def _verdict(f: Figure) -> str:
    return {True: "pass", False: "MISS", None: "n/a"}[f.passed]


_HEAD = ("bench", "what", "ours", "baseline", "ratio", "target", "result")


def _rows(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    return [
        (
            f.benchmark,
            f.name,
            f"{_num(f.ours)} {f.unit}",
            f"{_num(f.baseline)} {f.unit}" if f.baseline is not None else "-",
            "-" if f.ratio is None else f"{f.ratio:.3g}x",
            _target(f),
            _verdict(f),
        )
        for f in figures
    ]


def table(figures: Sequence[Figure]) -> str:
    """A fixed-width text table: benchmark, ours, baseline, ratio, target, pass/miss."""
    rows = [_HEAD, *_rows(figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(figures: Sequence[Figure]) -> str:
    """The same table in Markdown (for RESULTS.md)."""
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(figures)]
    return "\n".join(lines)


def write_json(
    path: pathlib.Path, figures: Sequence[Figure], environment: dict[str, object]
) -> None:
    """Writes {"environment": ..., "figures": [...]} to `path`."""
    body = {"environment": environment, "figures": [f.as_json() for f in figures]}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_json(path: pathlib.Path) -> tuple[list[Figure], dict[str, object]]:
    """Reads what `write_json` wrote: the figures and the environment."""
    body = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Figure)}
    figures = [Figure(**{k: v for k, v in row.items() if k in fields}) for row in body["figures"]]
    return figures, dict(body["environment"])
