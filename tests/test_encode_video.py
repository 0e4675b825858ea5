"""A video encoded once, chunk by chunk, on the device (hico_jax.infer.visual), and the API's
`encode_video` / `visual_tokens=`: the device's normalisation against data.video.normalize, the chunked
tokens against the independent torch ClipEncoder, generation from visual tokens against generation from
frames, and the errors a user gets, before anything compiles.

Tiny configs of the real code (as in test_hico): UMT width 128, 2 heads, 2 blocks, 112 px."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from hico_jax import VIDEO_TOKEN_ID, api, presets
from hico_jax.data import video as video_io
from hico_jax.infer import visual
from hico_jax.models import hico
from hico_jax.models.visual_dropout import VisualDropoutConfig
from tests.hf_reference import videochat_flash_reference
from tests.random_params import random_hico_params

SIZE, VOCAB = 112, 320


def _config(**llm) -> hico.HiCoConfig:
  return hico.HiCoConfig.from_dict({
      "vit": dict(image_size=SIZE, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", **{"dtype": "float32", "vocab_size": VOCAB, "num_layers": 3, **llm}))})


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  return config, random_hico_params(config, seed=11)


def _video(rng, frames):
  """uint8 frames at the tower's size: smooth random colour fields, each frame its own."""
  coarse = rng.integers(0, 256, (frames, 4, 4, 3), dtype=np.uint8)
  return video_io.resize_frames(coarse, SIZE)


# ----------------------------------------------------------------------------------------------------------
# Normalisation on the device


