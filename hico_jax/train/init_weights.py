"""Where a stage's weights come from, and where they go: a previous stage's run directory, the official
VideoChat-Flash layout, or a plain Qwen2 checkpoint for the LLM alone; and the HF export at the end.

config.init: {"path": DIR, "kind": "run" | "videochat_flash" | "qwen2"}. A run directory may also be one
that tools/convert_checkpoint.py wrote: hf-to-orbax (all params, or the LLM's alone from a plain Qwen2), or
parts-to-orbax (stage 1's start: the released UMT-L encoder, a Qwen2 LLM, a fresh projector). A
checkpoint whose tensors do not match the configured model's fails with one line naming the first tensor and both shapes; one saved with
other decoder settings that no tensor's shape carries (RoPE θ, the norm epsilon, the head split) fails naming
them (`check_settings`, before anything compiles).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from hico_jax.convert import qwen2_hf, run_dir, videochat_flash
from hico_jax.train import checkpoint as ckpt


def _check_same_shapes(loaded, target, where: str):
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if path not in flat_loaded:
      raise ValueError(f"{where}: has no parameter {name} that the configured model needs")
    if tuple(flat_loaded[path].shape) != tuple(leaf.shape):
      raise ValueError(f"{where}: parameter {name} has shape {tuple(flat_loaded[path].shape)}, the configured "
                       f"model needs {tuple(leaf.shape)}")


# Decoder settings that no tensor's shape carries: a checkpoint saved with others loads without a shape error
# and computes something else (Qwen2-7B and its 1M-context variant differ only in RoPE θ; 12 heads of 128 and
# 24 of 64 have the same projection shapes). Embedding tying shows in the tree only one way round (an untied
# checkpoint has an lm_head the tied model ignores), so it is compared here too.
UNCARRIED_LLM_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings")


def check_settings(init, model_config):
  """Refuses an init checkpoint saved with other decoder settings than those no tensor's shape carries; reads
  only its config (the trainer calls it before anything compiles). The fields it has are compared: the config
  saved with a run's latest step, or the HF config.json of the other kinds."""
  path, kind = init.path, init.get("kind", "run")
  if kind == "run":
    saved = ckpt.latest_config(path)[1].get("model", {}).get("llm", {})   # {} for steps saved without a config
  elif kind == "videochat_flash":
    saved = dataclasses.asdict(videochat_flash.hf_config_to_hico(qwen2_hf.read_config(path), path).llm)
  elif kind == "qwen2":
    saved = qwen2_hf.hf_config_to_dict(qwen2_hf.read_config(path), where=path)
  else:
    raise ValueError(f"init.kind {kind!r} is not run, videochat_flash or qwen2")
  llm = model_config.llm
  differ = [f"llm.{name}={saved[name]!r} (configured: {getattr(llm, name)!r})"
            for name in UNCARRIED_LLM_FIELDS if name in saved and saved[name] != getattr(llm, name)]
  if differ:
    raise ValueError(f"init.path {path!r} was saved with {', '.join(differ)}; the configured model must match it")


def _place(loaded, like):
  """numpy params -> arrays with the dtype and sharding of `like`."""
  return jax.tree.map(lambda x, t: jax.device_put(np.asarray(x, t.dtype), t.sharding), loaded, like)


def load_into_state(state, init, model_config, param_shardings):
  """state with its params replaced by the init checkpoint's (optimizer state stays fresh)."""
  path, kind = init.path, init.get("kind", "run")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init.path {path!r} does not exist")
  params = state["params"]
  if kind == "run":
    checkpointer = ckpt.Checkpointer(path)
    try:
      step = checkpointer.latest_step()
      if step is None:
        raise FileNotFoundError(f"init.path {path!r} holds no finished checkpoint")
      # The saved shapes first, from the metadata alone: orbax's own mismatch error names no parameter.
      saved = ckpt.ocp.StandardCheckpointHandler().metadata(checkpointer.manager.directory / str(step) / "state")
      saved_params = saved.get("params", {})
      # A decoder-only run (a plain Qwen2 checkpoint imported by tools/convert_checkpoint.py) initialises the
      # LLM alone, as init.kind = "qwen2" does; the vision tower and projector keep their fresh values.
      keep = {} if set(saved_params) != {"llm"} else {k: v for k, v in params.items() if k != "llm"}
      params, param_shardings = ({k: v for k, v in tree.items() if k not in keep}
                                 for tree in (params, param_shardings))
      _check_same_shapes(saved_params, params, f"init.path {path!r} (step {step})")
      abstract = ckpt.abstract_like(params, param_shardings)
      try:
        # Only the params: the previous stage's optimizer groups (and so its state) differ from this one's.
        restore_args = jax.tree.map(lambda x: ckpt.ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
        restored = checkpointer.manager.restore(step, args=ckpt.ocp.args.Composite(
            state=ckpt.ocp.args.PyTreeRestore({"params": abstract}, restore_args={"params": restore_args},
                                              partial_restore=True)))["state"]["params"]
      except (ValueError, KeyError) as e:
        raise ValueError(f"init.path {path!r} (step {step}) does not match the configured model: {e}") from None
    finally:
      checkpointer.close()
    return {**state, "params": {**keep, **restored}}
  if kind == "videochat_flash":
    _, loaded, _ = videochat_flash.load(path)
  elif kind == "qwen2":
    _, llm, _ = qwen2_hf.load(path)
    loaded = {**jax.tree.map(np.asarray, params), "llm": llm}
  else:
    raise ValueError(f"init.kind {kind!r} is not run, videochat_flash or qwen2")
  _check_same_shapes(loaded, params, path)
  return {**state, "params": _place(loaded, params)}


def save_run(directory: str, params, saved: dict):
  """A run directory a stage starts from (init.kind "run"): step 0 holding `params` (no optimizer state, so a
  starting point, not a workdir to resume) with `saved` as the step's config (its `model` field: the model
  config), and the same config.json the trainer leaves in its workdir."""
  checkpointer = ckpt.Checkpointer(directory, async_save=False)
  checkpointer.save(0, {"params": params}, config=saved, force=True)
  checkpointer.close()
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(saved, f, indent=2)


def export_hf(out_dir: str, model_config, params, dtype: str = "bfloat16", tokenizer_dir: str | None = None):
  """The official VideoChat-Flash layout (loads back with hico_jax.from_pretrained; its LLM keys load in
  transformers' Qwen2ForCausalLM), with the training tokenizer's files beside it when `tokenizer_dir` has
  them. The same writer as tools/convert_checkpoint.py orbax-to-hf."""
  run_dir.save_hf(out_dir, model_config, params, dtype=dtype, tokenizer_dir=tokenizer_dir)
