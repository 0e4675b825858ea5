"""The embedded default: the tiny model trained on synthetic videos through the stage sequence on a CPU.

  python -m hico_jax.train --config configs/tiny_synthetic.py:stage2 --workdir runs/tiny/stage2 \
      --config.init.path=runs/tiny/stage1

The whole sequence (data, stages, evaluation, export) is one command: python -m hico_jax.train.default
Same code as the real presets, small sizes: UMT-like ViT of width 128 at 64 px, Qwen2-shaped decoder of 4
layers of width 64 with the real 151,936-token vocabulary.
"""

from hico_jax import presets
from hico_jax.train import recipe

DATA = "data/synthetic"
# Every video 8 s at 8 fps. The prompt states each video's duration ("The video lasts for 23.47 seconds"), and
# with durations drawn from 4-40 s that number is a key to each training video: the tiny model learned the
# 600 training answers by it (training loss 0.14) and stayed at chance on held-out videos. With one duration
# the answers can only come from the pixels.
SYNTHETIC = dict(fps_range=(8, 8), duration_range=(8.0, 8.0))


def get_config(arg=None):
  stage = arg or "stage2"
  model = presets.hico("tiny", dtype="float32", remat_policy="none")
  # 64 px, not the preset's 112: the synthetic worlds are drawn for 64 (shapes 16 px across, one patch), and a
  # clip is then 4x16 patches, exactly the 64 tokens the merge keeps, so no merge mixes two regions; the vision
  # tower's work (its backward was a fifth of a 112 px step) drops ~3x and those seconds go to more steps.
  model.vit.image_size = 64
  model.encode_chunk = 8
  # Four decoder layers, not the preset's two: every task needs the answer position to pick a few of 256
  # visual tokens (a small shape, the flash frames, the frames after a change). Held-out choice accuracy
  # averaged over the five tasks (chance 20%), seeds 0/1/2: two layers 28/23/28% and four 47/50/29% in a GPU
  # sweep, 27/22/26% and 44/28/27% on the 2-core CPU (docs/default_run.md). Four cost ~20% more per CPU step.
  model.llm.num_layers = 4
  model.loss_chunk = 32      # rows of 512 tokens hold a few dozen supervised tokens: the head skips the rest
  c = recipe.stage_config(stage, model, shards=f"{DATA}/shards", tokenizer_dir=f"{DATA}/tokenizer",
                          batch_size=4, total_steps={"stage1": 20, "stage2": 900}.get(stage, 200))
  # A tiny model from scratch learns at rates a pretrained one would not survive.
  c.optim.lr = {"stage1": 3e-3, "stage2": 3e-3, "stage3": 1e-3, "stage4": 1e-3}[stage]
  # The synthetic events start and end on sixteenths of each video, so 16 frames taken from the middles of 16
  # equal segments see every event; ~1 fps sampling can miss short ones (hico_jax/data/synthetic.py).
  c.data.sampling, c.data.num_frames, c.data.min_frames, c.data.max_frames = "middle", 16, 16, 16
  # One video a row (frame_budget 16) and the longest sample is 349 tokens (256 visual, a two-turn
  # conversation): rows of 352 instead of 512 change no sample and cut the 2-core CPU step by 30% (1.07 ->
  # 0.75 CPU-s), most of it the decoder's (L x L) attention and the scan's saved probabilities.
  c.data.token_budget = 352
  c.data.frame_budget = 16
  c.data.max_samples_per_row = 8
  c.log_every = 10
  c.checkpoint.every = 50
  c.eval.shards = f"{DATA}/eval_shards"
  c.eval.max_per_task = 100   # at chance 20%, p < 0.01 takes 31 of 100 right (31%) but 18 of 50 (36%)
  return c
