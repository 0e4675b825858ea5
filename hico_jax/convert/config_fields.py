"""Every config.json field of the released VideoChat-Flash checkpoints and of the plain Qwen2 ones, what
hico_jax does with it, and why: one table.

Where the fields come from (the official code, OpenGVLab/VideoChat-Flash at 2f8e2f5, and the HF remote code):
  - the base Qwen2 / Qwen2.5 Instruct config.json, as transformers' Qwen2Config writes it;
  - llava-train_videochat/llava/train/train.py: `get_model`'s `overwrite_config` (vision_encode_type ...
    mm_newline_position, use_pos_skipping, pos_skipping_range, mm_spatial_pool_mode, rope_scaling) and
    `train()`'s `model.config.* = ...` (aspect ratios and pinpoints, tokenizer settings, tunable parts, rates);
  - llava/model/llava_arch.py `initialize_vision_modules` (mm_vision_tower, vision_tower_pretrained,
    use_mm_proj, mm_projector_type, mm_hidden_size, mm_vision_select_layer/_feature, mm_patch_merge_type);
  - what the model code reads with getattr(config, ...): llava_arch.py / the HF modeling_videochat_flash.py
    (vision_encode_type, mm_patch_merge_type, frame/image_aspect_ratio, mm_newline_position,
    mm_local_num_frames, mm_llm_compress and the llm_compress_* fields, tokenizer_model_max_length,
    tokenizer_padding_side, use_pos_skipping, delay_load), multimodal_encoder/builder.py and umt_encoder.py
    (mm_vision_tower, s2, mm_local_num_frames, mm_vision_select_layer, unfreeze_mm_vision_tower,
    mm_tunable_parts), multimodal_projector (mm_projector_type, mm_hidden_size, mm_pos_num_frames) and
    modeling_qwen2_flash.py (the Qwen2 fields);
  - the HF repos' own additions: auto_map.

Kinds:
  read      the value builds the model config (sizes, RoPE, the tower, visual dropout): read by the loaders
  checked   changes what the model computes; only `supported` is implemented, another value is one ValueError
  accepted  bookkeeping, a training setting, or a path hico_jax does not run: any value loads
A field the table does not hold is named in one warning, and the load goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

READ, CHECKED, ACCEPTED = "read", "checked", "accepted"
# Scopes: a plain Qwen2 config.json holds only QWEN2 fields; a VideoChat-Flash one both.
QWEN2, VIDEOCHAT_FLASH = "qwen2", "videochat_flash"


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  kind: str
  scope: str
  reason: str
  supported: str = ""                                        # checked: the implemented values, in words
  accepts: Callable[[Any, dict], bool] | None = None         # checked: (value, whole config) -> implemented?


def _one_of(*values):
  return lambda value, hf: any(value == v and type(value) is type(v) for v in values)


def _no_newline(value, hf):
  # A newline token enters the video tokens only when the merge type contains "pad" (both the trainer's and
  # the HF code's prepare_inputs_labels_for_multimodal); "flat" never adds one.
  return value == "nothing" or hf.get("mm_patch_merge_type", "flat") == "flat"


def _read(name, scope, reason):
  return Field(name, READ, scope, reason)


def _checked(name, scope, supported, accepts, reason):
  return Field(name, CHECKED, scope, reason, supported, accepts)


def _accepted(names, scope, reason):
  return [Field(name, ACCEPTED, scope, reason) for name in names.split()]


_Q, _V = QWEN2, VIDEOCHAT_FLASH
FIELDS: tuple[Field, ...] = (
    # ---------------------------------------------------------------------------------------- Qwen2 decoder
    *[_read(n, _Q, "sizes the decoder (Qwen2Config)") for n in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")],
    *[_read(n, _Q, "RoPE θ and scaling (qwen2_hf.rope_settings; VideoChat-Flash's own decoder ignores "
                   "rope_scaling, and so does its loader here)") for n in ("rope_theta", "rope_scaling",
                                                                            "rope_parameters")],
    _checked("hidden_act", _Q, "'silu'", _one_of("silu"), "the MLP's activation"),
    _checked("use_sliding_window", _Q, "false (or null)", _one_of(False, None),
             "sliding-window attention is not implemented"),
    _checked("use_mrope", _Q, "false (or null)", _one_of(False, None), "multimodal RoPE (Qwen2-VL) is not "
             "implemented"),
    _checked("attention_dropout", _Q, "0", _one_of(0, 0.0), "dropout on attention weights is not implemented"),
    _checked("layer_types", _Q, "'full_attention' for every layer",
             lambda v, hf: v is None or all(t == "full_attention" for t in v),
             "transformers 5's per-layer attention kinds; only full attention is implemented"),
    *_accepted("architectures model_type transformers_version torch_dtype dtype _name_or_path", _Q,
               "names and versions: the loader reads the fields themselves"),
    *_accepted("bos_token_id eos_token_id pad_token_id", _Q,
               "token ids: generation reads eos/pad (qwen2_hf.read_token_ids), no weight depends on them"),
    *_accepted("max_window_layers sliding_window", _Q, "used only with use_sliding_window, which is checked"),
    *_accepted("use_cache initializer_range output_attentions output_hidden_states return_dict use_return_dict "
               "is_decoder tokenizer_class generation_config", _Q,
               "forward-pass outputs, initialisation and generation defaults, not the computation"),
    # ---------------------------------------------------------------------- VideoChat-Flash: vision and merge
    _read("mm_vision_tower", _V, "the tower: 'umt-hd*' is UMT-L@448, other 'umt*' UMT-L@224 (builder.py)"),
    _read("mm_hidden_size", _V, "the tower's width, the projector's input (must be the tower's)"),
    _read("hico_vision_config", _V, "hico_jax's own record of a tower other than UMT-L (tiny test models)"),
    _checked("vision_encode_type", _V, "'video_image'", _one_of("video_image"),
             "the HF model encodes only this way (encode_video_image: 4-frame clips through the video tower, "
             "then the merge); every other value raises NotImplementedError there"),
    _checked("mm_projector_type", _V, "'tome16_mlp_hd64'", _one_of("tome16_mlp_hd64"),
             "the merge to 16 tokens a frame and the two-layer MLP"),
    _checked("mm_local_num_frames", _V, "4", _one_of(4), "frames a clip: the tower's position table and the "
             "merge target (16 x 4) are for 4-frame clips"),
    _checked("mm_vision_select_layer", _V, "-2", _one_of(-2),
             "23 of UMT-L's 24 blocks run (depth + select_layer + 1)"),
    _checked("mm_patch_merge_type", _V, "'spatial_nopad' or 'flat'", _one_of("spatial_nopad", "flat"),
             "both leave the video tokens flat with no learned newline; 'unpad' adds an image_newline "
             "parameter, others raise in the HF code"),
    _checked("mm_newline_position", _V, "'nothing' (any value with mm_patch_merge_type 'flat')", _no_newline,
             "'one_token' / 'frame' append a learned frame_newline token to the video"),
    _checked("frame_aspect_ratio", _V, "'square'", _one_of("square"),
             "'anyres*' splits every frame into sub-images (trainer) or raises (HF code)"),
    _checked("mm_use_im_start_end", _V, "false", _one_of(False),
             "true wraps the video placeholder in <im_start>/<im_end> tokens in the trained prompts "
             "(train.py preprocess_multimodal); hico_jax's prompts never insert them"),
    _checked("mm_use_im_patch_token", _V, "false", _one_of(False),
             "true adds an <im_patch> token to the tokenizer and embeddings (initialize_vision_tokenizer)"),
    *_accepted("mm_vision_select_feature s2 s2_scales", _V,
               "read by the CLIP / SigLIP towers only; UMT returns every patch token"),
    *_accepted("vision_tower_pretrained delay_load use_mm_proj", _V,
               "how the official code finds and builds the tower at load time; the UMT tower reads a fixed "
               "file and no forward pass reads use_mm_proj"),
    *_accepted("mm_pos_num_frames", _V, "stored by the ToMe projector as max_pos_num_frames and never used"),
    *_accepted("mm_close_init", _V, "written to the config by train.py and read by nothing (spec §3)"),
    *_accepted("mm_num_compress_latents mm_num_compress_query_type min_slow_num_frames", _V,
               "settings of other projectors in overwrite_config; tome16_mlp_hd64 does not read them"),
    *_accepted("mm_spatial_pool_mode mm_spatial_pool_stride mm_spatial_pool_out_channels mm_resampler_type", _V,
               "LLaVA-OneVision pooling (get_2dPool, only for a 'llava_ov' transformers_version) and "
               "resamplers; the video path here has neither"),
    *_accepted("num_frame_patches_per_side num_image_patches_per_side", _V,
               "the ToMe projector's attributes (4 and 8; spec §3 lists them among the released fields), "
               "read only on the anyres paths"),
    *_accepted("image_aspect_ratio image_grid_pinpoints image_crop_resolution image_split_resolution", _V,
               "the image (anyres) path; hico_jax runs videos, which never read them"),
    *_accepted("frame_grid_pinpoints max_num_pixels", _V,
               "used only with an anyres frame_aspect_ratio, which is checked"),
    # ------------------------------------------------------------------- VideoChat-Flash: the LLM side
    _read("mm_llm_compress", _V, "switches progressive visual dropout on"),
    *[_read(n, _V, "visual dropout's kind, layers and ratios, read when mm_llm_compress is true") for n in (
        "llm_compress_type", "llm_compress_layer_list", "llm_image_token_ratio_list")],
    *_accepted("tokenizer_padding_side", _V, "the side the official forward pads a batch on; hico_jax takes "
               "attention masks and pads either side"),
    *_accepted("tokenizer_model_max_length", _V, "the training length; the official forward cuts longer "
               "embedded inputs to it, hico_jax leaves the length to the caller"),
    *_accepted("use_pos_skipping pos_skipping_range", _V,
               "training-only position jitter (applied only when self.training); inference never uses it and "
               "hico_jax's trainer does not apply it"),
    *_accepted("max_sequence_length", _V, "written beside rope_scaling by train.py; nothing reads it"),
    # ------------------------------------------------------------- VideoChat-Flash: training bookkeeping
    *_accepted("mm_tunable_parts mm_projector_lr mm_vision_tower_lr tune_mm_mlp_adapter tune_mm_vision_resampler "
               "freeze_mm_mlp_adapter freeze_mm_vision_resampler unfreeze_mm_vision_tower", _V,
               "which parts the official run trained and at what rates; hico_jax's stage configs set their own"),
    *_accepted("auto_map", _V, "the HF repo's remote-code class names"),
)

def names(scope: str) -> frozenset[str]:
  """The fields a config.json of `scope` may hold (a VideoChat-Flash one also holds the Qwen2 fields)."""
  scopes = {QWEN2} if scope == QWEN2 else {QWEN2, VIDEOCHAT_FLASH}
  return frozenset(f.name for f in FIELDS if f.scope in scopes)


def check(hf: dict, where: str, scope: str):
  """One ValueError for the first checked field whose value is not implemented; one warning naming every
  field the table does not know (they are ignored)."""
  known = names(scope)
  for field in FIELDS:
    if field.kind == CHECKED and field.name in known and field.name in hf and not field.accepts(hf[field.name], hf):
      raise ValueError(f"{where}: field {field.name!r} = {hf[field.name]!r} is not supported (hico_jax "
                       f"implements {field.supported}: {field.reason})")
  unknown = sorted(set(hf) - known)
  if unknown:
    logging.warning("%s: unknown config.json field(s) %s, ignored: they are not among the official code's "
                    "fields (hico_jax/convert/config_fields.py); check that they do not change the model",
                    where, unknown)
