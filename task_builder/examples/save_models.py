"""Saves the example FunctionalModels: `python -m task_builder.examples.save_models OUT`.

Each model goes to OUT/<name> via `tff.learning.models.save_functional_model`, ready for
`task_builder_client --saved_model` together with the matching configs/*.pbtxt.
"""

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence

import tensorflow_federated as tff

from task_builder import tff_runtime
from task_builder.examples import models

_LOG = logging.getLogger(__name__)


def _with_list_weights(
    model: tff.learning.models.FunctionalModel,
) -> tff.learning.models.FunctionalModel:
    # TFF's saver stores the weights on a tf.Module, which wraps tuples in a wrapt proxy that
    # typing_extensions >= 4.6 (needed by SQLAlchemy 2) cannot inspect while TF 2.14 traces
    # the saver's function (TypeError: __dict__ descriptor ...). Lists are tracked as real
    # list subclasses, so saving list-nested weights works; model_loading re-nests on load.
    trainable, non_trainable = model.initial_weights
    return tff.learning.models.FunctionalModel(
        initial_weights=[list(trainable), list(non_trainable)],
        predict_on_batch_fn=model.predict_on_batch,
        loss_fn=model.loss,
        input_spec=model.input_spec,
    )


def save_functional_model(model: tff.learning.models.FunctionalModel, path: str) -> None:
    """Saves a FunctionalModel so that `model_loading.load_model(path)` reads it back."""
    tff.learning.models.save_functional_model(_with_list_weights(model), path)


def save_example(name: str, out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Builds example `name` and saves it under out_dir/name; returns that directory.

    Raises:
        KeyError: No example has that name.
    """
    if name not in models.EXAMPLES:
        raise KeyError(f"unknown example model {name!r}; known: {sorted(models.EXAMPLES)}")
    target = out_dir / name
    save_functional_model(models.build_functional(models.EXAMPLES[name], seed), str(target))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Saves the chosen (default: all) example models under OUT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=pathlib.Path, help="output directory")
    parser.add_argument("--models", nargs="*", default=sorted(models.EXAMPLES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tff_runtime.install_reaper()
    logging.basicConfig(level=logging.INFO)
    for name in args.models:
        _LOG.info("saved %s", save_example(name, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
