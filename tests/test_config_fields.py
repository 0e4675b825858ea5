"""config.json of the released VideoChat-Flash checkpoints, field by field: the full set the official trainer and
HF remote code write loads (as the real model sizes, and as a tiny checkpoint with the same fields), every field
that changes the computation refuses an unsupported value with one error naming it, and a field nobody knows is
one warning, not a refusal."""

import copy
import json

import numpy as np
import pytest

import hico_jax
from hico_jax import presets
from hico_jax.convert import config_fields, videochat_flash
from hico_jax.models import hico
from tests.random_params import random_hico_params


def _pinpoints(patch):
  # train.py turns the scripts' --image_grid_pinpoints "(1x1),...,(6x6)" into [[i*patch, j*patch]] for
  # i, j in 1..6, patch = the tower's image size.
  return [[i * patch, j * patch] for i in range(1, 7) for j in range(1, 7)]


def _released(base_llm: dict, tower: str, image_size: int) -> dict:
  """The fields a released config.json holds, from the code that writes them (OpenGVLab/VideoChat-Flash
  2f8e2f5, llava-train_videochat; the stage-3 scripts' arguments, which the 2B and 7B@224 releases are)."""
  return {
      **base_llm,
      # the HF release: the remote-code model class (videochat_flash.md §4, §8)
      "architectures": ["VideoChatFlashQwenForCausalLM"], "model_type": "videochat_flash_qwen",
      "auto_map": {"AutoConfig": "modeling_videochat_flash.VideoChatFlashQwenConfig",
                   "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM"},
      # llava_arch.py initialize_vision_modules (mm_hidden_size = UMTVisionConfig.hidden_size)
      "mm_vision_tower": tower, "vision_tower_pretrained": None, "use_mm_proj": True,
      "mm_projector_type": "tome16_mlp_hd64", "mm_hidden_size": 1024, "mm_vision_select_layer": -2,
      "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_nopad",
      # train.py get_model: overwrite_config (ModelArguments defaults where the script passes nothing)
      "vision_encode_type": "video_image", "mm_num_compress_latents": 128, "mm_num_compress_query_type": "learnable",
      "mm_pos_num_frames": 8, "mm_local_num_frames": 4, "mm_close_init": False, "min_slow_num_frames": 4,
      "mm_llm_compress": False, "llm_compress_layer_list": [8, 16, 24],
      "llm_image_token_ratio_list": [1.0, 0.5, 0.25, 0.125], "llm_compress_type": "attention",
      "mm_newline_position": "nothing", "use_pos_skipping": False, "pos_skipping_range": 4096,
      "mm_spatial_pool_mode": "bilinear",
      # train.py train(): model.config.* after the tower is built (DataArguments / tokenizer / TrainingArguments)
      "use_cache": True, "image_aspect_ratio": "anyres_nopad", "frame_aspect_ratio": "square",
      "image_grid_pinpoints": _pinpoints(image_size), "frame_grid_pinpoints": None, "max_num_pixels": 14745600000,
      "image_crop_resolution": None, "image_split_resolution": None, "tokenizer_padding_side": "right",
      "tokenizer_model_max_length": 32768, "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
      "mm_use_im_start_end": False, "mm_projector_lr": None, "mm_vision_tower_lr": 2e-06,
      "mm_use_im_patch_token": False, "torch_dtype": "bfloat16",
  }


