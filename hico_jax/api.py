"""The Hugging Face-like Python API: from_pretrained, __call__, generate, save_pretrained.

  model = hico_jax.from_pretrained(path)              # HF dir (plain Qwen2 or VideoChat-Flash) or a run dir
  logits = model(input_ids, video=frames)             # numpy in, float32 numpy (B, T, V) out
  ids = model.generate(input_ids, video=frames, max_new_tokens=32)   # greedy unless temperature > 0
  model.save_pretrained(out_dir)                      # the HF layout of the model, loadable by its owner

`input_ids` mark where a sample's video goes with one `hico_jax.VIDEO_TOKEN_ID` (-200); the model expands it
to the video's 16·T visual tokens, so logits cover the expanded sequence. `video` is the preprocessed float32
(B, T, S, S, 3) array that `hico_jax.data.video.preprocess` returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hico_jax import VIDEO_TOKEN_ID
from hico_jax.convert import qwen2_hf, run_dir, videochat_flash
from hico_jax.infer import generate as generation
from hico_jax.models import hico, qwen2
from hico_jax.models.visual_dropout import VisualDropoutConfig
from hico_jax.ops import xla_options

class CausalLM:
  """A Qwen2 decoder (optionally with HiCo's video path) and its params, answering in numpy."""

  def __init__(self, config, params, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
               checkpoint_dtype: str = "float32"):
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params)
    self.eos_ids, self.pad_id, self.checkpoint_dtype = tuple(eos_ids), pad_id, checkpoint_dtype
    self.is_video_model = isinstance(config, hico.HiCoConfig)
    self.llm_config = config.llm if self.is_video_model else config
    self.dropout = config.visual_dropout if self.is_video_model else None
    self.llm = qwen2.Qwen2ForCausalLM(self.llm_config, dropout=self.dropout)
    self.llm_params = self.params["llm"] if self.is_video_model else self.params
    self._forward = jax.jit(lambda p, ids, emb, seg, visual: self.llm.apply(
        {"params": p}, ids, embeddings=emb, segment_ids=seg, visual_mask=visual)[0])
    if self.is_video_model:
      module = hico.HiCo(config)
      self._embed = jax.jit(lambda p, ids, video: module.apply({"params": p}, ids, video, method=hico.HiCo.embed),
                            compiler_options=xla_options.vision_compiler_options())

  def __call__(self, input_ids, video=None, attention_mask=None) -> np.ndarray:
    """Logits (B, T', V) float32 over the sequence with each video placeholder expanded (T' = T − 1 + 16·frames
    with a video, T without). attention_mask (B, T): 0 marks padding. With visual dropout the rows keep their
    length (the masked form): a dropped visual token's row is what it saw before it was dropped."""
    ids, mask, embeddings = self._prepare(input_ids, video, attention_mask)
    segment_ids = None if attention_mask is None and self.dropout is None else jnp.asarray(mask)
    logits = self._forward(self.llm_params, jnp.asarray(np.maximum(ids, 0)), embeddings, segment_ids,
                           self._visual_mask(ids))
    return np.asarray(logits, np.float32)

  def generate(self, input_ids, video=None, attention_mask=None, *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_p: float = 1.0, eos_ids: Sequence[int] | None = None,
               pad_id: int | None = None, seed: int = 0) -> np.ndarray:
    """New token ids (B, max_new_tokens); a row that produced an eos id is pad_id after it."""
    ids, mask, embeddings = self._prepare(input_ids, video, attention_mask)
    return generation.generate(
        self.llm, {"params": self.llm_params}, np.maximum(ids, 0), mask, embeddings=embeddings,
        visual_mask=self._visual_mask(ids), max_new_tokens=max_new_tokens, eos_ids=self.eos_ids if eos_ids is None else eos_ids,
        pad_id=self.pad_id if pad_id is None else pad_id, temperature=temperature, top_p=top_p, seed=seed)

  def save_pretrained(self, out_dir: str, dtype: str | None = None):
    """The HF layout (config.json + safetensors): VideoChat-Flash's for a video model, plain Qwen2's for a
    decoder; in the dtype it was loaded in unless told otherwise (a run directory's: its params' dtype)."""
    dtype = dtype or self.checkpoint_dtype
    token_ids = {"eos_token_id": list(self.eos_ids) or None, "pad_token_id": self.pad_id}
    run_dir.save_hf(out_dir, self.config, self.params, dtype=dtype, extra_fields=token_ids,
                    tokenizer_dir=getattr(self, "tokenizer_dir", None))   # from_pretrained's, when it found one
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(token_ids, f, indent=2)

  def _visual_mask(self, ids):
    return None if self.dropout is None else jnp.asarray(ids == VIDEO_TOKEN_ID)

  def _prepare(self, input_ids, video, attention_mask):
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
    if not self.is_video_model:
      if video is not None:
        raise ValueError("this checkpoint is a plain Qwen2 language model and takes no video; load a "
                         "VideoChat-Flash checkpoint for video input")
      if placeholders.any():
        raise ValueError(f"input_ids hold the video placeholder {VIDEO_TOKEN_ID}, but this model has no "
                         "vision tower")
      return ids, mask, None
    if video is None:
      if placeholders.any():
        raise ValueError(f"input_ids row {int(np.argmax(placeholders > 0))} holds the video placeholder "
                         f"{VIDEO_TOKEN_ID}, but no video was given")
      return ids, mask, self._embed(self.params, jnp.asarray(ids), None)
    video = np.asarray(video, np.float32)
    if video.ndim != 5 or video.shape[0] != ids.shape[0]:
      raise ValueError(f"video must be (batch={ids.shape[0]}, frames, size, size, 3), got shape {video.shape}")
    hico.check_video_shape(self.config, (video.shape[0], 1) + video.shape[1:])
    for row, count in enumerate(placeholders):
      if count != 1:
        raise ValueError(f"input_ids row {row} holds {count} video placeholders ({VIDEO_TOKEN_ID}); a sample "
                         "with a video needs exactly one")
    ids, mask = _expand_placeholders(ids, mask, self.config.visual_tokens(video.shape[1]))
    return ids, mask, self._embed(self.params, jnp.asarray(ids), jnp.asarray(video)[:, None])


