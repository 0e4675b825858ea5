"""Training run directories (the orbax checkpoints the trainer writes) -> params and model config; params ->
the Hugging Face layouts. One place for both, used by the trainer's export, `hico_jax.from_pretrained`,
`CausalLM.save_pretrained` and tools/convert_checkpoint.py.

A run directory holds `checkpoints/<step>/{state,config}` (hico_jax/train/checkpoint.py): `state["params"]` is
the model's params tree and `config["model"]` the model config it was trained with. A HiCo run's params have
`visual` and `llm`; a decoder-only one (tools/convert_checkpoint.py imports plain Qwen2 checkpoints so) has
`llm` alone. Reading goes through orbax alone (not the trainer's Checkpointer, which needs grain), so the
inference path loads runs where grain is not installed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from hico_jax.convert import qwen2_hf, videochat_flash
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.qwen2 import Qwen2Config

CHECKPOINTS = "checkpoints"
# Where a run imported from an HF directory keeps its token ids (the trainer's config has no such field).
TOKEN_IDS_FIELD = "hf_token_ids"
# Kernel choices are the machine's, not the model's: the HF layouts carry none, and a run trained with cuDNN
# on a GPU must load on a CPU and compute what its HF export computes.
_VIT_KERNELS = dict(attention_impl="xla", norm_impl="xla", block_loop="auto")
_LLM_KERNELS = dict(attention_impl="xla", attention_block_impl="xla")
# The files of a Hugging Face tokenizer directory (build_qwen2_tokenizer_json writes the first three).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS))


def layout(path: str) -> str:
  """"run", "videochat_flash" or "qwen2": what kind of checkpoint directory `path` is; fails saying why it is
  none of them."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory {path!r} does not exist")
  if is_run_dir(path):
    return "run"
  if not os.path.exists(os.path.join(path, "config.json")):
    raise ValueError(f"{path!r} is neither a Hugging Face model directory (no config.json) nor a training run "
                     f"directory (no {CHECKPOINTS}/)")
  return "videochat_flash" if videochat_flash.is_videochat_flash(qwen2_hf.read_config(path)) else "qwen2"


def _manager(run_dir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), CHECKPOINTS),
                               options=ocp.CheckpointManagerOptions(create=False),
                               item_names=("state", "config"))


def steps(run_dir: str) -> list[int]:
  """The finished steps (orbax renames a step to its number only once every item is written)."""
  manager = _manager(run_dir)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


@dataclasses.dataclass(frozen=True)
class Run:
  config: HiCoConfig | Qwen2Config
  params: dict             # numpy; a decoder-only run's are the decoder's (Qwen2ForCausalLM's), not under `llm`
  step: int
  saved_config: dict       # the whole config saved with the step (a trainer's: the training config)
  saved_dtype: str         # the saved params' dtype name (of the first; the trainer saves them all in one)

  @property
  def token_ids(self) -> dict:
    """eos_token_id / pad_token_id that tools/convert_checkpoint.py carried over from an HF config.json."""
    return dict(self.saved_config.get(TOKEN_IDS_FIELD) or {})


def read(run_dir: str, step: int | None = None, *, params_dtype=None, **compute) -> Run:
  """A run's `step` (the latest when None): its model config, params as numpy and saved config.

  `params_dtype` None keeps the saved dtype; `compute` sets dtype, param_dtype and remat_policy of the
  config, as HF loaders take them."""
  if not is_run_dir(run_dir):
    raise FileNotFoundError(f"{run_dir!r} is not a training run directory (no {CHECKPOINTS}/ in it)")
  manager = _manager(run_dir)
  try:
    available = sorted(manager.all_steps())
    if not available:
      raise FileNotFoundError(f"run directory {run_dir!r} holds no finished checkpoint")
    if step is None:
      step = available[-1]
    elif step not in available:
      raise ValueError(f"run directory {run_dir!r} has no step {step}; its steps are {available}")
    step_dir = manager.directory / str(step)
    saved_config = None
    if (step_dir / "config").exists():
      saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    # Only the params, as numpy: the optimizer state may be twice their size, and the saved shardings name
    # devices this process may not have.
    metadata = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
    if "params" not in metadata:
      raise ValueError(f"{run_dir!r} step {step}: the saved state has no params")
    abstract = jax.tree.map(lambda m: np.zeros((), m.dtype), metadata["params"])
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    params = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))["state"]["params"]
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, params)
  saved_dtype = jax.tree.leaves(params)[0].dtype.name
  if params_dtype is not None:
    params = jax.tree.map(lambda x: x.astype(params_dtype), params)
  config = model_config(saved_config, params, where=f"{run_dir!r} step {step}", **compute)
  return Run(config, params if isinstance(config, HiCoConfig) else params["llm"], step, saved_config or {},
             saved_dtype)


