"""The embedded default: synthetic videos and still pictures -> a TFDS build -> the tiny model through the stage
sequence -> held-out accuracy per task next to chance -> an HF export. README's main command.

  python -m hico_jax.train.default [--workdir runs/tiny] [--stages stage1,stage2] [--steps 200]

Everything it needs it makes if missing: the synthetic train and eval sets, their shards and the Qwen2
tokenizer file. Each stage starts from the previous stage's run directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

from absl import app, flags, logging
import yaml

from hico_jax.data import synthetic, synthetic_images, tfds_longvid
from hico_jax.data.tokenizer import build_qwen2_tokenizer_json

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "where the stage run directories go")
_STAGES = flags.DEFINE_list("stages", ["stage1", "stage2"], "stages to run, in order")
_STEPS = flags.DEFINE_integer("steps", None, "steps per stage (default: the config's)")
_STAGE_CONFIG = flags.DEFINE_string("stage_config", "configs/tiny_synthetic.py", "config file with get_config(stage)")
_TRAIN_VIDEOS = flags.DEFINE_integer("train_videos", 2000, "synthetic training videos")
_EVAL_VIDEOS = flags.DEFINE_integer("eval_videos", 500, "synthetic held-out videos")
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", None, "synthetic training pictures (default: the config "
                                     "module's IMAGES)")
_EVAL_IMAGES = flags.DEFINE_integer("eval_images", None, "synthetic held-out pictures (default: the config "
                                    "module's IMAGES)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "show the libraries' INFO logs (orbax's saves, every skipped "
                             "record) besides the progress bar")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the model's initialisation and of the training data's order "
                             "(the synthetic videos themselves stay the same)")


def load_config_module(path: str):
  """A stage-config file (configs/*.py) as a module: its get_config(stage), DATA and SYNTHETIC."""
  spec = importlib.util.spec_from_file_location("stage_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _joined_yaml(root: str, name: str, parts) -> bool:
  """root/<name>.yaml listing every dataset of the data.yaml files `parts` (inside root), their paths made
  relative to root: videos and images in one TFDS build, one split each. True when the file changed."""
  entries = []
  for part in parts:
    base = os.path.relpath(os.path.dirname(os.fspath(part)), root)
    with open(part) as f:
      for entry in yaml.safe_load(f)["datasets"]:
        entries.append({**entry, "json_path": os.path.join(base, entry["json_path"]),
                        "data_root": os.path.join(base, entry.get("data_root", ""))})
  text = yaml.safe_dump({"datasets": entries}, sort_keys=False)
  path = os.path.join(root, f"{name}.yaml")
  if os.path.isfile(path) and open(path).read() == text:
    return False
  with open(path, "w") as f:
    f.write(text)
  return True


def prepare_data(root: str, train_videos: int, eval_videos: int, size: int, train_images: int = 0,
                 eval_images: int = 0, **options):
  """Synthetic train/eval sets (videos; and still images, hico_jax.data.synthetic_images, when asked for), their
  TFDS builds (what tools/build_shards.py makes, under shards/ and eval_shards/, videos and images together)
  and the tokenizer, each made only if missing. `options` go to synthetic.make_dataset (fps and duration
  ranges)."""
  start = time.perf_counter()
  for name, count, images, seed in (("train", train_videos, train_images, 0), ("eval", eval_videos, eval_images, 1)):
    parts = [synthetic.make_dataset(os.path.join(root, name), num_videos=count, seed=seed, size=size, **options)]
    if images:
      parts.append(synthetic_images.make_image_dataset(os.path.join(root, f"{name}_images"), num_images=images,
                                                       seed=seed, size=size))
    changed = _joined_yaml(root, name, parts)
    out = os.path.join(root, "shards" if name == "train" else "eval_shards")
    if changed or not all(part.reused for part in parts) or not tfds_longvid.is_prepared(out):
      shutil.rmtree(out, ignore_errors=True)   # new media, or a build of the old shard format or a crashed one
      report = tfds_longvid.build(os.path.join(root, f"{name}.yaml"), out, log=lambda _: None, quiet=True)
      print(f"{name} dataset: {report.summary().splitlines()[-1]}")
  build_qwen2_tokenizer_json(os.path.join(root, "tokenizer"))
  print(f"data ready in {time.perf_counter() - start:.1f} s")


def stage_line(stage: str, steps: int, minutes: float, result: dict, workdir: str) -> str:
  """The line a stage ends on. A stage stopped by SIGTERM says where its checkpoint is; a workdir that already
  held the stage's last checkpoint trains nothing and logs no loss: say so, rather than "final loss nan"."""
  if "stopped_at" in result:
    return (f"{stage}: stopped at step {result['stopped_at']} of {steps} on SIGTERM, its checkpoint saved in "
            f"{workdir}; the same command resumes it")
  if "loss" not in result:
    return f"{stage}: already trained to step {steps} in {workdir}; nothing to do (delete it to train again)"
  return f"{stage}: {steps} steps in {minutes:.1f} min, final loss {result['loss']:.3f}"


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)
  run_start = time.perf_counter()
  from hico_jax.train import evaluate, trainer
  module = load_config_module(_STAGE_CONFIG.value)
  first = module.get_config(_STAGES.value[0])
  train_images, eval_images = getattr(module, "IMAGES", (0, 0))
  prepare_data(module.DATA, _TRAIN_VIDEOS.value, _EVAL_VIDEOS.value, size=first.model.vit.image_size,
               train_images=train_images if _TRAIN_IMAGES.value is None else _TRAIN_IMAGES.value,
               eval_images=eval_images if _EVAL_IMAGES.value is None else _EVAL_IMAGES.value,
               **getattr(module, "SYNTHETIC", {}))
  previous, results = None, {}
  for stage in _STAGES.value:
    config = module.get_config(stage)
    with config.unlocked():
      if _STEPS.value:
        config.total_steps = _STEPS.value
      config.init.path = previous
      config.seed = config.data.seed = _SEED.value
      config.eval.shards = config.eval.shards if stage == _STAGES.value[-1] else None
      config.export_hf = stage == _STAGES.value[-1]
    workdir = os.path.join(_WORKDIR.value, stage)
    start = time.perf_counter()
    try:
      results[stage] = trainer.train(config, workdir)
    except trainer.OtherRunInWorkdir as error:    # a user's mistake, not a bug: one line, no traceback
      raise SystemExit(f"error: {error}") from None
    print(stage_line(stage, config.total_steps, (time.perf_counter() - start) / 60, results[stage], workdir))
    if "stopped_at" in results[stage]:   # SIGTERM: the next stage must not start from an unfinished one
      return
    previous = workdir
  final = results[_STAGES.value[-1]]
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=float)
  print(f"run directories in {_WORKDIR.value}; HF export in {os.path.join(previous, 'hf')}")
  print(f"end to end {(time.perf_counter() - run_start) / 60:.1f} min")
  if "eval" in final:   # last, so that the run ends on what it learned
    print(f"held-out accuracy after {_STAGES.value[-1]} (seed {_SEED.value})")
    print(evaluate.format_results(final["eval"]))


if __name__ == "__main__":
  app.run(main)
