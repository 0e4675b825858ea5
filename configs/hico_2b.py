"""VideoChat-Flash-Qwen2_5-2B_res448: UMT-L@448 + Qwen2.5-1.5B, every stage at 448 px (as the reference's
2B scripts; it has no stage 4). Global batch 512 (stage 1) / 256, bf16 compute, fp32 master weights.

  python tools/convert_checkpoint.py parts-to-orbax --vision /models/UMT-L_f4_vision.pt \
      --llm /models/Qwen2.5-1.5B-Instruct runs/2b/init --image_size 448
  python -m hico_jax.train --config configs/hico_2b.py:stage1 --workdir runs/2b/stage1 \
      --config.data.shards=/data/stage1_shards --config.data.tokenizer_dir=/models/Qwen2.5-1.5B-Instruct \
      --config.init.path=runs/2b/init
  python -m hico_jax.train --config configs/hico_2b.py:stage2 --workdir runs/2b/stage2 \
      --config.data.shards=/data/stage2_shards --config.init.path=runs/2b/stage1
  ... stage3 likewise from runs/2b/stage2.

init for stage 1: the run directory parts-to-orbax makes of the released parts, as the reference's stage 1
starts: UMT-L_f4_vision.pt (OpenGVLab/Video_Encoders_for_Training_VideoChat-Flash), the Qwen2.5-1.5B-Instruct
directory, and a fresh projector.
Expected: the reference's stages take <1 h / ~2 d / 2-3 d on 32 A100s (videochat_flash.md §6).
"""

from hico_jax import presets
from hico_jax.train import recipe


def get_config(arg=None):
  stage = arg or "stage3"
  model = presets.hico("hico_2b", remat_policy="dots_attn")
  # 448 px clips, up to 512 frames a row: keep only each block's input. "attn" (also keep the attention
  # outputs) is ~7% faster where its 11 GB more per 64 clips on a device fit, and on an H200 "qkv_attn" or
  # "qkv_mlp_attn" faster again (docs/benchmarks.md, full train step).
  model.vit.remat_policy = "full"
  c = recipe.stage_config(stage, model, shards="/data/shards", tokenizer_dir="/models/tokenizer",
                          batch_size=512 if stage == "stage1" else 256, total_steps=1000)
  c.mesh = (("data", 1), ("fsdp", -1), ("seq", 1), ("tensor", 1))
  c.data.num_workers = 4
  c.eval.shards = None
  return c
