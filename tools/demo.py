"""The main job: train a real model with DP through the whole system, on embedded defaults.

Steps, each the real command a user would run:
1. save the example digits CNN as a TFF FunctionalModel;
2. migrate a SQLite database and start the server under gunicorn plus a worker process
   (blobs in a local directory);
3. `task_builder_client --local` builds the TRAINING_AND_EVAL task (FIXED_GAUSSIAN DP) and
   registers it with the server;
4. `client-sim` runs the simulated fleet over HTTP until the task completes;
5. exports the final model for serving, plots the metrics, and prints a summary.

Everything it starts is stopped before it returns. Run it through `tools/demo.sh`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _run(cmd: list[str], env: dict[str, str], log: pathlib.Path | None = None) -> None:
    """Runs one step; its output goes to the terminal (or to a log file) and must succeed."""
    print("$ " + " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        return
    with log.open("ab") as out:
        code = subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        ).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(
            f"{cmd[0]} failed (exit {code}); last lines of {log}:\n" + "\n".join(tail)
        )


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/ready", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def _background(
    cmd: list[str], env: dict[str, str], log: pathlib.Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Starts a long-running process and always stops it when the block ends."""
    print("$ " + " ".join(cmd) + f"  (background, log: {log.name})", flush=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _metrics_files(
    blob_dir: pathlib.Path, population: str, task_id: int
) -> dict[int, dict[str, float]]:
    from fcp_server.storage.blobs import make_blob_store

    store = make_blob_store(blob_dir.as_uri())
    prefix = f"{population}/{task_id}/"
    out: dict[int, dict[str, float]] = {}
    for name in store.list(prefix):
        parts = name[len(prefix) :].split("/")
        if len(parts) == 4 and parts[1:] == ["s", "0", "metrics"] and parts[0].isdigit():
            out[int(parts[0])] = json.loads(store.get(name))
    return out


def _tasks(url: str, population: str) -> list[dict[str, object]]:
    req = urllib.request.Request(
        f"{url}/taskmanagement/v1/population/{population}/tasks",
        headers={"Accept": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = json.loads(resp.read())
    tasks = body.get("tasks", [])
    assert isinstance(tasks, list)
    return tasks


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="run directory (default runs/demo-<time>)")
    parser.add_argument(
        "--config", type=pathlib.Path, default=ROOT / "configs/digits_demo_task.pbtxt"
    )
    parser.add_argument("--model", default="digits_cnn", help="example model to train")
    parser.add_argument(
        "--devices", type=int, default=600, help="simulated devices (20%% hold eval data only)"
    )
    parser.add_argument(
        "--time-scale", default="0.02", help="fleet: real seconds per simulated second"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.monotonic()
    out = (args.out or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{out / 'fcp.sqlite'}"
    blob_dir = out / "blobs"
    blob_dir.mkdir(exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "FCP_ENV": "demo",
        "FCP_DATABASE_URL": db_url,
        "FCP_BLOB_URL": blob_dir.as_uri(),
        "FCP_LOG_FORMAT": "text",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    print(f"FCP demo: run directory {out}")

    _step("1/5 save the example model as a TFF FunctionalModel")
    model_dir = out / "model"
    _run(
        [
            str(BIN / "python"),
            "-m",
            "task_builder.examples.save_models",
            str(model_dir),
            "--models",
            args.model,
        ],
        env,
        out / "build.log",
    )

    _step("2/5 start the server (gunicorn, SQLite, local blobs) and a worker")
    _run([str(BIN / "fcp-server"), "db", "upgrade"], env, out / "server.log")
    server_env = {
        **env,
        "FCP_BIND": f"127.0.0.1:{port}",
        "FCP_WEB_WORKERS": "2",
        "FCP_EMBEDDED_WORKER": "false",
        "FCP_WORKER_INTERVAL_SECONDS": "0.3",
    }
    gunicorn = [str(BIN / "gunicorn"), "-c", str(ROOT / "configs/gunicorn.conf.py")]
    with (
        _background(gunicorn, server_env, out / "server.log") as server,
        _background([str(BIN / "fcp-server"), "worker"], server_env, out / "worker.log"),
    ):
        _wait_ready(url, server)
        print(f"server ready at {url} (dashboard: {url}/dashboard)")

        _step("3/5 build and register the task (task_builder_client --local)")
        _run(
            [
                str(BIN / "task_builder_client"),
                "--local",
                "--saved_model",
                str(model_dir / args.model),
                "--task_config",
                str(args.config),
                "--server",
                url,
            ],
            env,
        )
        tasks = _tasks(url, _population(args.config))
        training = next(t for t in tasks if "trainingInfo" in t.get("info", {}))  # type: ignore[operator]
        rounds = int(training["totalIteration"])  # type: ignore[call-overload]
        population = str(training["populationName"])

        _step(f"4/5 run the simulated fleet: {rounds} rounds, then the final model's eval")
        _run(
            [
                str(BIN / "client-sim"),
                "--server",
                url,
                "--population",
                population,
                "--devices",
                str(args.devices),
                "--rounds",
                str(rounds),
                "--eval-rounds",
                "all",
                "--time-scale",
                args.time_scale,
                # Sessions mostly sleep (simulated compute, retry windows); the TFLite work
                # itself runs in the fleet's compute processes.
                "--concurrency",
                "64",
                "--seed",
                str(args.seed),
            ],
            env,
        )

    _step("5/5 export, plots and summary")
    train_id = int(training["taskId"])  # type: ignore[call-overload]
    eval_task = next((t for t in tasks if "evaluationInfo" in t.get("info", {})), None)  # type: ignore[operator]
    _run(
        [
            str(BIN / "fcp-models"),
            "export",
            "--saved_model",
            str(model_dir / args.model),
            "--blob_url",
            blob_dir.as_uri(),
            "--population",
            population,
            "--task",
            str(train_id),
            "--out",
            str(out / "export"),
        ],
        env,
        out / "export.log",
    )
    runs = [f"train={blob_dir.as_uri()}#{population}/{train_id}"]
    if eval_task is not None:
        runs.append(f"eval={blob_dir.as_uri()}#{population}/{eval_task['taskId']}")
    _run(
        [
            str(BIN / "python"),
            str(ROOT / "tools/plot_metrics.py"),
            "--out",
            str(out / "plots"),
            *runs,
        ],
        env,
        out / "plots.log",
    )

    train_metrics = _metrics_files(blob_dir, population, train_id)
    last_train = train_metrics[max(train_metrics)]
    summary = {
        "rounds": len(train_metrics),
        "epsilon_spent": last_train.get("server/dp/epsilon_spent"),
        "train_accuracy": last_train.get("server/client_work/train/sparse_categorical_accuracy"),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    if eval_task is not None:
        eval_metrics = _metrics_files(blob_dir, population, int(str(eval_task["taskId"])))
        if eval_metrics:
            last_eval = eval_metrics[max(eval_metrics)]
            summary["eval_accuracy"] = last_eval.get(
                "server/client_work/eval/sparse_categorical_accuracy"
            )
            summary["eval_of_training_round"] = last_eval.get("server/eval/training_round")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nSummary")
    for key, value in summary.items():
        print(f"  {key:24s} {value}")
    print(f"  outputs                  {out} (blobs/, export/, plots/, summary.json)")
    return 0


def _population(config: pathlib.Path) -> str:
    for line in config.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("population_name:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise ValueError(f"{config} has no population_name")


if __name__ == "__main__":
    sys.exit(main())
