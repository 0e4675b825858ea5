"""VideoChat-Flash-Qwen2-7B: UMT-L@224 + Qwen2-7B for stages 1-3, then stage 4 at 448 px with the LLM frozen
(`hico_7b:stage4` switches the tower to 448: only the position table changes, no weight does).

  python tools/convert_checkpoint.py parts-to-orbax --vision /models/UMT-L_f4_vision.pt \
      --llm /models/Qwen2-7B-Instruct runs/7b/init --image_size 224
  python -m hico_jax.train --config configs/hico_7b.py:stage1 --workdir runs/7b/stage1 \
      --config.data.shards=/data/stage1_shards --config.data.tokenizer_dir=/models/Qwen2-7B-Instruct \
      --config.init.path=runs/7b/init --config.mesh="(('fsdp',-1),('tensor',1))"
  ... stage2 likewise from runs/7b/stage1.
  python -m hico_jax.train --config configs/hico_7b.py:stage3 --workdir runs/7b/stage3 \
      --config.data.shards=/data/stage3_shards --config.data.tokenizer_dir=/models/Qwen2-7B-Instruct \
      --config.init.path=runs/7b/stage2 --config.mesh="(('fsdp',-1),('tensor',1))"
  python -m hico_jax.train --config configs/hico_7b.py:stage4 --workdir runs/7b/stage4 \
      --config.data.shards=/data/stage4_shards --config.init.path=runs/7b/stage3

Global batch 512 (stage 1) / 256; 32k-token rows in stages 2-4 (the reference's model_max_length). Stage 1
starts from the released parts (UMT-L_f4_vision.pt, Qwen2-7B-Instruct, a fresh projector) made into a run
directory by parts-to-orbax; each later stage from the one before.
"""

from hico_jax import presets
from hico_jax.train import recipe


def get_config(arg=None):
  stage = arg or "stage3"
  model = presets.hico("hico_7b_448" if stage == "stage4" else "hico_7b", remat_policy="qkv_attn")
  model.vit.remat_policy = "full"
  c = recipe.stage_config(stage, model, shards="/data/shards", tokenizer_dir="/models/tokenizer",
                          batch_size=512 if stage == "stage1" else 256, total_steps=1000)
  c.data.num_workers = 4
  c.eval.shards = None
  return c
