"""The composed HiCo model (clips -> UMT-L -> merge to 64 -> projector -> splice -> Qwen2): sharded == single
device, gradients reach every tower, 16·T tokens spliced in order, logits and greedy ids against the torch
ClipEncoder + transformers Qwen2, the official layout round trip, and the errors a user gets for bad input.

Tiny configs of the real code: UMT with width 128, 2 heads of 64 (hd64 as in UMT-L), 2 blocks; 112 px gives
4 x 49 = 196 tokens a clip (merged 98, 34 -> 64), 224 px 784 (392, 196, 98, 34 -> 64)."""

import dataclasses
import functools
import json
import os
import re

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch
from safetensors import safe_open

import hico_jax
from hico_jax import VIDEO_TOKEN_ID, api, presets, sharding
from hico_jax.convert import videochat_flash
from hico_jax.models import hico
from tests.hf_reference import videochat_flash_reference

VOCAB, HIDDEN = 320, 64


def _tiny_config(image_size=112, encode_chunk=4, tied=True) -> hico.HiCoConfig:
  return hico.HiCoConfig.from_dict({
      "vit": dict(image_size=image_size, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", vocab_size=VOCAB, num_layers=2, tie_word_embeddings=tied)),
      "encode_chunk": encode_chunk})


def _noisy_params(config, seed):
  """Init params with noise on every leaf: init leaves biases at 0 and norm scales at 1, and a converter or
  a sharding that dropped one of them would go unnoticed."""
  params = nn.unbox(hico.HiCo(config).init(jax.random.key(seed), *hico.init_inputs(config)))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0.0, 0.05, x.shape).astype(np.float32), params)


def _frames(rng, *shape):
  """Normalised frames (..., S, S, 3); every frame differs, so a clip taken out of order changes the output."""
  return rng.normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
  config = _tiny_config()
  return config, hico.HiCo(config), _noisy_params(config, seed=0)


# ----------------------------------------------------------------------------------------------------------
# 1. Sharded == single device

_FRAMES = 12             # 3 clips a video, 12 clips in the batch: encode_chunk 4 takes 3 scan steps, and the
_PREFIX = (5, 9, 13, 7)  # clips of rows 1 and 2 straddle two steps. Prompt text before each row's video.


@pytest.fixture(scope="module")
def video_batch(tiny):
  """4 rows, one video each; the placeholders straddle the seq-shard boundary; row 2 is right-padded; labels
  supervise only the answer after the video."""
  config, _, _ = tiny
  rng = np.random.default_rng(1)
  visual = config.visual_tokens(_FRAMES)                      # 192
  length = 224
  ids = rng.integers(0, VOCAB, (4, length)).astype(np.int32)
  segment_ids = np.ones((4, length), np.int32)
  labels = np.full((4, length), -100, np.int32)
  for row, prefix in enumerate(_PREFIX):
    ids[row, prefix:prefix + visual] = VIDEO_TOKEN_ID
    labels[row, prefix + visual:] = ids[row, prefix + visual:]
  segment_ids[2, 215:] = 0
  labels[2, 215:] = -100
  video = _frames(rng, 4, 1, _FRAMES, 112, 112, 3)
  return ids, video, segment_ids, labels


def _logits_and_loss(model, params, ids, video, segment_ids, labels):
  logits, _ = model.apply({"params": params}, ids, video, segment_ids=segment_ids)
  loss, _ = model.apply({"params": params}, ids, labels, video, segment_ids=segment_ids, method=hico.HiCo.loss)
  return logits, loss


@pytest.fixture(scope="module")
def single_device_outputs(tiny, video_batch):
  _, model, params = tiny
  device = jax.devices()[0]
  logits, loss = jax.jit(functools.partial(_logits_and_loss, model))(*jax.device_put((params,) + video_batch, device))
  return np.asarray(logits), float(loss)


