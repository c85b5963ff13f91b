"""`fcp-models`: lists a task's model versions and exports one for serving.

    fcp-models list --blob_url URL --population P --task T
    fcp-models export --saved_model M --blob_url URL --population P --task T
                      [--round N] --out DIR [--overwrite]

`list` reads only the blob listing of the FCP server's store (`file://` or `gs://`, the layout
of `fcp_server.services.blob_paths`) and prints one row per round. `export` loads the saved
FunctionalModel, reads round N's checkpoint (default: the latest) and writes DIR/saved_model
(signature `serve`) and DIR/model.tflite (`task_builder.export`). Errors go to stderr with exit
code 1; bad flags exit with 2 (argparse).
"""

import argparse
import sys
from collections.abc import Sequence

from fcp_server.storage import blobs
from task_builder import model_versions, tff_runtime
from task_builder.errors import TaskBuilderError

_MAX_SHOWN_ROUNDS = 100_000


def _task_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"task id must be an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"task id must be positive, got {value}")
    return value


def _round(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"round must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"round must be >= 0, got {value}")
    return value


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blob_url", required=True, help="server blob store: file:///dir or gs://b/p")
    p.add_argument("--population", required=True, help="population name of the task")
    p.add_argument("--task", required=True, type=_task_id, help="task id")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the `list` and `export` subcommands."""
    p = argparse.ArgumentParser(prog="fcp-models", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_task_flags(sub.add_parser("list", help="list the rounds that have a checkpoint"))
    ex = sub.add_parser("export", help="write DIR/saved_model and DIR/model.tflite")
    _add_task_flags(ex)
    ex.add_argument("--saved_model", required=True, help="saved FunctionalModel: path or gs://")
    ex.add_argument("--round", type=_round, default=None, help="round to export (default latest)")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    return p.parse_args(argv)


def format_versions(versions: Sequence[model_versions.ModelVersion]) -> str:
    """One tab-separated row per version, with a header; '-' for a missing blob."""
    rows = ["round\tcheckpoint\tclient_checkpoint\tmetrics"]
    for v in versions[-_MAX_SHOWN_ROUNDS:]:
        cells = (v.checkpoint, v.client_checkpoint, v.metrics)
        rows.append("\t".join([str(v.round), *(c or "-" for c in cells)]))
    return "\n".join(rows) + "\n"


def _list(store: blobs.BlobStore, args: argparse.Namespace) -> int:
    versions = model_versions.list_versions(store, args.population, args.task)
    if not versions:
        sys.stderr.write(f"no checkpoint of task {args.population}/{args.task} in the store\n")
        return 1
    sys.stdout.write(format_versions(versions))
    return 0


def _export(store: blobs.BlobStore, args: argparse.Namespace) -> int:
    # TensorFlow loads only for export, so `list` stays fast.
    from task_builder import export, model_loading

    model = model_loading.load_model(args.saved_model)
    version, exported = export.export_version(
        model,
        store,
        args.population,
        args.task,
        args.out,
        round_num=args.round,
        overwrite=args.overwrite,
    )
    flex = " (needs the Flex delegate: select TF ops)" if exported.tflite_select_tf_ops else ""
    sys.stdout.write(
        f"exported round {version.round} of {args.population}/{args.task}\n"
        f"saved_model: {exported.saved_model_dir}\ntflite: {exported.tflite_path}{flex}\n"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the process exit code."""
    args = parse_args(argv)
    # Loading a FunctionalModel runs TFF, which leaves a worker_binary child behind.
    tff_runtime.install_reaper()
    try:
        store = blobs.make_blob_store(args.blob_url)
    except blobs.BlobStoreError as e:
        sys.stderr.write(f"fcp-models: {e}\n")
        return 1
    try:
        return _list(store, args) if args.command == "list" else _export(store, args)
    except (TaskBuilderError, blobs.BlobStoreError) as e:
        sys.stderr.write(f"fcp-models {args.command} failed: {e}\n")
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
