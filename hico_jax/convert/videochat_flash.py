"""The official VideoChat-Flash layout (videochat_flash.md §8) <-> HiCo params.

Keys: `model.vision_tower.vision_tower.encoder.*` (UMT-L, 23 blocks, fused qkv), `model.mm_projector.mlp.{0,2}.*`
(projector) and the Qwen2 keys (`model.layers.*`, `model.embed_tokens`, `model.norm`, `lm_head`). The vision
tower is named in config.json as the released checkpoints name it: `mm_vision_tower` containing
"umt-hd-large" is UMT-L@448, "umt-large" UMT-L@224. The LLM is sized by the Qwen2 fields of the same file.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from hico_jax.convert import qwen2_hf, table
from hico_jax.convert.safetensors_io import CheckpointReader, write_checkpoint
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.visual_dropout import VisualDropoutConfig
from hico_jax.models.vit import ViTConfig

VISION_PREFIX = "model.vision_tower.vision_tower.encoder."
PROJECTOR_PREFIX = "model.mm_projector.mlp."
UMT_L = dict(patch_size=16, width=1024, depth=23, num_heads=16, mlp_dim=4096, clip_frames=4)
TOWER_NAMES = {224: "umt-large", 448: "umt-hd-large"}


def vision_rules(vit: ViTConfig, path_prefix=("visual", "vision_tower")) -> list[table.Rule]:
  heads, v = vit.num_heads, VISION_PREFIX

  block = lambda name: f"{v}blocks.{{i}}.{name}"
  rows = [
      # Conv3d (W, 3, 1, 16, 16) = (out, c, t, kh, kw)  <->  ours (t, kh, kw, c, out)
      table.one(f"{v}patch_embed.proj.weight", ("patch_kernel",), lambda w: w.transpose(2, 3, 4, 1, 0),
                lambda k: k.transpose(4, 3, 0, 1, 2)),
      table.one(f"{v}patch_embed.proj.bias", ("patch_bias",)),
      # fused (3W, W), rows [q | k | v], each heads-major  <->  ours (W, 3, heads, head_dim)
      table.one(block("attn.qkv.weight"), ("blocks", "qkv", "kernel"),
                lambda w: w.T.reshape(w.shape[1], 3, heads, -1), lambda k: k.reshape(k.shape[0], -1).T, vit.depth),
      table.one(block("attn.q_bias"), ("blocks", "q_bias"), table.bias_to_heads(heads), table.flatten, vit.depth),
      table.one(block("attn.v_bias"), ("blocks", "v_bias"), table.bias_to_heads(heads), table.flatten, vit.depth),
      table.one(block("attn.proj.weight"), ("blocks", "proj", "kernel"), table.out_linear_to_heads(heads),
                table.heads_to_out_linear, vit.depth),
      table.one(block("attn.proj.bias"), ("blocks", "proj", "bias"), layers=vit.depth),
  ]
  for norm in ("norm1", "norm2"):
    rows += [table.one(block(f"{norm}.weight"), ("blocks", norm, "scale"), layers=vit.depth),
             table.one(block(f"{norm}.bias"), ("blocks", norm, "bias"), layers=vit.depth)]
  for fc in ("fc1", "fc2"):
    rows += [table.one(block(f"mlp.{fc}.weight"), ("blocks", fc, "kernel"), table.linear, table.linear, vit.depth),
             table.one(block(f"mlp.{fc}.bias"), ("blocks", fc, "bias"), layers=vit.depth)]
  rows += [table.one(f"{v}vision_layernorm.weight", ("vision_layernorm", "scale")),
           table.one(f"{v}vision_layernorm.bias", ("vision_layernorm", "bias"))]
  return table.prefixed(rows, path_prefix)


def projector_rules(path_prefix=("visual", "projector")) -> list[table.Rule]:
  rows = []
  for index, name in ((0, "fc1"), (2, "fc2")):
    rows += [table.one(f"{PROJECTOR_PREFIX}{index}.weight", (name, "kernel"), table.linear, table.linear),
             table.one(f"{PROJECTOR_PREFIX}{index}.bias", (name, "bias"))]
  return table.prefixed(rows, path_prefix)


def rules(config: HiCoConfig) -> list[table.Rule]:
  return (vision_rules(config.vit) + projector_rules()
          + table.prefixed(qwen2_hf.rules(config.llm), ("llm",)))


def expected_hf_shapes(config: HiCoConfig) -> dict[str, tuple[int, ...]]:
  vit, hidden, v = config.vit, config.llm.hidden_size, VISION_PREFIX
  w, p = vit.width, vit.patch_size
  per_block = {"norm1.weight": (w,), "norm1.bias": (w,), "attn.qkv.weight": (3 * w, w), "attn.q_bias": (w,),
               "attn.v_bias": (w,), "attn.proj.weight": (w, w), "attn.proj.bias": (w,), "norm2.weight": (w,),
               "norm2.bias": (w,), "mlp.fc1.weight": (vit.mlp_dim, w), "mlp.fc1.bias": (vit.mlp_dim,),
               "mlp.fc2.weight": (w, vit.mlp_dim), "mlp.fc2.bias": (w,)}
  shapes = {f"{v}blocks.{i}.{name}": s for i in range(vit.depth) for name, s in per_block.items()}
  shapes.update({f"{v}patch_embed.proj.weight": (w, 3, 1, p, p), f"{v}patch_embed.proj.bias": (w,),
                 f"{v}vision_layernorm.weight": (w,), f"{v}vision_layernorm.bias": (w,),
                 f"{PROJECTOR_PREFIX}0.weight": (hidden, w), f"{PROJECTOR_PREFIX}0.bias": (hidden,),
                 f"{PROJECTOR_PREFIX}2.weight": (hidden, hidden), f"{PROJECTOR_PREFIX}2.bias": (hidden,)})
  shapes.update(qwen2_hf.expected_hf_shapes(config.llm))
  return shapes


# ---------------------------------------------------------------------------------------------- config.json

# Fields of the released configs that do not change the video path's computation: LLaVA bookkeeping,
# training settings and the image path's settings (images always take the released anyres_nopad,
# "(1x1),...,(6x6)", spatial_nopad: hico_jax.data.image; other values there are not read).
_INERT_FIELDS = frozenset({
    "auto_map", "frame_aspect_ratio", "frame_grid_pinpoints", "image_aspect_ratio", "image_crop_resolution",
    "image_grid_pinpoints", "image_split_resolution", "max_num_pixels", "min_slow_num_frames", "mm_close_init",
    "mm_num_compress_latents", "mm_num_compress_query_type", "mm_pos_num_frames", "mm_projector_lr",
    "mm_vision_tower_lr", "mm_spatial_pool_mode", "mm_spatial_pool_stride", "mm_resampler_type",
    "mm_tunable_parts", "mm_use_im_patch_token", "mm_use_im_start_end", "mm_vision_select_feature",
    "mm_patch_merge_type", "tokenizer_model_max_length", "tokenizer_padding_side", "tune_mm_mlp_adapter",
    "unfreeze_mm_vision_tower", "use_mm_proj", "vision_tower_pretrained", "num_frame_patches_per_side",
    "num_image_patches_per_side", "add_faster_video", "add_time_instruction", "faster_token_stride",
    "force_sample", "pos_skipping_range", "llm_compress_type", "llm_compress_layer_list",
    "llm_image_token_ratio_list", "mm_newline_position", "vision_config",
})
# Fields that decide the architecture, with the values this implementation computes.
_REQUIRED = {"mm_projector_type": "tome16_mlp_hd64", "mm_local_num_frames": 4, "mm_vision_select_layer": -2}
# Not a released field: our own record of a vision tower other than UMT-L (tiny test models).
VISION_CONFIG_FIELD = "hico_vision_config"


def rope_scaling_in_file(path: str):
  """The YaRN scaling a checkpoint's config.json asks for (a rope.YarnScaling), or None: what a stock
  transformers Qwen2ForCausalLM loading the directory applies, and VideoChat-Flash's own model does not."""
  return qwen2_hf.rope_settings(qwen2_hf.read_config(path), os.path.join(path, "config.json"))[1]


