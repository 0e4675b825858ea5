"""The embedded default: the tiny model trained on synthetic videos and pictures through the stage sequence on a
CPU (stage 1 on the pictures, stage 2 on both).

  python -m hico_jax.train --config configs/tiny_synthetic.py:stage2 --workdir runs/tiny/stage2 \
      --config.init.path=runs/tiny/stage1

The whole sequence (data, stages, evaluation, export) is one command: python -m hico_jax.train.default
Same code as the real presets, small sizes: UMT-like ViT of width 128 at 64 px, Qwen2-shaped decoder of 4
layers of width 64 with the real 151,936-token vocabulary.
"""

from hico_jax import presets
from hico_jax.data import synthetic, synthetic_images
from hico_jax.train import recipe

DATA = "data/synthetic"
# Every video 8 s at 8 fps. The prompt states each video's duration ("The video lasts for 23.47 seconds"), and
# with durations drawn from 4-40 s that number is a key to each training video: the tiny model learned the
# 600 training answers by it (training loss 0.14) and stayed at chance on held-out videos. With one duration
# the answers can only come from the pixels.
SYNTHETIC = dict(fps_range=(8, 8), duration_range=(8.0, 8.0))
# Still pictures (hico_jax.data.synthetic_images: a shape's colour, a count of shapes, a caption, which of two
# pictures has more shapes), to train on and held out: (1000, 200), 50 held-out questions a picture task (the
# videos keep their 100). Stage 1 takes ~640 of the 1000, stage 2 replays 50 a task.
IMAGES = (1000, 200)


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
  # RoPE base 1e4 (Llama's), not Qwen2's 1e6. A head of 16 dims rotates at 8 frequencies, base^(-i/8); across a
  # video's 256 visual tokens, base 1e6 turns them by 256, 46, 8.1, 1.4, 0.26, 0.05, 0.008 and 0.001 rad, so half
  # of them carry almost no position, and base 1e4 by 256, 81, 26, 8.1, 2.6, 0.81, 0.26 and 0.08 rad. (Qwen2's
  # 128-dim heads have 64 frequencies, plenty in between at either base.) Four of the five video tasks ask when
  # something happens. On the 2-core CPU, seeds 0/1/2: 58.4 / 54.8 / 52.2% over the five video tasks, against
  # 55.8 / 53.4 / 42.0% at 1e6 (docs/default_run.md).
  model.llm.rope_theta = 1e4
  model.loss_chunk = 32      # rows of 512 tokens hold a few dozen supervised tokens: the head skips the rest
  c = recipe.stage_config(stage, model, shards=f"{DATA}/shards", tokenizer_dir=f"{DATA}/tokenizer",
                          batch_size=4, total_steps={"stage1": 40, "stage2": 1000}.get(stage, 200))
  # A tiny model from scratch learns at rates a pretrained one would not survive. 2e-3 rather than the 3e-3 it had
  # with b2 0.999: b2 0.95 makes the later updates larger, and on the 2-core CPU (fresh clones, seeds 0/1/2) 2e-3
  # gave 55.8 / 53.4 / 42.0% over the five video tasks, four tasks at p < 0.01 on every seed, against 53.4 / 39.4
  # / 57.4% and 4 / 3 / 4 tasks at 3e-3 (5e-3 in the GPU sweep: 34 / 34 / 40%).
  c.optim.lr = {"stage1": 2e-3, "stage2": 2e-3, "stage3": 1e-3, "stage4": 1e-3}[stage]
  # Adam's second moment over the last ~20 steps, not ~1,000 (the recipe's 0.999, for long runs). The gradient
  # norm falls tenfold in the first ~150 steps, while the template is learnt (3.3 at step 10, clipped to 1; a
  # median 0.34 from step 200); with 0.999 those early gradients dominate the second moment for the rest of a
  # 1,000-step run and shrink every later update, which is when the answers are learnt. Mean over the five video
  # tasks, seeds 0/1/2: GPU sweep 44 / 49 / 56% against 37-41% for 0.999; the 2-core CPU (at the 3e-3 of then)
  # 53.4 / 39.4 / 57.4% against 56.4 / 44.0 / 39.4% (docs/default_run.md).
  c.optim.b2 = 0.95
  # The synthetic events start and end on sixteenths of each video, so 16 frames taken from the middles of 16
  # equal segments see every event; ~1 fps sampling can miss short ones (hico_jax/data/synthetic.py).
  c.data.sampling, c.data.num_frames, c.data.min_frames, c.data.max_frames = "middle", 16, 16, 16
  # One video a row (frame_budget 16) and the longest sample is 349 tokens (256 visual, a two-turn
  # conversation): rows of 352 instead of 512 change no sample and cut the 2-core CPU step by 30% (1.07 ->
  # 0.75 CPU-s), most of it the decoder's (L x L) attention and the scan's saved probabilities.
  c.data.token_budget = 352
  c.data.frame_budget = 16
  c.data.max_samples_per_row = 8
  if stage == "stage1":
    # The reference's stage 1 aligns a pretrained LLM to the vision tower on image captions, training only the
    # projector. Here the decoder is random: projector-only training left the loss at 11.6 (docs/default_run.md,
    # "Stage 1 bought nothing"), since a random decoder has nothing to align to. What a first stage can give
    # this model is what a pretrained one brings: the template, the answer words (colours, shapes, counts) and a
    # tower that tells colours and shapes apart. Still pictures teach all three at a fraction of a video's
    # cost (2-5 tiles of 16 tokens against 256 tokens a video), so stage 1 trains every module, with stage 2's
    # template and rates, on the four picture tasks alone: no frames in its rows, ~4 pictures a row of 352.
    # A step is 0.94 CPU-s (16 pictures) against a video step's 0.82 (4 videos), on the 2-core machine under
    # load; the 40 steps take the loss from 11.9 to 4.5 (docs/default_run.md, "pictures").
    c.optim.schedule = recipe.STAGES["stage2"]["schedule"]
    c.data.template = "qwen_2"
    c.data.strategies = tuple((task, "first:0") for task in synthetic.TASKS)
    c.data.frame_budget = 0
    c.data.tile_budget = 16       # a picture takes 2-5 tiles (base + up to 2x2 at 32-128 px)
  elif stage == "stage2":
    # 50 pictures a task stay in the mix (~7% of the rows; a picture row holds one or two), so the held-out
    # pictures are still answered after 1,000 steps of mostly videos. Every row then carries 5 tiles (static
    # shapes): +5% a step. Stage 1 gives stage 2 a head start of ~10-15 steps on the template (its loss at step 30
    # is 2.6, from scratch 6.2; docs/default_run.md "pictures"). With stage 1 on pictures seed 0 learnt four
    # video tasks of five at 870 steps (43% mean; 8.2 min end to end on the 2-core machine): the run had ~2 min
    # of the budget left, and more steps are what the sweeps say these runs are short of, so 1,000.
    c.data.tile_budget = 5
    c.data.strategies = tuple((task, "first:50") for task in synthetic_images.IMAGE_TASKS)
  c.log_every = 10
  # Every 250 steps (4 saves a stage 2): a save costs ~1 s of the 2 cores, which steps are worth more than.
  c.checkpoint.every = 250
  c.eval.shards = f"{DATA}/eval_shards"
  c.eval.max_per_task = 100   # at chance 20%, p < 0.01 takes 31 of 100 right (31%) but 18 of 50 (36%)
  return c