def model_config(saved_config: dict | None, params, *, where: str, **compute) -> HiCoConfig | Qwen2Config:
  """The model config saved with a step (its `model` field), with `compute` options and XLA kernels."""
  model = (saved_config or {}).get("model")
  if not model or "llm" not in model:
    raise ValueError(f"{where} was saved without its model config (no model.llm in the step's config), so "
                     "the params cannot be read as a model")
  compute = dict(compute)
  vision_kernels = {k[len("vision_"):]: compute.pop(k) for k in list(compute) if k.startswith("vision_")}
  llm = {**model["llm"], **_LLM_KERNELS, **compute}
  if "visual" not in params:
    if set(params) != {"llm"}:
      raise ValueError(f"{where}: params hold {sorted(params)}; expected visual and llm (HiCo) or llm alone")
    return Qwen2Config.from_dict(llm)
  if "vit" not in model:
    raise ValueError(f"{where}: params hold a vision tower but the saved model config has no vit")
  vit_compute = {k: v for k, v in compute.items() if k in ("dtype", "param_dtype", "remat_policy")}
  return HiCoConfig.from_dict({**model, "vit": {**model["vit"], **_VIT_KERNELS, **vit_compute, **vision_kernels},
                               "llm": llm})


def config_to_dict(config: HiCoConfig | Qwen2Config) -> dict:
  """The `model` field a run saves for `config` (JSON-able; HiCoConfig.from_dict / Qwen2Config.from_dict
  read it back)."""
  return {"llm": dataclasses.asdict(config)} if isinstance(config, Qwen2Config) else dataclasses.asdict(config)


def save_hf(out_dir: str, config: HiCoConfig | Qwen2Config, params, dtype: str = "bfloat16",
            extra_fields: dict | None = None, tokenizer_dir: str | None = None):
  """The HF layout of `config`: the official VideoChat-Flash layout for a HiCo model (its LLM keys load in
  transformers' Qwen2ForCausalLM), plain Qwen2 for a decoder alone. `params` may live on devices.
  `tokenizer_dir`, a directory with a tokenizer.json (the one the model was trained with), is copied beside
  the weights, so that the export is complete: tools/chat.py and transformers read it from there."""
  if tokenizer_dir is not None and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
    raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir!r}: give the directory the model was trained "
                            "with (the training config's data.tokenizer_dir), or none to export the weights alone")
  params = jax.tree.map(np.asarray, jax.device_get(params))
  if isinstance(config, HiCoConfig):
    videochat_flash.save(out_dir, config, params, dtype=dtype, extra_fields=extra_fields)
  else:
    qwen2_hf.save(out_dir, config, params, dtype=dtype, extra_fields=extra_fields)
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, out_dir)


def copy_tokenizer(tokenizer_dir: str, out_dir: str) -> list[str]:
  """Copies the tokenizer files present in `tokenizer_dir` into `out_dir`; returns their names."""
  if os.path.abspath(tokenizer_dir) == os.path.abspath(out_dir):
    return []
  names = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, name))]
  for name in names:
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  return names


def tokenizer_source(path: str, saved_config: dict | None = None) -> str | None:
  """Where the model at `path` keeps its tokenizer: `path` itself when a tokenizer.json is there (an HF
  export), else the training tokenizer its saved config names (a run directory); None when neither exists."""
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return path
  return tokenizer_dir_of(saved_config, path)


def tokenizer_dir_of(saved_config: dict | None, run_dir: str | None = None) -> str | None:
  """The tokenizer a run was trained with, where its saved training config names one that still exists
  (`data.tokenizer_dir`; a relative path, as training wrote it from its working directory, is tried from here
  and then from each directory above the run, runs/tiny/stage2 -> the repository root); None otherwise."""
  path = ((saved_config or {}).get("data") or {}).get("tokenizer_dir")
  if not path:
    return None
  candidates = [path]
  if run_dir and not os.path.isabs(path):
    parent = os.path.abspath(run_dir)
    while os.path.dirname(parent) != parent:
      parent = os.path.dirname(parent)
      candidates.append(os.path.join(parent, path))
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, "tokenizer.json")):
      return candidate
  return None
