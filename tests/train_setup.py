"""What the train tests share. Step level: a HiCo with a 320-token vocabulary, batches built directly, and the
state and step as the trainer builds them. Trainer level: configs/tiny_synthetic.py (the real Qwen2 vocabulary and
tokenizer) made small, run for a few steps on the synthetic videos of the `synthetic_data` fixture (conftest.py).
Frames are 64 px everywhere: 4x4 patches x 4 frames = 64 tokens a clip, which the merge keeps as they are.
"""

import functools
import types
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from hico_jax import VIDEO_TOKEN_ID, presets, sharding
from hico_jax.data import pipeline, video as video_lib
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.train import default, recipe, train_state

REPO = Path(__file__).resolve().parents[1]
VOCAB, SIZE, FRAMES = 320, 64, 4
ROWS, LENGTH, VISUAL = 8, 96, 64                       # step-level batches: 8 rows of 96 tokens, one clip each
MESH = [("data", 2), ("fsdp", 2), ("tensor", 2)]
DATA8, DATA4_TENSOR2, FSDP4_TENSOR2 = [("data", 8)], [("data", 4), ("tensor", 2)], [("fsdp", 4), ("tensor", 2)]
STAGE2, STAGE4 = recipe.STAGES["stage2"]["schedule"], recipe.STAGES["stage4"]["schedule"]
IGNORE = pipeline.IGNORE


# ----------------------------------------------------------------------------------------------------------
# Step level: the state and the jitted step as the trainer builds them (hico_jax/train/train_state.py)

def small_model() -> HiCoConfig:
  """The tiny preset's towers in float32 with a 320-token vocabulary; 8 clips a vision-tower step."""
  compute = dict(dtype="float32", param_dtype="float32", remat_policy="none")
  return HiCoConfig.from_dict({"vit": dict(presets.VIT_PRESETS["tiny"], image_size=SIZE, **compute),
                               "llm": dict(presets.llm("tiny", vocab_size=VOCAB, **compute)),
                               "encode_chunk": 8})


def optimizer_config(optimizer, schedule, lr, weight_decay=0.0):
  """A constant rate and no clipping, so an SGD update is exactly -lr * scale * grad."""
  return ml_collections.ConfigDict(dict(
      optimizer=optimizer, lr=lr, schedule_type="constant", warmup_ratio=0.0, total_steps=100, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=weight_decay, grad_clip=0.0, schedule=tuple(schedule)))


@functools.lru_cache(maxsize=None)
def initial_params():
  config = small_model()
  init = jax.jit(lambda rng: nn.unbox(HiCo(config).init(rng, *init_inputs(config)))["params"])
  return numpy_tree(init(jax.random.key(0)))


def build(mesh_config, optim_config, accumulation_steps=1):
  """Model, state, state shardings and the jitted step on a mesh, built as trainer.train builds them; but the
  step does not donate (a test may step the same state twice), and the initial params, the same values
  whatever the mesh, are made once and placed on each mesh rather than compiled per mesh."""
  model_config = small_model()
  mesh = sharding.make_mesh(mesh_config)
  built = train_state.build_train_step(model_config, optim_config, mesh, accumulation_steps=accumulation_steps,
                                       params=initial_params(), donate=False)
  model, state, state_shardings, jitted = built.model, built.state, built.state_shardings, built.train_step

  def step(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return jitted(state, pipeline.to_global(batch, mesh))

  return types.SimpleNamespace(config=model_config, model=model, mesh=mesh, state=state,
                               shardings=state_shardings, step=step)


def make_batch(seed, supervised=(2, 2, 2, 2, 20, 20, 20, 20)):
  """(trainer batch, HF-style labels) for ROWS rows, each one sample: prompt text, the 64 placeholders of its
  4-frame video (at a different offset in each row), an answer of supervised[row] tokens, then padding.
  The first four rows (the first micro-batch of two) supervise far fewer tokens than the last four, so a mean
  of per-micro-batch means is visibly not the mean over the batch."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((ROWS, LENGTH), np.int32)
  labels = np.full((ROWS, LENGTH), IGNORE, np.int32)
  targets = np.full((ROWS, LENGTH), IGNORE, np.int32)
  segment_ids = np.zeros((ROWS, LENGTH), np.int32)
  positions = np.zeros((ROWS, LENGTH), np.int32)
  for row, answer in enumerate(supervised):
    prefix = 3 + row
    length = prefix + VISUAL + answer
    ids[row, :length] = rng.integers(0, VOCAB, length)
    ids[row, prefix:prefix + VISUAL] = VIDEO_TOKEN_ID
    labels[row, prefix + VISUAL:length] = ids[row, prefix + VISUAL:length]
    targets[row, :length - 1] = labels[row, 1:length]        # shifted per sample, as the pipeline does
    segment_ids[row, :length] = 1
    positions[row, :length] = np.arange(length)
  frames = rng.integers(0, 256, (ROWS, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
  batch = {"input_ids": ids, "targets": targets, "segment_ids": segment_ids, "positions": positions,
           "frames": frames, "num_skipped": np.int32(0)}
  return batch, labels


def numpy_tree(tree):
  return jax.tree.map(np.asarray, tree)


def reference_loss(model, params, batch, labels):
  """HiCo.loss on one device: labels aligned with input_ids, the frames normalised on the host."""
  video = video_lib.normalize(batch["frames"])[:, None]
  return model.apply({"params": params}, batch["input_ids"], labels, video, segment_ids=batch["segment_ids"],
                     positions=batch["positions"], method=HiCo.loss)[0]


# ----------------------------------------------------------------------------------------------------------
# Trainer level

def trainer_config(data_root, total_steps=4):
  """configs/tiny_synthetic.py stage 2 (AdamW, warmup + cosine over total_steps, ViT at 0.2x), small: 64 px,
  4 frames a sample (one sample fills a row), 4 rows a step on an (fsdp 4, tensor 2) mesh."""
  c = default.load_config_module(str(REPO / "configs" / "tiny_synthetic.py")).get_config("stage2")
  c.model.vit.image_size = c.data.image_size = SIZE
  c.model.encode_chunk = 4
  c.mesh = (("fsdp", 4), ("tensor", 2))
  c.data.shards, c.data.tokenizer_dir = str(data_root / "shards"), str(data_root / "tokenizer")
  c.data.num_frames = c.data.min_frames = c.data.max_frames = c.data.frame_budget = FRAMES
  c.data.token_budget = 160                       # the samples are 118-156 tokens with 4 frames
  c.data.tile_budget, c.data.strategies = 0, ()   # videos only: the fixture's shards hold no pictures
  c.total_steps = total_steps
  c.log_every = 2                                 # a log line spans two steps' tokens
  c.checkpoint.every = 1000                       # only the forced saves: preemption and the last step
  c.eval.shards = None
  c.export_hf = False
  return c


def hico_video_prompt_logits(config, params, ids, frames):
  """HiCo.__call__'s logits for a prompt (1, T) holding one VIDEO_TOKEN_ID and its normalised frames (1, F, ...):
  the placeholder expanded to the video's visual tokens by hand, the reference a loaded model is checked against."""
  at = int(np.flatnonzero(ids[0] == VIDEO_TOKEN_ID)[0])
  expanded = np.concatenate([ids[:, :at], np.full((1, config.visual_tokens(frames.shape[1])), VIDEO_TOKEN_ID),
                             ids[:, at + 1:]], axis=1)
  logits, _ = jax.jit(lambda p, i, v: HiCo(config).apply({"params": p}, i, v))(params, expanded, frames[:, None])
  return np.asarray(logits)