# The base Instruct configs as transformers' Qwen2Config writes them (videochat_flash.md §4's sizes; the
# version string is whatever the trainer ran, no reader depends on it).
_QWEN2_5_1_5B = {
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 21, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "transformers_version": "4.40.1", "use_sliding_window": False,
    "vocab_size": 151936,
}
_QWEN2_7B = {
    **_QWEN2_5_1_5B, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "sliding_window": 131072, "tie_word_embeddings": False,
    "vocab_size": 152064,
}
RELEASED = {
    "2b_res448": (_released(_QWEN2_5_1_5B, "umt-hd-large", 448), "hico_2b"),
    "7b_res224": (_released(_QWEN2_7B, "umt-large", 224), "hico_7b"),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_field_set_reads_as_the_preset_with_no_warning(name, caplog):
  fields, preset = RELEASED[name]
  assert set(fields) <= config_fields.names(config_fields.VIDEOCHAT_FLASH)
  want = hico.HiCoConfig.from_dict(dict(presets.hico(preset)))
  got = videochat_flash.hf_config_to_hico(copy.deepcopy(fields), **{
      k: getattr(want.llm, k) for k in ("dtype", "param_dtype", "remat_policy", "attention_impl")})
  assert got.vit == want.vit and got.llm == want.llm and got.visual_dropout is None
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _tiny_checkpoint(path, released: dict, seed=0) -> tuple[hico.HiCoConfig, dict]:
  """A tiny checkpoint whose config.json is the released field set with the sizes swapped for tiny ones
  (the sizing fields and our record of the tiny tower); the tensors are random, in the official layout."""
  tied = released["tie_word_embeddings"]
  config = hico.HiCoConfig.from_dict({
      "vit": dict(presets.VIT_PRESETS["tiny"], image_size=64, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", vocab_size=320, tie_word_embeddings=tied))})
  params = random_hico_params(config, seed)
  videochat_flash.save(str(path), config, params)
  ours = json.loads((path / "config.json").read_text())
  sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
           "mm_hidden_size", videochat_flash.VISION_CONFIG_FIELD)
  (path / "config.json").write_text(json.dumps({**released, **{k: ours[k] for k in sizes}}))
  return config, params


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_tiny_checkpoint_with_the_released_field_set_loads(name, tmp_path, caplog):
  released, _ = RELEASED[name]
  config, params = _tiny_checkpoint(tmp_path, released)
  model = hico_jax.from_pretrained(str(tmp_path))
  for part, fields in (("vit", ("image_size", "width", "depth", "num_heads", "mlp_dim", "clip_frames")),
                       ("llm", ("vocab_size", "hidden_size", "num_layers", "num_heads", "tie_word_embeddings"))):
    for f in fields:
      assert getattr(getattr(model.config, part), f) == getattr(getattr(config, part), f), (part, f)
  np.testing.assert_array_equal(model.params["visual"]["projector"]["fc1"]["kernel"],
                                params["visual"]["projector"]["fc1"]["kernel"])
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_unknown_fields_are_one_warning_naming_them_and_the_checkpoint_loads(tmp_path, caplog):
  released, _ = RELEASED["2b_res448"]
  _tiny_checkpoint(tmp_path, {**released, "mm_shiny_new_thing": 3, "zz_flag": True})
  hico_jax.from_pretrained(str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "['mm_shiny_new_thing', 'zz_flag']" in warnings[0], warnings


# A value the official code accepts (or at least writes) that changes the computation, for every architecture
# field: the checked ones of the table, and the read ones that select the tower.
UNSUPPORTED = {
    "hidden_act": ("gelu", "'silu'"),
    "use_sliding_window": (True, "false"),
    "use_mrope": (True, "false"),
    "attention_dropout": (0.1, "0"),
    "layer_types": (["full_attention", "sliding_attention"], "'full_attention' for every layer"),
    "vision_encode_type": ("image", "'video_image'"),
    "mm_projector_type": ("mlp2x_gelu", "'tome16_mlp_hd64'"),
    "mm_local_num_frames": (8, "4"),
    "mm_vision_select_layer": (-1, "-2"),
    "mm_patch_merge_type": ("spatial_unpad", "'spatial_nopad' or 'flat'"),
    "mm_newline_position": ("one_token", "'nothing'"),
    "frame_aspect_ratio": ("anyres_nopad", "'square'"),
    "mm_use_im_start_end": (True, "false"),
    "mm_use_im_patch_token": (True, "false"),
}


def test_every_checked_field_of_the_table_has_an_unsupported_value_here():
  checked = {f.name for f in config_fields.FIELDS if f.kind == config_fields.CHECKED}
  assert checked == set(UNSUPPORTED)
  assert len({f.name for f in config_fields.FIELDS}) == len(config_fields.FIELDS)     # each field once


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_architecture_value_is_one_error_naming_field_value_and_what_is_supported(field, tmp_path):
  value, supported = UNSUPPORTED[field]
  released, _ = RELEASED["7b_res224"]
  (tmp_path / "config.json").write_text(json.dumps({**released, field: value}))   # refused before any tensor
  with pytest.raises(ValueError) as error:
    hico_jax.from_pretrained(str(tmp_path))
  message = str(error.value)
  assert "\n" not in message and error.value.__cause__ is None and error.value.__context__ is None
  assert message.startswith(str(tmp_path / "config.json") + ": ")
  assert f"field {field!r} = {value!r} is not supported" in message and supported in message, message


@pytest.mark.parametrize("field,value,message", [
    ("mm_vision_tower", "internvideo2", "mm_vision_tower = 'internvideo2' is not supported (only UMT-L"),
    ("mm_hidden_size", 1408, "mm_hidden_size = 1408 does not match the vision tower's width 1024"),
])
def test_unsupported_tower_is_one_error(field, value, message, tmp_path):
  released, _ = RELEASED["2b_res448"]
  (tmp_path / "config.json").write_text(json.dumps({**released, field: value}))
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    hico_jax.from_pretrained(str(tmp_path))


def test_newline_position_is_free_when_the_merge_type_is_flat():
  """Stage 1's scripts pass neither field: ModelArguments' defaults, 'flat' and 'one_token', add no newline."""
  released, _ = RELEASED["7b_res224"]
  fields = {**released, "mm_patch_merge_type": "flat", "mm_newline_position": "one_token"}
  videochat_flash.hf_config_to_hico(fields)


# What the official code reads from the config as a plain attribute (no getattr default), so a config.json
# without it cannot build the official model: LlavaMetaModel / ToMe16_mlp_hd64.__init__ (mm_hidden_size,
# hidden_size, mm_pos_num_frames), UMTVisionTower (mm_local_num_frames, mm_vision_select_layer),
# build_vision_tower (mm_vision_tower), Qwen2 (the sizes); and what its forward reads with a default that
# would take another path (vision_encode_type defaults to "image", which raises; mm_patch_merge_type to "flat").
OFFICIAL_READS = ("mm_hidden_size", "hidden_size", "mm_pos_num_frames", "mm_local_num_frames",
                  "mm_vision_select_layer", "mm_vision_tower", "mm_projector_type", "vision_encode_type",
                  "vocab_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "auto_map")


@pytest.mark.parametrize("preset", ["hico_2b", "hico_7b"])
def test_our_export_config_holds_what_the_official_code_reads_with_the_released_values(preset, caplog):
  config = hico.HiCoConfig.from_dict(dict(presets.hico(preset)))
  ours = videochat_flash.hico_to_hf_config(config, "bfloat16")
  released = RELEASED["2b_res448" if preset == "hico_2b" else "7b_res224"][0]
  for field in OFFICIAL_READS:
    assert field in ours and ours[field] == released[field], (field, ours.get(field), released[field])
  videochat_flash.hf_config_to_hico(ours)
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
