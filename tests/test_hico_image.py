"""Images through the model: tiles encoded at T = 1 and merged alone to 64 tokens equal the independent PyTorch
tower + merge + projector (tests/torch_reference) at 224 and 448; a prompt with one image (anyres_nopad) or
several (pad) gives transformers' logits on the reference's embedding layout."""

import numpy as np
import pytest
import torch
from PIL import Image

import hico_jax
from hico_jax import VIDEO_TOKEN_ID, api, presets
from hico_jax.models import hico
from tests.hf_reference import videochat_flash_reference
from tests.random_params import random_hico_params
from tests.torch_reference.llava_anyres import (ref_expand2square, ref_process_anyres_image_nopad,
                                                ref_processor_pixels, ref_spatial_nopad_layout)

VOCAB = 320
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _config(image_size):
  return hico.HiCoConfig.from_dict({
      "vit": dict(image_size=image_size, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", vocab_size=VOCAB, num_layers=2, tie_word_embeddings=False)),
      "encode_chunk": 2})


@pytest.fixture(scope="module", params=[224, 448])
def saved(request, tmp_path_factory):
  config = _config(request.param)
  path = tmp_path_factory.mktemp(f"hico_image_{request.param}")
  api.CausalLM(config, random_hico_params(config, seed=7)).save_pretrained(str(path))
  return path, config


def _photo(width, height, seed):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 / width, y * 255 / height, (3 * x + y) % 256], -1)
  return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


def _normalised(pixels_uint8):
  """(N, S, S, 3) uint8 -> the processor's (N, 1, 3, S, S) float32 tensor: one T = 1 frame per tile."""
  x = ((pixels_uint8.astype(np.float64) / 255 - MEAN) / STD).astype(np.float32)
  return torch.from_numpy(x).permute(0, 3, 1, 2)[:, None]


def test_image_tiles_give_the_torch_towers_t1_tokens_merged_alone(saved):
  path, config = saved
  model = hico_jax.from_pretrained(str(path))
  encoder, _ = videochat_flash_reference(path, config)
  size = config.vit.image_size
  pixels = np.random.default_rng(1).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
  with torch.no_grad():
    expected = encoder(_normalised(pixels)).numpy()                 # (5, 64, H): T = 1, merged one by one
  tiles = _normalised(pixels)[:, 0].permute(0, 2, 3, 1).numpy()[None]
  ours = hico.HiCo(model.config).apply({"params": model.params}, tiles, method=hico.HiCo.encode_images)
  assert expected.shape == (5, 64, config.llm.hidden_size)
  np.testing.assert_allclose(np.asarray(ours)[0], expected.reshape(-1, expected.shape[-1]), atol=1e-4, rtol=0)


def _reference_logits(encoder, llm, ids, visual_per_placeholder):
  with torch.no_grad():
    text = llm.model.embed_tokens(torch.from_numpy(np.maximum(ids, 0)))
    pieces, start = [], 0
    for at, visual in zip(np.flatnonzero(ids == VIDEO_TOKEN_ID), visual_per_placeholder):
      pieces += [text[start:at], torch.from_numpy(visual)]
      start = at + 1
    pieces.append(text[start:])
    return llm(inputs_embeds=torch.cat(pieces)[None]).logits[0].numpy()


