"""Prometheus text metrics (no client library) and structured JSON logs.

The reference exported timers for check-in and report-result tagged by population and result
(odp-federated-compute.md section 3.1); this module keeps labelled counters and histograms in
process and renders them in the Prometheus text exposition format 0.0.4. Counters are per
process (each gunicorn worker exposes its own, as prometheus_client does without its
multiprocess mode); gauges of tasks and rounds by status are read from the shared database at
scrape time, so they agree across processes.
"""

import bisect
import json
import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence

LabelValues = tuple[str, ...]
DEFAULT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing labelled counter."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        """Adds `amount` (>= 0) to the series with these label values."""
        if amount < 0 or len(label_values) != len(self.labels):
            raise ValueError(f"{self.name}: bad increment {amount} or labels {label_values}")
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        """Current value of one series (0 if never incremented)."""
        with self._lock:
            return self._values.get(label_values, 0.0)

    def render(self) -> Iterable[str]:
        """Exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for values, total in items:
            yield f"{self.name}{_labels(self.labels, values)} {_number(total)}"


class Histogram:
    """A labelled histogram with fixed upper bounds (seconds)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        # Per series: the count of each bucket alone (not cumulative: one increment per
        # observation, found by bisection), then the sum and the count; rendering adds them up.
        self._series: dict[LabelValues, list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values: str) -> None:
        """Records one observation."""
        if len(label_values) != len(self.labels) or math.isnan(value):
            raise ValueError(f"{self.name}: bad observation {value} or labels {label_values}")
        with self._lock:
            series = self._series.setdefault(label_values, [0.0] * (len(self.buckets) + 2))
            index = bisect.bisect_left(self.buckets, value)  # the first bound >= value
            if index < len(self.buckets):
                series[index] += 1
            series[-2] += value
            series[-1] += 1

    def render(self) -> Iterable[str]:
        """Exposition lines (cumulative buckets, +Inf, _sum, _count)."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for values, series in items:
            cumulative = 0.0
            for bound, count in zip(self.buckets, series, strict=False):
                cumulative += count
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labels, values, le)} {_number(cumulative)}"
            inf = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(self.labels, values, inf)} {_number(series[-1])}"
            yield f"{self.name}_sum{_labels(self.labels, values)} {_number(series[-2])}"
            yield f"{self.name}_count{_labels(self.labels, values)} {_number(series[-1])}"


class ServerMetrics:
    """The server's own series."""

    def __init__(self) -> None:
        self.checkins = Counter(
            "fcp_checkins_total", "Device check-ins by result.", ("population", "result")
        )
        self.reports = Counter(
            "fcp_report_results_total", "Device result reports by result.", ("population", "result")
        )
        self.uploads = Counter(
            "fcp_uploads_total", "Update uploads by outcome.", ("population", "outcome")
        )
        self.round_duration = Histogram(
            "fcp_round_duration_seconds", "Seconds from round start to COMPLETED.", ("population",)
        )
        self.requests = Histogram(
            "fcp_http_request_duration_seconds",
            "HTTP request latency by endpoint and status.",
            ("endpoint", "status"),
        )

    def render(self, gauges: Mapping[str, Mapping[LabelValues, float]] | None = None) -> str:
        """Every series plus the given gauges (name -> {(label=value,...): value})."""
        lines: list[str] = []
        for metric in (
            self.checkins,
            self.reports,
            self.uploads,
            self.round_duration,
            self.requests,
        ):
            lines.extend(metric.render())
        for name, series in (gauges or {}).items():
            lines.append(f"# TYPE {name} gauge")
            for labels, value in sorted(series.items()):
                rendered = ",".join(labels)
                lines.append(
                    f"{name}{{{rendered}}} {_number(value)}"
                    if rendered
                    else f"{name} {_number(value)}"
                )
        return "\n".join(lines) + "\n"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        """Renders the record as JSON."""
        doc: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._RESERVED})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(log_format: str, level: str) -> None:
    """Installs one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        if getattr(handler, "_fcp", False):
            return
    handler = logging.StreamHandler()
    handler._fcp = True  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
