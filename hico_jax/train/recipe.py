"""The training recipe of videochat_flash.md §6 as config pieces, shared by every stage config.

  stage1  projector only, lr 1e-3, `plain` template, 4 frames (`middle`), 8k tokens
  stage2  everything, lr 1e-5 with the ViT at 2e-6, <= 8 frames (dynamic ~1 fps)
  stage3  everything, 64-512 frames, 32k tokens
  stage4  ViT + projector at 448 px, LLM frozen

Every stage starts from `config.init.path`: stage 1 from the run directory `tools/convert_checkpoint.py
parts-to-orbax` makes of the released parts (the UMT-L encoder file, a Qwen2 / Qwen2.5 Instruct directory, a
fresh projector), each later stage from the previous stage's --workdir.

AdamW (0.9, 0.999, 1e-8), no weight decay, warmup ratio 0.03 then cosine, grad-norm clip 1.0. The per-module
rates are applied for real (the reference's DeepSpeed optimizer ignored them).
"""

import ml_collections

STAGES = {
    "stage1": dict(lr=1e-3, schedule=[("visual/projector/.*", 1.0), (".*", None)], template="plain",
                   sampling="middle", num_frames=4, min_frames=4, max_frames=4, token_budget=8192,
                   frame_budget=4),
    "stage2": dict(lr=1e-5, schedule=[("visual/vision_tower/.*", 0.2), (".*", 1.0)], template="qwen_2",
                   sampling="dynamic_fps1", num_frames=None, min_frames=1, max_frames=8, token_budget=32768,
                   frame_budget=8),
    "stage3": dict(lr=1e-5, schedule=[("visual/vision_tower/.*", 0.2), (".*", 1.0)], template="qwen_2",
                   sampling="dynamic_fps1", num_frames=None, min_frames=64, max_frames=512, token_budget=32768,
                   frame_budget=512),
    "stage4": dict(lr=1e-5, schedule=[("visual/vision_tower/.*", 0.2), ("llm/.*", None), (".*", 1.0)],
                   template="qwen_2", sampling="dynamic_fps1", num_frames=None, min_frames=64, max_frames=512,
                   token_budget=32768, frame_budget=512),
}


def stage_config(stage: str, model: ml_collections.ConfigDict, *, shards: str, tokenizer_dir: str,
                 batch_size: int, total_steps: int) -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages are {sorted(STAGES)}")
  s = STAGES[stage]
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.model = model
  c.mesh = (("data", 1), ("fsdp", -1), ("seq", 1), ("tensor", 1))
  c.seed = 0
  c.batch_size = batch_size
  c.accumulation_steps = 1
  c.total_steps = total_steps
  c.log_every = 10
  c.max_nonfinite_in_a_row = 5
  c.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", lr=s["lr"], warmup_ratio=0.03, total_steps=c.get_ref("total_steps"), b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, grad_clip=1.0, schedule=tuple(s["schedule"])))
  c.data = ml_collections.ConfigDict(dict(
      shards=shards, tokenizer_dir=tokenizer_dir, image_size=model.vit.image_size, token_budget=s["token_budget"],
      frame_budget=s["frame_budget"], max_samples_per_row=64, sampling=s["sampling"],
      num_frames=ml_collections.FieldReference(s["num_frames"], field_type=int), min_frames=s["min_frames"],
      max_frames=s["max_frames"], template=s["template"], packing="first_fit", num_packing_bins=8, num_workers=0,
      seed=0, tile_budget=0, image_grid_pinpoints="(1x1),...,(6x6)"))   # tile_budget > 0: the stage takes images
  c.data.num_epochs = ml_collections.FieldReference(None, field_type=int)
  c.init = ml_collections.ConfigDict({"path": ml_collections.FieldReference(None, field_type=str), "kind": "run"})
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2, async_save=True))
  c.eval = ml_collections.ConfigDict({"shards": ml_collections.FieldReference(None, field_type=str),
                                      "max_per_task": 50})
  c.export_hf = True
  return c
