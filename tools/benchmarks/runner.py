"""`python -m tools.benchmarks`: runs B1-B7, prints the results table and writes JSON.

Options: `--quick` (small sizes, a smoke test), `--only B1,B3`, `--out results.json`.
Each benchmark runs in a fresh child process: what one leaves behind (TensorFlow's thread
pools and TFF's `worker_binary` after B2, allocator state, caches) cannot slow the next one,
and the child's exit ends every process it started.
B2 and B7 need TensorFlow/TFF (the `ml` extra); the others need only the server install,
plus PostgreSQL on 127.0.0.1:5432 for B4 (`FCP_BENCH_POSTGRES_URL` overrides the admin URL).
"""

import argparse
import importlib
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType

from tools.benchmarks import figures, servers
from tools.benchmarks.figures import Figure

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARKS: dict[str, str] = {
    "B1": "b1_aggregation",
    "B2": "b2_tff_aggregation",
    "B3": "b3_upload_ingest",
    "B4": "b4_checkins",
    "B5": "b5_round_close",
    "B6": "b6_peak_rss",
    "B7": "b7_fleet_vs_tff",
}


def _selection(text: str | None) -> list[str]:
    if not text:
        return list(BENCHMARKS)
    chosen = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")
    return chosen


def _environment(quick: bool) -> dict[str, object]:
    return {
        "quick": quick,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every `with` block stops the servers it started.
    raise SystemExit(128 + signum)


def run_benchmark(key: str, quick: bool) -> list[Figure]:
    """Imports the benchmark's module and runs it."""
    module = importlib.import_module(f"tools.benchmarks.{BENCHMARKS[key]}")
    run: Callable[[bool], list[Figure]] = module.run
    return run(quick)


def run_in_child(key: str, quick: bool) -> list[Figure]:
    """Runs one benchmark in a child process of its own and returns its figures.

    Raises:
        RuntimeError: The benchmark failed, or its process ended without writing figures.
    """
    with tempfile.TemporaryDirectory(prefix="fcp-bench-") as tmp:
        out = pathlib.Path(tmp) / "figures.json"
        cmd = [sys.executable, "-m", "tools.benchmarks", "--only", key, "--out", str(out)]
        cmd += ["--child", *(["--quick"] if quick else [])]
        # A session of its own: stopping it stops every server and process it started.
        child = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            code = child.wait()
        finally:  # this process was stopped (SIGTERM, Ctrl-C): stop the child's session too
            if child.poll() is None:
                servers.stop_group(child)
        if not out.exists():
            raise RuntimeError(f"{key}'s process exited with code {code} and wrote no figures")
        results, environment = figures.read_json(out)
        errors = environment.get("errors") or {}
        if isinstance(errors, dict) and key in errors:
            raise RuntimeError(str(errors[key]))
        return results


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected benchmarks; exit code 1 if any of them failed to run."""
    parser = argparse.ArgumentParser(prog="python -m tools.benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--only", type=_selection, default=None, help="e.g. B1,B3")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark-results.json"))
    # Internal: run the selection in this process and skip the table (a parent's child).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    selected: list[str] = args.only or list(BENCHMARKS)
    environment = _environment(args.quick)
    environment["isolation"] = "one child process per benchmark"
    results: list[Figure] = []
    errors: dict[str, str] = {}
    for key in selected:
        started = time.monotonic()
        if not args.child:
            print(f"== {key} ({BENCHMARKS[key]})", flush=True)
        try:
            run = run_benchmark if args.child else run_in_child
            results.extend(run(key, args.quick))
        except Exception as e:  # one broken benchmark must not hide the others' figures
            errors[key] = f"{type(e).__name__}: {e}"
            print(f"   failed: {errors[key]}", file=sys.stderr, flush=True)
            traceback.print_exc()
        if not args.child:
            print(f"   {time.monotonic() - started:.0f} s", flush=True)
    environment["errors"] = errors
    if args.child:
        figures.write_json(args.out, results, environment)
        return 1 if errors else 0
    print()
    print(figures.table(results))
    for f in results:
        print(f"  {f.benchmark} {f.name}: {f.notes}")
    figures.write_json(args.out, results, environment)
    print(f"\nresults written to {args.out}")
    return 1 if errors else 0