def hf_config_to_hico(hf: dict, where: str = "config.json", **compute) -> HiCoConfig:
  """HiCoConfig from a VideoChat-Flash config.json; `compute` sets dtype, remat and attention options."""
  tower = str(hf.get("mm_vision_tower", ""))
  if "umt-hd" in tower:
    image_size = 448
  elif "umt" in tower:
    image_size = 224
  else:
    raise ValueError(f"{where}: mm_vision_tower = {tower!r} is not supported (only UMT-L: 'umt-large', "
                     "'umt-hd-large')")
  for field, value in _REQUIRED.items():
    if field in hf and hf[field] != value:
      raise ValueError(f"{where}: field {field!r} = {hf[field]!r} is not supported (only {value!r})")
  dropout = None
  if hf.get("mm_llm_compress"):
    # The reference's fields, as the HF model card sets them to switch progressive visual dropout on.
    try:
      dropout = VisualDropoutConfig(type=hf["llm_compress_type"], layers=tuple(hf["llm_compress_layer_list"]),
                                    ratios=tuple(float(r) for r in hf["llm_image_token_ratio_list"]))
    except KeyError as missing:
      raise ValueError(f"{where}: mm_llm_compress = true needs the field {missing.args[0]!r}") from None
  vit_fields = {**UMT_L, "image_size": image_size, **hf.get(VISION_CONFIG_FIELD, {})}
  if hf.get("mm_hidden_size", vit_fields["width"]) != vit_fields["width"]:
    raise ValueError(f"{where}: mm_hidden_size = {hf['mm_hidden_size']} does not match the vision tower's "
                     f"width {vit_fields['width']}")
  known = _INERT_FIELDS | set(_REQUIRED) | {"mm_vision_tower", "mm_llm_compress", "mm_hidden_size",
                                            VISION_CONFIG_FIELD}
  llm = qwen2_hf.hf_config_to_dict(hf, extra_known=known, where=where)
  if llm.pop("rope_scaling", None) is not None:
    # The reference's own decoder (Qwen2_Flash) has no rope scaling: its chat() ignores the field. Only its
    # NIAH scripts, which load the LLM as a stock Qwen2ForCausalLM, apply it; tools/niah.py does the same.
    logging.warning("%s: rope_scaling is ignored, as VideoChat-Flash's own model ignores it (tools/niah.py "
                    "applies it, as the reference's NIAH evaluation does)", where)
  vit_compute = {k: v for k, v in compute.items() if k in ("dtype", "param_dtype", "remat_policy", "attention_impl")}
  config = HiCoConfig.from_dict({"vit": {**vit_fields, **vit_compute}, "llm": {**llm, **compute},
                                 "visual_dropout": dropout})
  if dropout is not None:
    try:
      dropout.check(config.llm.num_layers)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  return config


