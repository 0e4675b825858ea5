"""The Hugging Face-like Python API: from_pretrained, __call__, generate, save_pretrained.

  model = hico_jax.from_pretrained("path/to/Qwen2.5-1.5B-Instruct")
  logits = model(input_ids)                          # numpy in, float32 numpy (B, T, V) out
  ids = model.generate(input_ids, max_new_tokens=32) # greedy unless temperature > 0
  model.save_pretrained("out")                       # safetensors + config.json, loadable by transformers

This covers the plain Qwen2 layout; the VideoChat-Flash layout (video in, `VIDEO_TOKEN_ID` placeholders)
plugs in behind the same four calls.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import hico_jax
from hico_jax.convert import qwen2_hf
from hico_jax.infer import generate as generation
from hico_jax.models import qwen2


class CausalLM:
  """A Qwen2 decoder with its params, called with numpy arrays and answering with numpy arrays."""

  def __init__(self, config: qwen2.Qwen2Config, params, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
               checkpoint_dtype: str = "float32"):
    self.config = config
    self.module = qwen2.Qwen2ForCausalLM(config)
    self.params = jax.tree.map(jnp.asarray, params)
    self.eos_ids = tuple(eos_ids)
    self.pad_id = pad_id
    self.checkpoint_dtype = checkpoint_dtype
    self._forward = jax.jit(lambda p, ids, seg: self.module.apply({"params": p}, ids, segment_ids=seg)[0])

  def __call__(self, input_ids, video=None, attention_mask=None) -> np.ndarray:
    """Logits (B, T, V) float32 for every position. attention_mask (B, T): 0 marks padding."""
    input_ids = self._check_ids(input_ids, video)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return np.asarray(self._forward(self.params, input_ids, mask), np.float32)

  def generate(self, input_ids, video=None, attention_mask=None, *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_p: float = 1.0, eos_ids: Sequence[int] | None = None,
               pad_id: int | None = None, seed: int = 0) -> np.ndarray:
    """New token ids (B, max_new_tokens); rows that hit an eos id are filled with pad_id after it."""
    input_ids = self._check_ids(input_ids, video)
    return generation.generate(
        self.module, {"params": self.params}, input_ids, attention_mask, max_new_tokens=max_new_tokens,
        eos_ids=self.eos_ids if eos_ids is None else eos_ids, pad_id=self.pad_id if pad_id is None else pad_id,
        temperature=temperature, top_p=top_p, seed=seed)

  def save_pretrained(self, out_dir: str, dtype: str | None = None):
    """HF layout (config.json + safetensors). dtype defaults to the dtype the checkpoint was loaded in."""
    dtype = dtype or self.checkpoint_dtype
    token_ids = {"eos_token_id": list(self.eos_ids) or None, "pad_token_id": self.pad_id}
    qwen2_hf.save(out_dir, self.config, jax.tree.map(np.asarray, self.params), dtype=dtype,
                  extra_fields=token_ids)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(token_ids, f, indent=2)

  def _check_ids(self, input_ids, video):
    if video is not None:
      raise ValueError("this checkpoint is a plain Qwen2 language model and takes no video; load a "
                       "VideoChat-Flash checkpoint for video input")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if np.any(input_ids == hico_jax.VIDEO_TOKEN_ID):
      raise ValueError(f"input_ids hold the video placeholder {hico_jax.VIDEO_TOKEN_ID}, but this model has "
                       "no vision tower")
    if np.any(input_ids < 0) or np.any(input_ids >= self.config.vocab_size):
      raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got min {input_ids.min()}, "
                       f"max {input_ids.max()}")
    return jnp.asarray(input_ids, jnp.int32)


def from_pretrained(path: str, *, dtype: str | None = None, param_dtype: str = "float32") -> CausalLM:
  """Loads a Hugging Face model directory (config.json + safetensors).

  dtype is the compute dtype: float32 on CPU and bfloat16 on accelerators unless given.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory {path!r} does not exist")
  if dtype is None:
    dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  hf_config = qwen2_hf.read_config(path)
  config, params, file_dtype = qwen2_hf.load(path, params_dtype=np.dtype(param_dtype), dtype=dtype,
                                             param_dtype=param_dtype, remat_policy="none")
  eos = hf_config.get("eos_token_id")
  generation_path = os.path.join(path, "generation_config.json")
  if os.path.exists(generation_path):
    with open(generation_path) as f:
      eos = json.load(f).get("eos_token_id", eos)
  eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  pad = hf_config.get("pad_token_id")
  return CausalLM(config, params, eos_ids=eos_ids, pad_id=eos_ids[0] if pad is None and eos_ids else pad or 0,
                  checkpoint_dtype=file_dtype)