def test_device_normalisation_is_data_video_normalize_bit_for_bit():
  a = np.arange(256)
  frames = np.stack([a, a[::-1], a * 7 % 256], -1).reshape(4, 8, 8, 3).astype(np.uint8)   # each level, each channel
  random = np.random.default_rng(0).integers(0, 256, (2, 4, 37, 61, 3), dtype=np.uint8)
  for x in (frames, random):
    out = np.asarray(jax.jit(visual.normalize_on_device)(x))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, video_io.normalize(x))
  # The host's formula, written out here from UMTImageProcessor's steps: x / 255 in float64, then float32.
  x = np.arange(256, dtype=np.float64)[:, None]
  want = ((x * (1 / 255)).astype(np.float32) - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
  np.testing.assert_array_equal(np.asarray(visual.normalize_on_device(np.arange(256, dtype=np.uint8)[:, None]
                                                                      .repeat(3, 1))), want)


# ----------------------------------------------------------------------------------------------------------
# Chunked encoding


@pytest.fixture(scope="module")
def torch_encoder(tiny, tmp_path_factory):
  config, params = tiny
  path = tmp_path_factory.mktemp("encode_video_tiny")
  api.CausalLM(config, params).save_pretrained(str(path))
  return videochat_flash_reference(str(path), config)[0]


def test_chunks_with_a_padded_last_one_give_the_torch_clip_encoders_tokens(tiny, torch_encoder):
  config, params = tiny
  frames = _video(np.random.default_rng(1), 20)                   # 5 clips
  with torch.no_grad():
    expected = torch_encoder(torch.from_numpy(video_io.normalize(frames))[None].permute(0, 1, 4, 2, 3))[0].numpy()
  by_two = visual.VideoEncoder(config, params, chunk_clips=2)      # chunks of 2, 2 and 1 padded to 2
  tokens = by_two(frames)
  assert isinstance(tokens, jax.Array) and tokens.shape == (5 * 64, config.llm.hidden_size)
  np.testing.assert_allclose(np.asarray(tokens), expected, atol=1e-4, rtol=0)
  # One chunk (5 clips padded to 8) and the model's own whole-video path agree with the chunks of two.
  whole = visual.VideoEncoder(config, params)(frames)
  module_path = hico.HiCo(config).apply({"params": params}, video_io.normalize(frames)[None, None],
                                        method=hico.HiCo.encode_video)[0]
  np.testing.assert_allclose(np.asarray(whole), np.asarray(tokens), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(module_path), np.asarray(tokens), atol=1e-5, rtol=0)
  # One compiled program per chunk shape: the padded last chunk reuses the full chunks' program.
  assert by_two.encode_chunk._cache_size() == 1
  by_two(frames[:12])
  assert by_two.encode_chunk._cache_size() == 1


def test_chunk_size_defaults_to_fewer_clips_at_448_and_short_videos_take_a_power_of_two(tiny):
  config, params = tiny
  at = lambda size: dataclasses.replace(config, vit=dataclasses.replace(config.vit, image_size=size))
  assert visual.default_chunk_clips(at(224)) == 64 and visual.default_chunk_clips(at(448)) == 16
  encoder = visual.VideoEncoder(config, params, chunk_clips=16)
  assert [encoder.chunk_for(n) for n in (1, 2, 3, 5, 16, 17, 2500)] == [1, 2, 4, 8, 16, 16, 16]


def test_tokens_come_in_the_llms_compute_dtype(tiny):
  config, params = tiny
  bf16 = dataclasses.replace(config, llm=dataclasses.replace(config.llm, dtype="bfloat16"))
  tokens = visual.VideoEncoder(bf16, params)(_video(np.random.default_rng(2), 4))
  assert tokens.dtype == jax.numpy.bfloat16


@pytest.mark.parametrize("frames, message", [
    (np.zeros((8, SIZE, SIZE, 3), np.float64), r"uint8 \(frames, 112, 112, 3\).*got float64"),
    (np.zeros((8, 224, 224, 3), np.uint8), r"size=112\)\), got uint8 \(8, 224, 224, 3\)"),
    (np.zeros((1, 8, SIZE, SIZE, 3), np.uint8), r"got uint8 \(1, 8, 112, 112, 3\)"),
    (np.zeros((6, SIZE, SIZE, 3), np.uint8), "positive multiple of 4 .*whole clips.*got 6"),
    (np.zeros((0, SIZE, SIZE, 3), np.uint8), "positive multiple of 4 .*got 0"),
])
def test_frames_the_encoder_cannot_take_fail_with_one_line_before_compiling(tiny, frames, message):
  config, params = tiny
  encoder = visual.VideoEncoder(config, params)
  with pytest.raises(ValueError, match=message) as e:
    encoder(frames)
  assert "\n" not in str(e.value) and encoder.encode_chunk._cache_size() == 0
  with pytest.raises(ValueError, match="chunk_clips must be a positive number of clips, got 0"):
    visual.VideoEncoder(config, params, chunk_clips=0)


# ----------------------------------------------------------------------------------------------------------
# The API: encode_video and visual_tokens=


def _padded_batch(rng, frames):
  """Two prompts, the first left-padded by 5, the video placeholder at different places."""
  ids = rng.integers(0, VOCAB, (2, 20)).astype(np.int32)
  ids[0, 9], ids[1, 4] = VIDEO_TOKEN_ID, VIDEO_TOKEN_ID
  mask = np.ones_like(ids)
  mask[0, :5] = 0
  return ids, mask, np.stack([_video(rng, frames), _video(rng, frames)])


@pytest.mark.parametrize("dropout", [None, VisualDropoutConfig(layers=(1, 2), ratios=(1.0, 0.75, 0.25))],
                         ids=["plain", "visual_dropout"])
def test_generation_from_visual_tokens_equals_generation_from_frames_for_a_padded_batch(tiny, dropout):
  config, params = tiny
  model = api.CausalLM(dataclasses.replace(config, visual_dropout=dropout), params)
  ids, mask, frames = _padded_batch(np.random.default_rng(3), 8)
  pixels = video_io.normalize(frames)                                      # the float32 `video=` takes
  tokens = np.stack([np.asarray(model.encode_video(f)) for f in frames])   # (2, 128, H)

  from_frames = model.generate(ids, video=pixels, attention_mask=mask, max_new_tokens=6, eos_ids=[])
  from_tokens = model.generate(ids, visual_tokens=tokens, attention_mask=mask, max_new_tokens=6, eos_ids=[])
  np.testing.assert_array_equal(from_tokens, from_frames)
  logits_frames = model(ids, video=pixels, attention_mask=mask)
  logits_tokens = model(ids, visual_tokens=jax.numpy.asarray(tokens), attention_mask=mask)
  # Padding rows are not compared: their logits are whatever attention over nothing gives.
  np.testing.assert_allclose(logits_tokens[0, 5:], logits_frames[0, 5:], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits_tokens[1], logits_frames[1], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def model(tiny):
  return api.CausalLM(*tiny)


@pytest.mark.parametrize("case, message", [
    ("both", "either as video= .* or as visual_tokens= .*, not both"),
    ("two_dims", r"visual_tokens must be \(batch=1, tokens, hidden=64\), got shape \(128, 64\).*\[None\]"),
    ("wrong_hidden", r"hidden=64\), got shape \(1, 128, 32\)"),
    ("wrong_batch", r"batch=1, .*got shape \(2, 128, 64\)"),
    ("partial_clip", "hold 100 tokens a row, not a whole number of clips of 64 tokens"),
    ("no_placeholder", "row 0 holds 0 video placeholders"),
    ("integer", "must be floating point, got int32"),
])
def test_bad_visual_tokens_fail_with_one_line_before_compiling(model, case, message):
  ids = np.array([[1, VIDEO_TOKEN_ID, 2]])
  tokens = np.zeros((1, 128, 64), np.float32)
  kwargs = dict(visual_tokens=tokens)
  if case == "both":
    kwargs["video"] = np.zeros((1, 4, SIZE, SIZE, 3), np.float32)
  elif case == "two_dims":
    kwargs["visual_tokens"] = tokens[0]
  elif case == "wrong_hidden":
    kwargs["visual_tokens"] = tokens[..., :32]
  elif case == "wrong_batch":
    kwargs["visual_tokens"] = np.concatenate([tokens, tokens])
  elif case == "partial_clip":
    kwargs["visual_tokens"] = tokens[:, :100]
  elif case == "no_placeholder":
    ids = np.array([[1, 2, 3]])
  elif case == "integer":
    kwargs["visual_tokens"] = tokens.astype(np.int32)
  for call in (model, lambda *a, **k: model.generate(*a, max_new_tokens=2, **k)):
    with pytest.raises(ValueError, match=message) as e:
      call(ids, **kwargs)
    assert "\n" not in str(e.value)
  assert model._splice._cache_size() == 0


def test_a_plain_qwen2_model_refuses_visual_tokens_and_encode_video(tiny):
  config, params = tiny
  plain = api.CausalLM(config.llm, params["llm"])
  with pytest.raises(ValueError, match="plain Qwen2 language model and takes no video"):
    plain(np.array([[1, 2]]), visual_tokens=np.zeros((1, 64, 64), np.float32))
  with pytest.raises(ValueError, match="plain Qwen2 language model and has no vision tower"):
    plain.encode_video(np.zeros((4, SIZE, SIZE, 3), np.uint8))
