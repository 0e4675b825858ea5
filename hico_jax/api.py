"""The Hugging Face-like Python API: from_pretrained, __call__, generate, save_pretrained.

  model = hico_jax.from_pretrained(path)              # HF dir (plain Qwen2 or VideoChat-Flash) or a run dir
  logits = model(input_ids, video=frames)             # numpy in, float32 numpy (B, T, V) out
  ids = model.generate(input_ids, video=frames, max_new_tokens=32)   # greedy unless temperature > 0
  model.save_pretrained(out_dir)                      # the HF layout of the model, loadable by its owner

`input_ids` mark where a sample's video goes with one `hico_jax.VIDEO_TOKEN_ID` (-200); the model expands it
to the video's 16·T visual tokens, so logits cover the expanded sequence. `video` is (B, T, S, S, 3): uint8
frames at the tower's size (normalised on the device), or the float32 array `hico_jax.data.video.preprocess`
returns; either way it is encoded a chunk of clips at a time. For long videos, and for several questions
about one video, encode it once instead and pass its tokens:

  tokens = model.encode_video(frames_uint8)          # (T, S, S, 3) uint8 -> (16·T, H), chunked on the device
  ids = model.generate(input_ids, visual_tokens=tokens[None], max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax.tokens import VIDEO_TOKEN_ID
from hico_jax.convert import qwen2_hf, run_dir, videochat_flash
from hico_jax.infer import generate as generation, memory, visual
from hico_jax.models import hico, qwen2
from hico_jax.models.visual_dropout import VisualDropoutConfig
from hico_jax.ops import xla_options

class CausalLM:
  """A Qwen2 decoder (optionally with HiCo's video path) and its params, answering in numpy.

  `params` holds the decoder's layers one buffer per layer (`qwen2.unstack_layers`), which decodes twice as fast
  as the stacked training layout; `stacked_params()` gives the training layout, on the host."""

  def __init__(self, config, params, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
               checkpoint_dtype: str = "float32"):
    self.config = config
    self.eos_ids, self.pad_id, self.checkpoint_dtype = tuple(eos_ids), pad_id, checkpoint_dtype
    self.is_video_model = isinstance(config, hico.HiCoConfig)
    self.params = _unstack_decoder(jax.tree.map(jnp.asarray, params), self.is_video_model)
    self.llm_config = config.llm if self.is_video_model else config
    self.dropout = config.visual_dropout if self.is_video_model else None
    self.llm = qwen2.Qwen2ForCausalLM(self.llm_config, dropout=self.dropout)
    self.llm_params = self.params["llm"] if self.is_video_model else self.params
    self._forward = jax.jit(lambda p, ids, emb, seg, visual: self.llm.apply(
        {"params": p}, ids, embeddings=emb, segment_ids=seg, visual_mask=visual)[0])

  def __call__(self, input_ids, video=None, attention_mask=None, images=None, *, visual_tokens=None) -> np.ndarray:
    """Logits (B, T', V) float32 over the sequence with each video placeholder expanded (T' = T − 1 + 16·frames
    with a video, T without). attention_mask (B, T): 0 marks padding. With visual dropout the rows keep their
    length (the masked form): a dropped visual token's row is what it saw before it was dropped.
    visual_tokens (B, N, H), from encode_video, stand in for `video` (N = 16·frames). `images`: see
    `_prepare_images` (rows then left-padded to the longest expanded row)."""
    if images is not None:
      ids, mask, embeddings = self._prepare_images(input_ids, images, attention_mask, video)
    else:
      ids, mask, embeddings = self._prepare(input_ids, video, attention_mask, visual_tokens)
    segment_ids = None if attention_mask is None and self.dropout is None and images is None else jnp.asarray(mask)
    logits = self._forward(self.llm_params, jnp.asarray(np.maximum(ids, 0)), embeddings, segment_ids,
                           self._visual_mask(ids))
    return np.asarray(logits, np.float32)

  def generate(self, input_ids, video=None, attention_mask=None, *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_p: float = 1.0, eos_ids: Sequence[int] | None = None,
               pad_id: int | None = None, seed: int = 0, images=None, visual_tokens=None,
               prefix: generation.PromptCache | None = None, return_cache: bool = False):
    """New token ids (B, max_new_tokens); a row that produced an eos id is pad_id after it. visual_tokens and
    images as in __call__. A request the device cannot hold fails first, with the estimate and the frames that
    fit.

    A prompt's KV cache can serve the next prompt that starts with it (a chat's follow-up question): with
    return_cache=True this returns (ids, cache), and `prefix=cache` then takes input_ids that are only the
    new tokens after that prompt (no video, one row), which attend to the cached prompt instead of running the
    video through the decoder again. Only without visual dropout, whose kept tokens depend on the question."""
    if prefix is not None and (video is not None or visual_tokens is not None or images is not None):
      raise ValueError("with prefix=, input_ids are the tokens after the cached prompt, which already holds "
                       "its video or images: give no video, visual_tokens or images")
    self._check_memory(input_ids, video, visual_tokens, max_new_tokens)
    if images is not None:
      ids, mask, embeddings = self._prepare_images(input_ids, images, attention_mask, video)
    else:
      ids, mask, embeddings = self._prepare(input_ids, video, attention_mask, visual_tokens)
    given = np.asarray(input_ids)
    given_mask = np.ones_like(given) if attention_mask is None else np.asarray(attention_mask)
    return generation.generate(
        self.llm, {"params": self.llm_params}, np.maximum(ids, 0), mask, embeddings=embeddings,
        visual_mask=self._visual_mask(ids), max_new_tokens=max_new_tokens, eos_ids=self.eos_ids if eos_ids is None else eos_ids,
        pad_id=self.pad_id if pad_id is None else pad_id, temperature=temperature, top_p=top_p, seed=seed,
        prefix=prefix, return_cache=return_cache, prompt_ids=given[0][given_mask[0] > 0] if return_cache else None)

  def encode_video(self, frames_uint8, *, chunk_clips: int | None = None, progress: bool = True):
    """A video's visual tokens (16·T, H), a device array in the LLM's compute dtype, for `visual_tokens=`:
    frames (T, S, S, 3) uint8 at the tower's size (`hico_jax.data.video.decode_frames(..., size=S)`), T whole
    clips. Chunks of `chunk_clips` clips (default: hico_jax.infer.visual's) are normalised and encoded on the
    device; a video that takes more than a few seconds shows a progress bar."""
    if not self.is_video_model:
      raise ValueError("this checkpoint is a plain Qwen2 language model and has no vision tower; load a "
                       "VideoChat-Flash checkpoint to encode a video")
    if chunk_clips not in self._video_encoders:
      self._video_encoders[chunk_clips] = visual.VideoEncoder(self.config, self.params, chunk_clips=chunk_clips)
    return self._video_encoders[chunk_clips](frames_uint8, progress=progress)

  @functools.cached_property
  def _video_encoders(self) -> dict:
    return {}

  @functools.cached_property
  def _splice(self):
    module = hico.HiCo(self.config)
    return jax.jit(lambda p, ids, tokens: module.apply({"params": p}, ids, tokens,
                                                       method=hico.HiCo.splice_visual_tokens))

  def save_pretrained(self, out_dir: str, dtype: str | None = None):
    """The HF layout (config.json + safetensors): VideoChat-Flash's for a video model, plain Qwen2's for a
    decoder; in the dtype it was loaded in unless told otherwise (a run directory's: its params' dtype)."""
    dtype = dtype or self.checkpoint_dtype
    token_ids = {"eos_token_id": list(self.eos_ids) or None, "pad_token_id": self.pad_id}
    run_dir.save_hf(out_dir, self.config, self.stacked_params(), dtype=dtype, extra_fields=token_ids,
                    tokenizer_dir=getattr(self, "tokenizer_dir", None))   # from_pretrained's, when it found one
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(token_ids, f, indent=2)

  def stacked_params(self) -> dict:
    """The params in the training and checkpoint layout (each layer-stacked leaf one array), as numpy."""
    params = jax.tree.map(np.asarray, jax.device_get(self.params))
    return _on_decoder(params, self.is_video_model, lambda llm: qwen2.stack_layers(llm, stack=np.stack))

  def _check_memory(self, input_ids, video, visual_tokens, max_new_tokens):
    shape = np.shape(input_ids)
    if len(shape) != 2:
      return                    # _prepare names the problem
    per_frame = self.config.tokens_per_clip / self.config.clip_frames if self.is_video_model else 0
    frames = 0
    if video is not None and np.ndim(video) == 5:
      frames = np.shape(video)[1]
    elif visual_tokens is not None and np.ndim(visual_tokens) == 3 and per_frame:
      frames = int(np.shape(visual_tokens)[1] / per_frame)
    clip = self.config.clip_frames if self.is_video_model else 1
    memory.check_fits(self.llm_config, self.dropout, batch=shape[0], text_len=shape[1], frames=frames,
                      tokens_per_frame=per_frame, clip_frames=clip, max_new_tokens=max_new_tokens)

  def _visual_mask(self, ids):
    return None if self.dropout is None else jnp.asarray(ids == VIDEO_TOKEN_ID)

  def _prepare(self, input_ids, video, attention_mask, visual_tokens=None, placeholders_checked=True):
    """Checked (ids, mask, embeddings or None), with each video placeholder expanded to 16·T slots."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    text = ids[ids != VIDEO_TOKEN_ID]
    if text.size and (text.min() < 0 or text.max() >= self.llm_config.vocab_size):
      raise ValueError(f"input_ids must lie in [0, {self.llm_config.vocab_size}) apart from the video "
                       f"placeholder {VIDEO_TOKEN_ID}, got min {text.min()}, max {text.max()}")
    placeholders = (ids == VIDEO_TOKEN_ID).sum(axis=1)
    if video is not None and visual_tokens is not None:
      raise ValueError("give a video either as video= (frames) or as visual_tokens= (encode_video's), not both")
    if not self.is_video_model:
      if video is not None or visual_tokens is not None:
        raise ValueError("this checkpoint is a plain Qwen2 language model and takes no video; load a "
                         "VideoChat-Flash checkpoint for video input")
      if placeholders.any():
        raise ValueError(f"input_ids hold the video placeholder {VIDEO_TOKEN_ID}, but this model has no "
                         "vision tower")
      return ids, mask, None
    if not placeholders_checked:
      return ids, mask, None
    if video is None and visual_tokens is None:
      if placeholders.any():
        raise ValueError(f"input_ids row {int(np.argmax(placeholders > 0))} holds the video placeholder "
                         f"{VIDEO_TOKEN_ID}, but no video was given")
      return ids, mask, self._splice(self.params, jnp.asarray(ids), None)
    if visual_tokens is not None:
      visual_tokens = self._check_visual_tokens(visual_tokens, ids.shape[0])
    else:
      video = np.asarray(video)
      if video.dtype != np.uint8:
        video = video.astype(np.float32, copy=False)
      if video.ndim != 5 or video.shape[0] != ids.shape[0]:
        raise ValueError(f"video must be (batch={ids.shape[0]}, frames, size, size, 3), got shape {video.shape}")
      hico.check_video_shape(self.config, (video.shape[0], 1) + video.shape[1:])
    for row, count in enumerate(placeholders):
      if count != 1:
        raise ValueError(f"input_ids row {row} holds {count} video placeholders ({VIDEO_TOKEN_ID}); a sample "
                         "with a video needs exactly one")
    if visual_tokens is None:
      # Chunk by chunk on the device (infer/visual.py): a long video never crosses to the device whole.
      visual_tokens = jnp.stack([self.encode_video(row) for row in video])
    ids, mask = _expand_placeholders(ids, mask, visual_tokens.shape[1])
    return ids, mask, self._splice(self.params, jnp.asarray(ids), visual_tokens)

  def _check_visual_tokens(self, tokens, batch):
    """visual_tokens as a device array, or a one-line error naming the shape expected."""
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    shape, hidden, per_clip = tuple(np.shape(tokens)), self.llm_config.hidden_size, self.config.tokens_per_clip
    if len(shape) != 3 or shape[0] != batch or shape[2] != hidden:
      raise ValueError(f"visual_tokens must be (batch={batch}, tokens, hidden={hidden}), got shape {shape}; "
                       "encode_video gives one video's (tokens, hidden): stack or add [None]")
    if shape[1] == 0 or shape[1] % per_clip:
      raise ValueError(f"visual_tokens hold {shape[1]} tokens a row, not a whole number of clips of {per_clip} "
                       f"tokens ({self.config.clip_frames} frames each)")
    if not jnp.issubdtype(tokens.dtype, jnp.floating):
      raise ValueError(f"visual_tokens must be floating point, got {tokens.dtype}")
    return jnp.asarray(tokens)

  def _prepare_images(self, input_ids, images, attention_mask, video):
    """(ids, mask, embeddings) for prompts about still images. `images`: one entry per row, an image or a list
    of images (PIL, path, bytes or (H, W, 3) uint8), each in the place of one VIDEO_TOKEN_ID of the row, in
    order. One image per row takes the reference's anyres_nopad tiles (base + up to 6x6, 64 tokens each),
    several take 64 tokens each ("pad")."""
    # Here, not at the top: the data modules bring Pillow and OpenCV, which text and video prompts do without.
    from hico_jax.data import image as image_io, video as video_io
    if not self.is_video_model:
      raise ValueError("this checkpoint is a plain Qwen2 language model and takes no images; load a "
                       "VideoChat-Flash checkpoint for image input")
    if video is not None:
      raise ValueError("give a batch either video= or images=, not both")
    ids, mask, _ = self._prepare(input_ids, None, np.ones_like(np.asarray(input_ids)) if attention_mask is None
                                 else attention_mask, placeholders_checked=False)
    if isinstance(images, (list, tuple)) and len(images) == ids.shape[0]:
      per_row = images
    elif ids.shape[0] == 1:
      per_row = [images]
    else:
      raise ValueError(f"images must hold one entry (an image or a list of images) per row: {ids.shape[0]} rows")
    size = self.config.vit.image_size
    ids, mask, index, tiles = image_io.expand_image_prompts(
        ids, mask, per_row, size, getattr(self.config, "image_grid_pinpoints", image_io.DEFAULT_PINPOINTS),
        placeholder=VIDEO_TOKEN_ID, tokens_per_tile=self.config.tokens_per_tile)
    pixels = video_io.normalize(tiles.reshape(-1, size, size, 3)).reshape(tiles.shape)
    if not hasattr(self, "_embed_images"):
      module = hico.HiCo(self.config)
      self._embed_images = jax.jit(lambda p, i, t, v: module.apply({"params": p}, i, images=t, visual_index=v,
                                                                   method=hico.HiCo.embed),
                                   compiler_options=xla_options.vision_compiler_options())
    return ids, mask, self._embed_images(self.params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(index))


def _on_decoder(params, is_video_model: bool, fn):
  """params with `fn` applied to the decoder's part (all of a plain Qwen2's, "llm" of a video model's)."""
  return {**params, "llm": fn(params["llm"])} if is_video_model else fn(params)


def _unstack_decoder(params, is_video_model: bool, free_stacked: bool = False):
  return _on_decoder(params, is_video_model, lambda llm: qwen2.unstack_layers(llm, free_stacked=free_stacked))


def _expand_placeholders(ids, mask, count):
  """Each row's single placeholder becomes `count` placeholders (same mask value)."""
  rows_ids, rows_mask = [], []
  for row_ids, row_mask in zip(ids, mask):
    at = int(np.argmax(row_ids == VIDEO_TOKEN_ID))
    rows_ids.append(np.concatenate([row_ids[:at], np.full(count, VIDEO_TOKEN_ID), row_ids[at + 1:]]))
    rows_mask.append(np.concatenate([row_mask[:at], np.full(count, row_mask[at]), row_mask[at + 1:]]))
  return np.stack(rows_ids), np.stack(rows_mask).astype(np.int32)


def device_defaults(platform: str) -> dict[str, str]:
  """What from_pretrained picks on `platform` (jax's: "gpu", "tpu", "cpu"): the device's fast kernels and
  dtypes. bf16 weights halve a 7B model's 30 GB; the decoder's kernel is what makes a 160,000-token prefill
  possible (none of them forms an (L x L) matrix); the vision tower's clips are 784-3,136 tokens, where
  cuDNN's kernel is the fast one on GPUs and XLA's is fine elsewhere."""
  if platform == "gpu":
    return dict(dtype="bfloat16", param_dtype="bfloat16", attention_impl="cudnn", vision_attention_impl="cudnn")
  if platform == "tpu":
    return dict(dtype="bfloat16", param_dtype="bfloat16", attention_impl="splash", vision_attention_impl="xla")
  return dict(dtype="float32", param_dtype="float32", attention_impl="chunked", vision_attention_impl="xla")


def from_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    attention_impl: str | None = None, vision_attention_impl: str | None = None,
                    visual_dropout="config", verbose: bool = True) -> CausalLM:
  """Loads a Hugging Face model directory (plain Qwen2, or the official VideoChat-Flash layout) or a training
  run directory (its latest step's params, with the model config saved with them; tools/convert_checkpoint.py
  hf-to-orbax writes one too).

  The device decides the defaults (`device_defaults`): bf16 compute and weights with cuDNN attention on GPUs
  (splash on TPUs), float32 with the chunked kernel on CPUs; each keyword overrides its choice, and the
  choices are printed once (verbose=False: not). Tensors go to the device as they are read, cast on the way,
  so the host never holds the model in float32. visual_dropout: "config" follows config.json (mm_llm_compress
  and its fields) or a run's saved config, None turns it off, and a dict or VisualDropoutConfig sets it (the
  model card's option: {"type": "uniform0_attention", "layers": [4, 18], "ratios": [1, 0.75, 0.25]}).
  """
  kind = run_dir.layout(path)
  platform = jax.devices()[0].platform
  given = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
               vision_attention_impl=vision_attention_impl)
  chosen = {k: v if given[k] is None else given[k] for k, v in device_defaults(platform).items()}
  if verbose:
    print(f"hico_jax.from_pretrained: {platform}: {chosen['dtype']} compute, {chosen['param_dtype']} weights, "
          f"{chosen['attention_impl']} attention (decoder), {chosen['vision_attention_impl']} (vision tower); "
          f"keywords override each", file=sys.stderr)
  compute = dict(chosen, remat_policy="none")
  params_dtype = np.dtype(qwen2.DTYPES[chosen["param_dtype"]])
  if kind == "run":
    run = run_dir.read(path, params_dtype=params_dtype, **compute)
    config, params, token_ids, file_dtype = run.config, run.params, run.token_ids, run.saved_dtype
  else:
    token_ids = qwen2_hf.read_token_ids(path)
    if kind == "qwen2":
      compute.pop("vision_attention_impl")
    loader = videochat_flash if kind == "videochat_flash" else qwen2_hf
    config, params, file_dtype = loader.load(path, params_dtype=params_dtype, put=jax.device_put, **compute)
  if isinstance(config, hico.HiCoConfig) and not (isinstance(visual_dropout, str) and visual_dropout == "config"):
    if isinstance(visual_dropout, dict):
      visual_dropout = VisualDropoutConfig.from_dict(visual_dropout)
    if visual_dropout is not None and not isinstance(visual_dropout, VisualDropoutConfig):
      raise ValueError(f"visual_dropout must be 'config', None, a dict or a VisualDropoutConfig, got "
                       f"{visual_dropout!r}")
    if visual_dropout is not None:
      visual_dropout.check(config.llm.num_layers)
    config = dataclasses.replace(config, visual_dropout=visual_dropout)
  # The loaded stacked leaves are ours: each is freed as soon as it is split into its layers.
  params = _unstack_decoder(params, isinstance(config, hico.HiCoConfig), free_stacked=True)
  eos = token_ids.get("eos_token_id")
  eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  pad = token_ids.get("pad_token_id")
  model = CausalLM(config, params, eos_ids=eos_ids, pad_id=eos_ids[0] if pad is None and eos_ids else pad or 0,
                   checkpoint_dtype=file_dtype)
  model.tokenizer_dir = run_dir.tokenizer_source(path, run.saved_config if kind == "run" else None)
  return model
