"""Worker for tests/test_multiprocess.py: a few HiCo train steps on a fixed global batch, run either as one
process with 4 CPU devices or as one of two processes with 2 devices each (gloo collectives). Each process
feeds only its own rows of the global batch; the result (final params) is written by process 0."""

import os
import sys

process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id)

import flax.linen as nn  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from hico_jax import presets, sharding  # noqa: E402
from hico_jax.data import pipeline  # noqa: E402
from hico_jax.models.hico import HiCoConfig  # noqa: E402
from hico_jax.train import metrics, train_state  # noqa: E402

fields = presets.hico("tiny", dtype="float32", remat_policy="none")
fields.vit.image_size, fields.llm.vocab_size, fields.encode_chunk = 64, 320, 4
config = HiCoConfig.from_dict(dict(fields))
mesh = sharding.make_mesh((("data", -1),))

rows, frames, text = 4, 4, 24
rng = np.random.default_rng(0)
length = config.visual_tokens(frames) + text
ids = rng.integers(1, 320, (rows, length)).astype(np.int32)
ids[:, 4:4 + config.visual_tokens(frames)] = -200
# Rows end in different amounts of padding and bring different counts of skipped records, so each process's
# counts differ from the other's and only a sum over processes gives the whole batch's.
padding, skipped_per_row = np.array([0, 3, 6, 9]), np.array([1, 0, 2, 5])
segment_ids = (np.arange(length)[None, :] < length - padding[:, None]).astype(np.int32)
targets = np.where((ids < 0) | (segment_ids == 0), -100, np.roll(ids, -1, axis=1)).astype(np.int32)
batch = {"input_ids": ids, "targets": targets, "segment_ids": segment_ids,
         "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
         "frames": rng.integers(0, 255, (rows, frames, 64, 64, 3)).astype(np.uint8), "num_skipped": skipped_per_row}
per_process = rows // num_processes
mine = slice(process_id * per_process, (process_id + 1) * per_process)
local = {k: (v[mine] if np.ndim(v) else v) for k, v in batch.items()}

optim_config = ml_collections.ConfigDict(dict(lr=1e-3, total_steps=10, warmup_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                              weight_decay=0.0, grad_clip=1.0, schedule=((".*", 1.0),)))
built = train_state.build_train_step(config, optim_config, mesh)   # as the trainer builds it
state, step = built.state, built.train_step
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
  global_batch = pipeline.to_global(local, mesh)
  losses = []
  for _ in range(3):
    state, step_metrics = step(state, global_batch)
    losses.append(float(step_metrics["loss"]))
  # What the trainer logs: this process's counts of its own rows, summed over processes.
  counts = metrics.sum_over_processes(metrics.batch_counts(local))
  gathered = jax.tree.map(lambda x: np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)),
                          state["params"])
if process_id == 0:
  flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(gathered)[0]}
  np.savez(out, losses=np.asarray(losses),
           counts=np.asarray([counts["tokens_since_last_log"], counts["skipped_records_since_last_log"]]),
           whole_batch_counts=np.asarray([(segment_ids > 0).sum(), skipped_per_row.sum()]), **flat)
if num_processes > 1:
  jax.distributed.shutdown()