def _expand_placeholders(ids, mask, count):
  """Each row's single placeholder becomes `count` placeholders (same mask value)."""
  rows_ids, rows_mask = [], []
  for row_ids, row_mask in zip(ids, mask):
    at = int(np.argmax(row_ids == VIDEO_TOKEN_ID))
    rows_ids.append(np.concatenate([row_ids[:at], np.full(count, VIDEO_TOKEN_ID), row_ids[at + 1:]]))
    rows_mask.append(np.concatenate([row_mask[:at], np.full(count, row_mask[at]), row_mask[at + 1:]]))
  return np.stack(rows_ids), np.stack(rows_mask).astype(np.int32)


def from_pretrained(path: str, *, dtype: str | None = None, param_dtype: str = "float32",
                    visual_dropout="config") -> CausalLM:
  """Loads a Hugging Face model directory (plain Qwen2, or the official VideoChat-Flash layout) or a training
  run directory (its latest step's params, with the model config saved with them; tools/convert_checkpoint.py
  hf-to-orbax writes one too).

  dtype is the compute dtype: float32 on CPU and bfloat16 on accelerators unless given. visual_dropout:
  "config" follows config.json (mm_llm_compress and its fields) or a run's saved config, None turns it off,
  and a dict or VisualDropoutConfig sets it (the model card's option: {"type": "uniform0_attention", "layers": [4, 18],
  "ratios": [1, 0.75, 0.25]}).
  """
  kind = run_dir.layout(path)
  if dtype is None:
    dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  compute = dict(dtype=dtype, param_dtype=param_dtype, remat_policy="none")
  if kind == "run":
    run = run_dir.read(path, params_dtype=np.dtype(param_dtype), **compute)
    config, params, token_ids, file_dtype = run.config, run.params, run.token_ids, run.saved_dtype
  else:
    token_ids = qwen2_hf.read_token_ids(path)
    loader = videochat_flash if kind == "videochat_flash" else qwen2_hf
    config, params, file_dtype = loader.load(path, params_dtype=np.dtype(param_dtype), **compute)
  if isinstance(config, hico.HiCoConfig) and not (isinstance(visual_dropout, str) and visual_dropout == "config"):
    if isinstance(visual_dropout, dict):
      visual_dropout = VisualDropoutConfig.from_dict(visual_dropout)
    if visual_dropout is not None and not isinstance(visual_dropout, VisualDropoutConfig):
      raise ValueError(f"visual_dropout must be 'config', None, a dict or a VisualDropoutConfig, got "
                       f"{visual_dropout!r}")
    if visual_dropout is not None:
      visual_dropout.check(config.llm.num_layers)
    config = dataclasses.replace(config, visual_dropout=visual_dropout)
  eos = token_ids.get("eos_token_id")
  eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  pad = token_ids.get("pad_token_id")
  model = CausalLM(config, params, eos_ids=eos_ids, pad_id=eos_ids[0] if pad is None and eos_ids else pad or 0,
                   checkpoint_dtype=file_dtype)
  model.tokenizer_dir = run_dir.tokenizer_source(path, run.saved_config if kind == "run" else None)
  return model