def test_one_image_anyres_and_several_images_padded_match_transformers_on_the_reference_layout(saved):
  path, config = saved
  size = config.vit.image_size
  model = hico_jax.from_pretrained(str(path))
  encoder, llm = videochat_flash_reference(path, config)
  pinpoints = "(1x1),...,(6x6)"

  one = _photo(size * 5 // 2, size * 3 // 2, seed=2)                  # a 3x2 grid: base + 6 tiles, 448 tokens
  ids_one = np.array([11, 12, VIDEO_TOKEN_ID, 13, 14, 15])
  with torch.no_grad():
    tile_tokens = encoder(_normalised(ref_process_anyres_image_nopad(one, size, pinpoints))).numpy()
  visual_one = ref_spatial_nopad_layout(tile_tokens, one.size, pinpoints, size)
  assert visual_one.shape[0] == 7 * 64
  expected_one = _reference_logits(encoder, llm, ids_one, [visual_one])

  several = [_photo(size + 40, size // 2, seed=3), _photo(30, 70, seed=4), _photo(size, size, seed=5)]
  ids_several = np.array([VIDEO_TOKEN_ID, 21, VIDEO_TOKEN_ID, 22, 23, VIDEO_TOKEN_ID, 24])
  mean = tuple(int(x * 255) for x in MEAN)
  with torch.no_grad():
    padded = [ref_processor_pixels(ref_expand2square(im, mean), size) for im in several]
    visual_several = [encoder(_normalised(p[None])).numpy()[0] for p in padded]
  expected_several = _reference_logits(encoder, llm, ids_several, visual_several)

  # Both prompts in one batch (the API left-pads the shorter expanded row), then greedy generation.
  ids = np.zeros((2, 7), np.int64)
  ids[0, 1:], ids[1] = ids_one, ids_several
  mask = np.array([[0] + [1] * 6, [1] * 7])
  logits = model(ids, attention_mask=mask, images=[one, several])
  assert logits.shape[1] == 1 + len(expected_one)               # row 0 keeps its one padding token
  np.testing.assert_allclose(logits[0, -len(expected_one):], expected_one, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits[1, -len(expected_several):], expected_several, atol=1e-4, rtol=0)

  new_ids = model.generate(ids_one[None], images=[one], max_new_tokens=4)
  greedy, prompt = [], ids_one
  for _ in range(4):                                                  # greedy by hand, the whole prompt each step
    greedy.append(int(np.argmax(_reference_logits(encoder, llm, prompt, [visual_one])[-1])))
    prompt = np.append(prompt, greedy[-1])
  np.testing.assert_array_equal(new_ids[0], greedy)


def test_image_prompt_errors_are_clear(saved):
  path, _ = saved
  model = hico_jax.from_pretrained(str(path))
  picture = _photo(50, 40, seed=0)
  with pytest.raises(ValueError, match="holds 1 image placeholders .* for 2 image"):
    model(np.array([[1, VIDEO_TOKEN_ID, 2]]), images=[[picture, picture]])
  with pytest.raises(ValueError, match="either video= or images="):
    model(np.array([[1, VIDEO_TOKEN_ID, 2]]), video=np.zeros((1, 4, 8, 8, 3)), images=[picture])


def test_a_tile_of_fewer_patches_than_64_keeps_every_patch_as_the_torch_tower_and_projector_give_them(tmp_path):
  """64 px tiles of 16 px patches (the embedded default's): 16 patches a tile, fewer than the 64 a tile is merged
  to, so every patch is kept (nothing to merge) and a tile gives 16 tokens: the torch tower's T = 1 patches
  through the torch projector, in patch order. A 4-frame clip at 64 px is 64 patches, the 64 it keeps."""
  config = _config(64)
  assert config.tokens_per_tile == 16 and config.pipeline_counts() == {
      "clip_frames": 4, "visual_tokens_per_frame": 16, "tokens_per_tile": 16}
  api.CausalLM(config, random_hico_params(config, seed=5)).save_pretrained(str(tmp_path))
  model = hico_jax.from_pretrained(str(tmp_path))
  encoder, _ = videochat_flash_reference(tmp_path, config)
  pixels = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  with torch.no_grad():
    expected = encoder.projector(encoder.encoder(_normalised(pixels))).numpy()       # (3, 16, H), no merge
  tiles = _normalised(pixels)[:, 0].permute(0, 2, 3, 1).numpy()[None]
  ours = hico.HiCo(model.config).apply({"params": model.params}, tiles, method=hico.HiCo.encode_images)
  assert expected.shape == (3, 16, config.llm.hidden_size) and ours.shape == (1, 3 * 16, config.llm.hidden_size)
  np.testing.assert_allclose(np.asarray(ours)[0], expected.reshape(-1, expected.shape[-1]), atol=1e-4, rtol=0)
