"""Plots per-round metrics files of one or more training runs, one PNG per metric.

Reads `{population}/{task}/{round}/s/0/metrics` (flat JSON written by the server after each
round, as ODP's model updater does) from a `file://` or `gs://` blob store, and draws every
numeric metric against the round number. Several runs on one chart compare settings, e.g.
noise multiplier 0.1 vs 0.3 (the ODP guide's monitoring section).

    python tools/plot_metrics.py --out plots \
        z=0.1=file:///runs/a/blobs#my_population/1  z=0.3=file:///runs/b/blobs#my_population/1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from collections.abc import Sequence

import matplotlib.pyplot as plt

from fcp_server.storage.blobs import BlobStore, make_blob_store

_METRICS_NAME = re.compile(r"^(?P<prefix>.+)/(?P<round>\d+)/s/0/metrics$")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run to plot: a label, a blob store URL and the task's blob prefix."""

    label: str
    blob_url: str
    task_prefix: str  # "{population}/{task_id}"


def parse_run(text: str) -> RunSpec:
    """Parses `[label=]BLOB_URL#population/task_id`."""
    url_part, sep, prefix = text.rpartition("#")
    if not sep or not prefix.strip("/") or "/" not in prefix.strip("/"):
        raise argparse.ArgumentTypeError(
            f"run {text!r} must look like [label=]BLOB_URL#population/task_id"
        )
    # The label may itself contain '=' (e.g. "z=0.1"): it ends at the last '=' before the
    # URL's scheme separator.
    scheme_at = url_part.find("://")
    cut = url_part.rfind("=", 0, scheme_at) if scheme_at > 0 else -1
    label, url = (url_part[:cut], url_part[cut + 1 :]) if cut >= 0 else ("", url_part)
    prefix = prefix.strip("/")
    return RunSpec(label=label or prefix, blob_url=url, task_prefix=prefix)


def read_round_metrics(store: BlobStore, task_prefix: str) -> dict[int, dict[str, float]]:
    """Returns {round: {metric: value}} for every round that has a metrics file."""
    rounds: dict[int, dict[str, float]] = {}
    for name in store.list(task_prefix + "/"):
        match = _METRICS_NAME.match(name)
        if not match or match.group("prefix") != task_prefix:
            continue
        values = json.loads(store.get(name))
        if not isinstance(values, dict):
            raise ValueError(f"{name}: metrics must be a JSON object")
        rounds[int(match.group("round"))] = {
            key: float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
    return rounds


def plot_runs(
    runs: dict[str, dict[int, dict[str, float]]], out_dir: pathlib.Path
) -> list[pathlib.Path]:
    """Writes one PNG per metric name found in any run; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({metric for rounds in runs.values() for r in rounds.values() for metric in r})
    written = []
    for metric in names:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rounds in runs.items():
            points = sorted((rnd, vals[metric]) for rnd, vals in rounds.items() if metric in vals)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(metric.rsplit("/", 1)[-1])
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=parse_run, help="[label=]BLOB_URL#population/task_id"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("plots"))
    args = parser.parse_args(argv)
    data = {}
    for run in args.runs:
        rounds = read_round_metrics(make_blob_store(run.blob_url), run.task_prefix)
        if not rounds:
            print(f"no metrics files under {run.blob_url} {run.task_prefix}", file=sys.stderr)
            return 1
        data[run.label] = rounds
    for path in plot_runs(data, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
