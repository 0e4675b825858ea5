"""python -m hico_jax.train --config configs/<file>.py[:arg] --workdir DIR [--config.key=value ...]"""

import json
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from hico_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config (configs/*.py[:arg])", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, TensorBoard events, HF export")
_VERBOSE = flags.DEFINE_bool("verbose", False, "show the libraries' INFO logs (orbax's saves, every skipped "
                             "record) besides the progress bar")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)
  if os.environ.get("HICO_DISTRIBUTED") == "1":
    # Multi-process (Slurm, TPU pod): JAX's own runtime finds the coordinator from the environment.
    jax.distributed.initialize()
  results = trainer.train(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