@pytest.mark.parametrize("mesh_config", [
    # ~21 s on 2 cores: slow; the second mesh shards fsdp and tensor too, and the sequence besides.
    pytest.param([("data", 2), ("fsdp", 2), ("tensor", 2)], marks=pytest.mark.slow),
    [("fsdp", 2), ("seq", 2), ("tensor", 2)],
], ids=["data2_fsdp2_tensor2", "fsdp2_seq2_tensor2"])
def test_sharded_logits_and_loss_match_single_device_with_clips_split_over_devices(
    tiny, video_batch, single_device_outputs, mesh_config):
  config, model, params = tiny
  ids, video, segment_ids, labels = video_batch
  expected_logits, expected_loss = single_device_outputs

  mesh = sharding.make_mesh(mesh_config)
  size = dict(mesh.shape)
  clip_devices = size["data"] * size["fsdp"] * size["seq"]
  assert config.encode_chunk % clip_devices == 0, "each device must get whole clips of every chunk"
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *hico.init_inputs(config))
    sharded_params = jax.device_put(params, sharding.logical_to_sharding(abstract, mesh)["params"])
    tokens = sharding.named_sharding(mesh, "act_batch", "act_len")
    frames = sharding.named_sharding(mesh, "act_batch", None, None, None, None, None)
    args = (sharded_params, jax.device_put(ids, tokens), jax.device_put(video, frames),
            jax.device_put(segment_ids, tokens), jax.device_put(labels, tokens))
    compiled = jax.jit(functools.partial(_logits_and_loss, model)).lower(*args).compile()
    logits, loss = compiled(*args)

  # The vision tower really runs on a slice of each chunk: its (clips, 196 tokens, width 128) activations
  # exist per device only as (chunk / clip devices) clips, never as the whole chunk.
  hlo = compiled.as_text()
  per_device = config.encode_chunk // clip_devices
  shapes = sorted(set(re.findall(r"f32\[\d+,196,128\]", hlo)))
  assert shapes == [f"f32[{per_device},196,128]"], f"per-device vision tower activations: {shapes}"
  # The weights are split too: the ViT's attention output (blocks, heads, head_dim, width) and MLP
  # (blocks, width, mlp) kernels, and the projector's fc1 (width, hidden).
  blocks = sharded_params["visual"]["vision_tower"]["blocks"]
  fsdp, tensor = size["fsdp"] * size["seq"], size["tensor"]
  assert blocks["proj"]["kernel"].addressable_shards[0].data.shape == (2, 2 // tensor, 64, 128 // fsdp)
  assert blocks["fc1"]["kernel"].addressable_shards[0].data.shape == (2, 128 // fsdp, 256 // tensor)
  fc1 = sharded_params["visual"]["projector"]["fc1"]["kernel"]
  assert fc1.addressable_shards[0].data.shape == (128 // tensor, HIDDEN // fsdp)

  diff = np.max(np.abs(np.asarray(logits) - expected_logits))
  assert diff <= 1e-5, f"sharded logits differ from single-device logits by {diff}"
  assert abs(float(loss) - expected_loss) <= 1e-5, (float(loss), expected_loss)


# ----------------------------------------------------------------------------------------------------------
# 2. Gradients

def test_loss_gradients_reach_vision_tower_projector_and_llm(tiny, video_batch):
  _, model, params = tiny
  ids, video, segment_ids, labels = video_batch
  # Two rows suffice, and keep the padded one.
  ids, video, segment_ids, labels = (x[1:3] for x in (ids, video, segment_ids, labels))

  def loss(p):
    return model.apply({"params": p}, ids, labels, video, segment_ids=segment_ids, method=hico.HiCo.loss)[0]

  loss_fn = jax.jit(loss)
  grads = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))

  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), f"non-finite gradient at {jax.tree_util.keystr(path)}"
  vit, projector, llm = grads["visual"]["vision_tower"], grads["visual"]["projector"], grads["llm"]
  for name, g in [("vit patch_kernel", vit["patch_kernel"]),
                  ("vit block 0 fc1", vit["blocks"]["fc1"]["kernel"][0]),
                  ("vit block 1 attention out", vit["blocks"]["proj"]["kernel"][1]),
                  ("projector fc1", projector["fc1"]["kernel"]),
                  ("llm layer 0 q_proj", llm["layers"]["self_attn"]["q_proj"]["kernel"][0]),
                  ("llm layer 1 down_proj", llm["layers"]["mlp"]["down_proj"]["kernel"][1])]:
    assert np.abs(g).max() > 0, f"{name} gets no gradient"

  # The vision gradient is the derivative of the loss: a central difference along it agrees.
  direction = jax.tree.map(np.zeros_like, params)
  direction["visual"]["vision_tower"]["patch_kernel"] = vit["patch_kernel"] / np.linalg.norm(vit["patch_kernel"])
  step = 1e-2
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  numeric = (float(loss_fn(shifted(step))) - float(loss_fn(shifted(-step)))) / (2 * step)
  np.testing.assert_allclose(numeric, np.linalg.norm(vit["patch_kernel"]), rtol=2e-2)


# ----------------------------------------------------------------------------------------------------------
# 3. Token counts and splicing

def _encode(model, params, video):
  return np.asarray(jax.jit(functools.partial(model.apply, method=hico.HiCo.encode_video))({"params": params},
                                                                                             video))


