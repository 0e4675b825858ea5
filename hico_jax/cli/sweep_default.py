"""Tuning sweeps of the embedded default: many runs of configs/tiny_synthetic.py's stage sequence at once, each
with its own overrides and seed, each scored on the held-out questions; one JSON line per finished run.

  python tools/sweep_default.py runs.jsonl --parallel 6 --out sweep.jsonl

runs.jsonl holds one run a line: {"name": "l4", "seed": 0, "overrides": {"model.llm.num_layers": 4}}. A key
applies to every stage; "stage2:total_steps" to one stage only. A key "data" names another data root (its
shards/, eval_shards/ and tokenizer/, as hico_jax.train.default.prepare_data makes them, pictures included).
Each run trains the stages of --stages in order (by default the default's: stage 1 on the pictures, then stage 2
from it), in its own process, so that runs share nothing but the machine. On one GPU, runs at once share it
well (the tiny model leaves it mostly idle) once XLA's GEMM autotuning is off
(`XLA_FLAGS=--xla_gpu_autotune_level=0`: with it on, six compiles at once took minutes), up to about one run a
host CPU core: on an H200 host of 16 cores 12 runs at once took 4.2 minutes each, 24 three times longer.
docs/default_run.md has the sweep that chose the default's settings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from hico_jax.train import default

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # configs/ lives there


def stage_config(stage: str, overrides: dict, seed: int, eval_per_task: int | None):
  """configs/tiny_synthetic.py's `stage` with `overrides` ({"dotted.key": value, "stage:dotted.key": value,
  "data": root}) applied; eval_per_task None: no held-out scoring."""
  module = default.load_config_module(os.path.join(REPO, "configs", "tiny_synthetic.py"))
  c = module.get_config(stage)
  c.lock()        # as the trainer's --config.key=value flags do: a misspelt key fails instead of being added
  overrides = dict(overrides)
  root = overrides.pop("data", module.DATA)
  c.data.shards, c.data.tokenizer_dir = f"{root}/shards", f"{root}/tokenizer"
  c.eval.shards = f"{root}/eval_shards" if eval_per_task else None
  mine = {key.split(":", 1)[-1]: value for key, value in overrides.items()
          if ":" not in key or key.split(":", 1)[0] == stage}
  # JSON brings lists; the configs hold tuples (a schedule is a tuple of (regex, scale) pairs).
  c.update_from_flattened_dict({key: tuple(tuple(v) for v in value) if isinstance(value, list) else value
                                for key, value in mine.items()})
  c.seed = c.data.seed = seed
  c.eval.max_per_task = eval_per_task or c.eval.max_per_task
  c.checkpoint.every = 10**9          # the final step's forced save only
  c.export_hf = False
  return c


def run_one(args):
  """Child process: one run -> its results as JSON on the last line of stdout."""
  from hico_jax.train import trainer   # pylint: disable=import-outside-toplevel
  spec = json.loads(args.one)
  with tempfile.TemporaryDirectory() as root:
    previous = None
    for i, stage in enumerate(args.stages):
      last = i == len(args.stages) - 1
      config = stage_config(stage, spec.get("overrides", {}), spec["seed"], args.eval_per_task if last else None)
      with config.unlocked():
        config.init.path = previous
      previous = os.path.join(root, stage)
      results = trainer.train(config, previous)
  print(json.dumps({"loss": results.get("loss"), "eval": {task: [r["choice"], r["exact"]]
                                                           for task, r in results["eval"].items()}}))


def launch(spec, args):
  start = time.perf_counter()
  child = subprocess.run([sys.executable, "-m", "hico_jax.cli.sweep_default", "--one", json.dumps(spec),
                          "--eval_per_task", str(args.eval_per_task), "--stages", *args.stages],
                         capture_output=True, text=True, cwd=REPO)
  line = {**spec, "minutes": round((time.perf_counter() - start) / 60, 2), "rc": child.returncode}
  try:
    line.update(json.loads(child.stdout.strip().splitlines()[-1]))
  except (IndexError, json.JSONDecodeError):
    line["error"] = child.stderr[-2000:]
  with open(args.out, "a") as f:
    f.write(json.dumps(line) + "\n")
  print(json.dumps(line), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="?", help="JSON lines: name, seed, overrides")
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--out", default="sweep.jsonl")
  parser.add_argument("--eval_per_task", type=int, default=100)
  parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"],
                      help="the stages each run trains, in order (stage2 alone: from scratch)")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    return run_one(args)
  if not args.runs:
    parser.error("a runs file is needed")
  with open(args.runs) as f:
    specs = [json.loads(line) for line in f if line.strip()]
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    list(pool.map(lambda spec: launch(spec, args), specs))


if __name__ == "__main__":
  main()