def hico_to_hf_config(config: HiCoConfig, dtype: str) -> dict:
  """config.json as the released checkpoints write it (the fields this implementation reads)."""
  vit = config.vit
  hf = qwen2_hf.dict_to_hf_config(config.llm, dtype)
  hf.update(architectures=["VideoChatFlashQwenForCausalLM"], model_type="videochat_flash_qwen",
            mm_vision_tower=TOWER_NAMES.get(vit.image_size, "umt-large"),
            mm_projector_type="tome16_mlp_hd64", mm_hidden_size=vit.width, mm_local_num_frames=vit.clip_frames,
            mm_vision_select_layer=-2, mm_llm_compress=config.visual_dropout is not None,
            mm_newline_position="nothing", mm_patch_merge_type="spatial_nopad", frame_aspect_ratio="square",
            image_aspect_ratio="anyres_nopad")
  if config.visual_dropout is not None:
    hf.update(llm_compress_type=config.visual_dropout.type,
              llm_compress_layer_list=list(config.visual_dropout.layers),
              llm_image_token_ratio_list=list(config.visual_dropout.ratios))
  standard = {k: getattr(vit, k) for k in UMT_L}
  if standard != UMT_L or vit.image_size not in TOWER_NAMES:
    # Not a released tower: record its sizes (image size included) in our own field; released loaders that
    # do not know the field would see UMT-L, so such a checkpoint is for hico_jax only.
    hf[VISION_CONFIG_FIELD] = {**standard, "image_size": vit.image_size}
  return hf


def is_videochat_flash(hf: dict) -> bool:
  return "mm_vision_tower" in hf


def load(model_dir: str, *, params_dtype=None, **compute) -> tuple[HiCoConfig, dict, str]:
  """(config, params as numpy, the checkpoint's dtype name) from an official-layout directory."""
  where = os.path.join(model_dir, "config.json")
  config = hf_config_to_hico(qwen2_hf.read_config(model_dir), where, **compute)
  reader = CheckpointReader(model_dir)
  qwen2_hf.check_tensors(reader, expected_hf_shapes(config), model_dir,
                         ignored={"lm_head.weight"} if config.llm.tie_word_embeddings else ())
  return config, table.to_params(reader, rules(config), params_dtype), reader.dtype(reader.keys()[0])


def save(model_dir: str, config: HiCoConfig, params, dtype: str = "float32", extra_fields: dict | None = None):
  """Writes the official layout: config.json + safetensors."""
  write_checkpoint(table.to_tensors(params, rules(config), np.dtype(dtype)), model_dir)
  path = os.path.join(model_dir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump({**hico_to_hf_config(config, dtype), **(extra_fields or {})}, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