def test_video_of_t_frames_gives_16t_tokens_with_clips_encoded_alone_in_time_order(tiny):
  _, model, params = tiny
  rng = np.random.default_rng(2)
  clips = _frames(rng, 2, 3, 4, 112, 112, 3)                   # 2 videos of 3 clips
  alone = _encode(model, params, clips.reshape(6, 1, 4, 112, 112, 3))   # (6, 64, H): each clip on its own
  for frames in (4, 8, 12):                                    # 2, 4, 6 clips; 6 fill 2 chunks of 4 with padding
    video = clips[:, :frames // 4].reshape(2, 1, frames, 112, 112, 3)
    tokens = _encode(model, params, video)
    assert tokens.shape == (2, 16 * frames, HIDDEN)
    expected = alone.reshape(2, 3, 64, HIDDEN)[:, :frames // 4].reshape(2, 16 * frames, HIDDEN)
    np.testing.assert_allclose(tokens, expected, atol=1e-5, rtol=0)


def test_kth_placeholder_receives_kth_visual_token_and_text_keeps_its_embedding(tiny):
  _, model, params = tiny
  rng = np.random.default_rng(3)
  video = _frames(rng, 2, 1, 8, 112, 112, 3)
  ids = rng.integers(0, VOCAB, (2, 150)).astype(np.int32)
  ids[0, 3:3 + 128] = VIDEO_TOKEN_ID
  ids[1, 20:20 + 128] = VIDEO_TOKEN_ID
  embedded = np.asarray(jax.jit(functools.partial(model.apply, method=hico.HiCo.embed))({"params": params}, ids,
                                                                                         video))
  visual = _encode(model, params, video)
  table = params["llm"]["embed_tokens"]["embedding"]
  for row in range(2):
    at = np.flatnonzero(ids[row] == VIDEO_TOKEN_ID)
    np.testing.assert_array_equal(embedded[row, at], visual[row])
    text = np.flatnonzero(ids[row] != VIDEO_TOKEN_ID)
    np.testing.assert_array_equal(embedded[row, text], table[ids[row, text]])


def test_visual_tokens_encoded_beforehand_give_the_videos_logits_and_both_are_refused(tiny):
  """visual_tokens= (the held-out scoring encodes a question's video once for its candidate rows): the same
  logits as passing the video itself, the path the torch parity test checks; video and tokens together are
  refused, since which to splice would be a guess."""
  _, model, params = tiny
  rng = np.random.default_rng(5)
  video = _frames(rng, 1, 1, 8, 112, 112, 3)
  ids = rng.integers(0, VOCAB, (3, 140)).astype(np.int32)
  for row, at in enumerate((2, 5, 9)):
    ids[row, at:at + 128] = VIDEO_TOKEN_ID
  with_video, _ = model.apply({"params": params}, ids, np.repeat(video, 3, axis=0))
  tokens = _encode(model, params, video)                         # (1, 128, H), broadcast to the three rows
  beforehand, _ = model.apply({"params": params}, ids, visual_tokens=np.repeat(tokens, 3, axis=0))
  np.testing.assert_allclose(beforehand, with_video, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="not both"):
    model.apply({"params": params}, ids, np.repeat(video, 3, axis=0), visual_tokens=np.repeat(tokens, 3, axis=0))


def test_packed_row_gets_sample_1s_tokens_then_sample_2s(tiny):
  """Two samples per row, each with its video (B, 2, T, ...); each sample's placeholders sit inside its own
  text, so the two spans are apart."""
  _, model, params = tiny
  rng = np.random.default_rng(4)
  video = _frames(rng, 2, 2, 4, 112, 112, 3)
  ids = rng.integers(0, VOCAB, (2, 160)).astype(np.int32)
  starts = [(2, 90), (10, 80)]                                 # per row: sample 1's span, sample 2's span
  for row, (first, second) in enumerate(starts):
    ids[row, first:first + 64] = VIDEO_TOKEN_ID
    ids[row, second:second + 64] = VIDEO_TOKEN_ID
  embedded = np.asarray(jax.jit(functools.partial(model.apply, method=hico.HiCo.embed))({"params": params}, ids,
                                                                                         video))
  for row, (first, second) in enumerate(starts):
    sample_1 = _encode(model, params, video[row:row + 1, 0:1])[0]
    sample_2 = _encode(model, params, video[row:row + 1, 1:2])[0]
    np.testing.assert_allclose(embedded[row, first:first + 64], sample_1, atol=1e-5, rtol=0)
    np.testing.assert_allclose(embedded[row, second:second + 64], sample_2, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 4. End to end against torch ClipEncoder + transformers Qwen2

@pytest.fixture(scope="module")
def saved_224(tmp_path_factory):
  """A tiny untied HiCo at 224 px (a released tower size, so the official layout can name it), saved through
  the public API in float32."""
  config = _tiny_config(image_size=224, tied=False)
  params = _noisy_params(config, seed=5)
  path = tmp_path_factory.mktemp("hico_224")
  api.CausalLM(config, params).save_pretrained(str(path))
  return path, config, params


def test_reloaded_model_matches_torch_clip_encoder_and_transformers_logits_and_greedy_ids(saved_224):
  path, config, _ = saved_224
  model = hico_jax.from_pretrained(str(path))
  encoder, llm = videochat_flash_reference(path, config)

  rng = np.random.default_rng(6)
  frames, length = 8, 24
  video = _frames(rng, 2, frames, 224, 224, 3)
  ids = rng.integers(0, VOCAB, (2, length))
  where = [6, 15]                                              # one placeholder a row, at different places
  for row, at in enumerate(where):
    ids[row, at] = VIDEO_TOKEN_ID

  logits = model(ids, video=video)
  new_ids = model.generate(ids, video=video, max_new_tokens=8)
  with torch.no_grad():
    visual = encoder(torch.from_numpy(video).permute(0, 1, 4, 2, 3))          # (B, 16·T, H)
    text = llm.model.embed_tokens(torch.from_numpy(np.maximum(ids, 0)))
    embeds = torch.stack([torch.cat([text[row, :at], visual[row], text[row, at + 1:]])
                          for row, at in enumerate(where)])
    expected = llm(inputs_embeds=embeds).logits.numpy()
    expected_ids = llm.generate(inputs_embeds=embeds, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=0)[:, -8:].numpy()

  assert logits.shape == (2, length - 1 + 16 * frames, VOCAB)
  ours_visual = np.asarray(hico.HiCo(model.config).apply({"params": model.params}, video[:, None],
                                                         method=hico.HiCo.encode_video))
  np.testing.assert_allclose(ours_visual, visual.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(new_ids, expected_ids)


# ----------------------------------------------------------------------------------------------------------
# 5. Official layout: bit-identical round trip, config.json, full-size key counts

def _tensor_bytes(path):
  with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
    return {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).shape, f.get_tensor(k).tobytes()) for k in f.keys()}


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", True)])
def test_official_layout_save_load_save_is_bit_identical(tmp_path, dtype, tied):
  config = _tiny_config(image_size=224, tied=tied)
  params = _noisy_params(config, seed=7)
  first, second = tmp_path / "first", tmp_path / "second"
  api.CausalLM(config, params).save_pretrained(str(first), dtype=dtype)
  reloaded = hico_jax.from_pretrained(str(first))
  reloaded.save_pretrained(str(second))                       # in the dtype it was loaded from

  a, b = _tensor_bytes(first), _tensor_bytes(second)
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key] == b[key], f"{key} changed in the round trip"
  # 2 blocks x 13 + patch 2 + final norm 2 + projector 4 + LLM 2 x 12 + embed + norm (+ untied lm_head).
  assert len(a) == 26 + 4 + 4 + 24 + 2 + (0 if tied else 1)
  assert ("lm_head.weight" in a) == (not tied)
  assert {dt for dt, _, _ in a.values()} == {dtype}
  with open(first / "config.json") as f1, open(second / "config.json") as f2:
    assert json.load(f1) == json.load(f2)
  if dtype == "float32":                                      # the params themselves came back unchanged
    jax.tree.map(np.testing.assert_array_equal, reloaded.stacked_params(), params)
  assert reloaded.config.vit == dataclasses.replace(config.vit, remat_policy="none")
  # from_pretrained's kernel for this machine (a CPU: the chunked one), not the saved config's.
  assert reloaded.config.llm == dataclasses.replace(config.llm, remat_policy="none", attention_impl="chunked")


def _param_count_by_hand(config):
  """UMT blocks, patch embed, final norm; the projector; the Qwen2 decoder (videochat_flash.md §1, §3, §4)."""
  w, f, p = config.vit.width, config.vit.mlp_dim, config.vit.patch_size
  block = 2 * w + (3 * w * w + 2 * w) + (w * w + w) + 2 * w + (w * f + f) + (f * w + w)
  vit = config.vit.depth * block + (3 * p * p * w + w) + 2 * w
  c = config.llm
  d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  projector = w * d + d + d * d + d
  layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * c.intermediate_size + 2 * d
  llm = c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_layers * layer + d
  return vit, vit + projector + llm


@pytest.mark.parametrize("preset,tower,keys", [
    ("hico_7b", "umt-large", 646),
    ("hico_7b_448", "umt-hd-large", 646),
    ("hico_2b", "umt-hd-large", 645),
])
def test_full_size_config_names_the_released_tower_and_has_the_official_key_count(preset, tower, keys):
  config = hico.HiCoConfig.from_dict(dict(presets.hico(preset)))
  hf = videochat_flash.hico_to_hf_config(config, "bfloat16")
  assert hf["mm_vision_tower"] == tower
  assert videochat_flash.VISION_CONFIG_FIELD not in hf        # a standard UMT-L is named, not described
  compute = dict(dtype=config.llm.dtype, param_dtype=config.llm.param_dtype, remat_policy=config.llm.remat_policy,
                 attention_impl=config.llm.attention_impl)
  back = videochat_flash.hf_config_to_hico(json.loads(json.dumps(hf)), **compute)
  assert back.vit == config.vit and back.llm == config.llm

  assert len(videochat_flash.expected_hf_shapes(config)) == keys      # videochat_flash.md §8: 646 / 645
  abstract = jax.eval_shape(hico.HiCo(config).init, jax.random.key(0), *hico.init_inputs(config))
  leaves = jax.tree.leaves(nn.unbox(abstract)["params"])
  vit_count, total = _param_count_by_hand(config)
  assert vit_count == 290_479_104                              # UMT-L, 23 blocks (videochat_flash.md §1)
  assert sum(int(np.prod(x.shape)) for x in leaves) == total
  assert sum(int(np.prod(s)) for s in videochat_flash.expected_hf_shapes(config).values()) == total


# ----------------------------------------------------------------------------------------------------------
# 6. Bad input: a clear error before anything compiles

@pytest.fixture()
def api_model(tiny):
  config, _, params = tiny
  model = api.CausalLM(config, params)

  def compiled(*_, **__):
    raise AssertionError("the model compiled and ran before refusing the input")

  model._embed = model._forward = compiled
  return model


_IDS = np.array([[1, 2, VIDEO_TOKEN_ID, 3]])


@pytest.mark.parametrize("ids,video,message", [
    (_IDS, np.zeros((1, 6, 112, 112, 3), np.float32), r"multiple of 4, got T=6"),
    (_IDS, np.zeros((1, 0, 112, 112, 3), np.float32), r"multiple of 4, got T=0"),
    (_IDS, np.zeros((1, 8, 96, 96, 3), np.float32), r"112x112x3.*got 96x96x3"),
    (np.array([[1, 2, 3]]), np.zeros((1, 4, 112, 112, 3), np.float32), r"row 0 holds 0 video placeholders"),
    (_IDS, None, r"row 0 holds the video placeholder -200, but no video was given"),
    (np.array([[1, VIDEO_TOKEN_ID, 3, 4], [1, VIDEO_TOKEN_ID, 2, VIDEO_TOKEN_ID]]), np.zeros((2, 4, 112, 112, 3), np.float32),
     r"row 1 holds 2 video placeholders"),
], ids=["frames_not_multiple_of_4", "no_frames", "wrong_resolution", "video_without_placeholder",
        "placeholder_without_video", "two_placeholders_in_a_row"])
def test_bad_video_input_is_refused_before_compiling(api_model, ids, video, message):
  with pytest.raises(ValueError, match=message):
    api_model(ids, video=video)
  with pytest.raises(ValueError, match=message):
    api_model.generate(ids, video=video, max_new_tokens=2)


def test_frames_not_multiple_of_4_are_refused_when_tracing_the_module(tiny):
  config, model, params = tiny
  with pytest.raises(ValueError, match=r"multiple of 4, got T=6"):
    jax.eval_shape(functools.partial(model.apply, method=hico.HiCo.encode_video), {"params": params},
                   jnp.zeros((1, 1, 6, 112, 112, 3)))


@pytest.mark.parametrize("field,value,message", [
    ("mm_vision_tower", "internvideo2", r"mm_vision_tower = 'internvideo2' is not supported"),
    ("mm_llm_compress", True, r"mm_llm_compress = true"),
    ("mm_projector_type", "mlp2x_gelu", r"'mm_projector_type' = 'mlp2x_gelu' is not supported"),
])
def test_unsupported_config_json_is_refused_naming_the_field(tmp_path, field, value, message):
  hf = videochat_flash.hico_to_hf_config(_tiny_config(image_size=224), "float32")
  hf[field] = value
  with open(tmp_path / "config.json", "w") as f:     # no weights needed: the config is refused first
    json.dump(hf, f)
  with pytest.raises(ValueError, match=message) as error:
    hico_jax.from_pretrained(str(tmp_path))
  assert "config.json" in str(error.value)
