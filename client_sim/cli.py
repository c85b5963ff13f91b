"""`client-sim`: runs a simulated device fleet against a federated compute server.

Example:
  client-sim --server http://127.0.0.1:8080 --population digits_cnn --devices 100 --rounds 5

Flags are parsed here only and turned into a FleetConfig straight away. A progress line
(rounds, check-ins, uploads, rejections) goes to stderr; a JSON summary to stdout at the end.
"""

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from client_sim import data_sources, partitioning, rounds
from client_sim.fleet import Fleet, FleetConfig
from client_sim.knobs import DeviceKnobs, parse_versions
from client_sim.protocol import RetryPolicy
from task_builder import tff_runtime


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


# `--eval-rounds all`: wait until the eval task ended (it evaluated the final training result).
EVAL_UNTIL_END = -1


def _eval_rounds(text: str) -> int:
    if text == "all":
        return EVAL_UNTIL_END
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 or 'all'")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    d = DeviceKnobs()
    p = argparse.ArgumentParser(prog="client-sim", description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--population", required=True)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=8, help="devices in a session at once")
    p.add_argument("--compute-workers", type=int, default=min(2, os.cpu_count() or 1))
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--rounds", type=int, help="stop when the training task completed N rounds")
    stop.add_argument("--duration", type=_positive, help="stop after this many real seconds")
    p.add_argument(
        "--eval-rounds",
        type=_eval_rounds,
        default=0,
        help="with --rounds: also wait for M eval rounds, or 'all': until the eval task ended",
    )
    p.add_argument("--max-duration", type=_positive, default=3600.0, help="safety stop (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="digits", help="digits | tfrecord:DIR | emnist:DIR")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | natural")
    p.add_argument("--eval-device-fraction", type=float, default=0.2)
    p.add_argument("--time-scale", type=_positive, default=0.01, help="real s per simulated s")
    p.add_argument("--versions", default=None, help="CODE:WEIGHT,... client version mix")
    p.add_argument("--auth-token", default=os.environ.get("FCP_DEVICE_TOKEN"))
    p.add_argument(
        "--auth-tokens-file",
        type=Path,
        help="one device token per line (fcp-server tokens issue --count N); device i uses line i",
    )
    p.add_argument("--admin-key", default=os.environ.get("FCP_ADMIN_API_KEY"))
    p.add_argument("--dropout", type=_probability, default=d.dropout_rate)
    p.add_argument("--crash-after-report", type=_probability, default=d.crash_after_report_rate)
    p.add_argument("--network-errors", type=_probability, default=d.network_error_rate)
    p.add_argument("--duplicate-uploads", type=_probability, default=d.duplicate_upload_rate)
    p.add_argument("--stragglers", type=_probability, default=d.straggler_rate)
    p.add_argument("--compute-median", type=float, default=d.compute_median, help="simulated s")
    p.add_argument("--checkin-interval", type=float, default=d.checkin_interval)
    p.add_argument("--poll-interval", type=_positive, default=1.0, help="task polling (s)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _read_tokens(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    tokens = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return tokens


def _config(args: argparse.Namespace) -> FleetConfig:
    knobs = DeviceKnobs(
        dropout_rate=args.dropout,
        crash_after_report_rate=args.crash_after_report,
        network_error_rate=args.network_errors,
        duplicate_upload_rate=args.duplicate_uploads,
        straggler_rate=args.stragglers,
        compute_median=args.compute_median,
        checkin_interval=args.checkin_interval,
    )
    extra = {"versions": parse_versions(args.versions)} if args.versions else {}
    return FleetConfig(
        population=args.population,
        seed=args.seed,
        concurrency=args.concurrency,
        compute_workers=args.compute_workers,
        time_scale=args.time_scale,
        knobs=knobs,
        auth_token=args.auth_token,
        auth_tokens=_read_tokens(args.auth_tokens_file),
        retry=RetryPolicy(),
        **extra,
    )


@dataclass
class _Watch:
    """What the task poller last saw."""

    tasks: dict[str, dict[str, object]] = field(default_factory=dict)
    last_poll: float = 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `client-sim` console script."""
    args = build_parser().parse_args(argv)
    tff_runtime.install_reaper()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        config = _config(args)
        rng = np.random.default_rng(args.seed)
        source = data_sources.load_source(args.data, rng, max_writers=max(args.devices, 1) * 2)
        spec = partitioning.parse_partition(args.partition)
        devices = data_sources.assign_devices(
            source, args.devices, spec, rng, eval_device_fraction=args.eval_device_fraction
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"client-sim: {e}", file=sys.stderr)
        return 2
    transport = httpx.HTTPTransport(retries=0, limits=httpx.Limits(max_connections=64))
    watcher = httpx.Client(base_url=args.server, timeout=30.0)
    goal = None
    if args.rounds is not None:
        until_end = args.eval_rounds == EVAL_UNTIL_END
        goal = rounds.RoundGoal(args.rounds, 0 if until_end else args.eval_rounds, until_end)
    watch = _Watch()

    def until() -> bool:
        if goal is None or time.monotonic() - watch.last_poll < args.poll_interval:
            return False
        watch.last_poll = time.monotonic()
        try:
            tasks = rounds.list_tasks(watcher, args.population, args.admin_key)
        except rounds.TaskWatchError as e:
            logging.getLogger("client_sim").warning("%s", e)
            return False
        watch.tasks = rounds.progress(tasks)
        return goal.reached(tasks)

    def show(snapshot: dict[str, object]) -> None:
        if args.quiet:
            return
        counts = snapshot["counts"]
        assert isinstance(counts, dict)
        done = {k: v["completed_rounds"] for k, v in watch.tasks.items()}
        rejected = sum(v for k, v in counts.items() if k.startswith("rejections."))
        print(
            f"\rrounds {done} check-ins {counts.get('check_ins', 0)} "
            f"uploads {counts.get('uploads', 0)} rejections {rejected}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    fleet = Fleet(devices, config, transport=transport, base_url=args.server)
    try:
        summary = fleet.run(
            until=until,
            duration=args.duration or args.max_duration,
            poll_interval=min(args.poll_interval, 1.0),
            on_progress=show,
        )
    except KeyboardInterrupt:
        fleet.stop()
        return 130
    finally:
        transport.close()
    if goal is not None:
        try:
            watch.tasks = rounds.progress(
                rounds.list_tasks(watcher, args.population, args.admin_key)
            )
        except rounds.TaskWatchError as e:
            logging.getLogger("client_sim").warning("%s", e)
    watcher.close()
    summary["tasks"] = watch.tasks
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if goal is None or summary["stop_reason"] == "goal reached" else 1


if __name__ == "__main__":
    sys.exit(main())
