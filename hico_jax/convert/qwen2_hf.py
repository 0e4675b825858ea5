"""Hugging Face Qwen2 / Qwen2.5 layout <-> hico_jax Qwen2 params: the table (see convert/table.py), the
checks of a checkpoint against its config.json, and config.json itself."""

from __future__ import annotations

import json
import os
import numpy as np

from hico_jax.convert import config_fields, table
from hico_jax.convert.safetensors_io import CheckpointReader, write_checkpoint
from hico_jax.models.qwen2 import Qwen2Config
from hico_jax.ops.rope import YarnScaling


def rules(config: Qwen2Config, prefix: str = "model.") -> list[table.Rule]:
  """The full table for one config. `prefix` is where the decoder sits in a bigger model's state dict."""
  n, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
  per_layer = [
      ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), table.linear_to_heads(n), table.heads_to_linear),
      ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), table.bias_to_heads(n), table.flatten),
      ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), table.linear_to_heads(k), table.heads_to_linear),
      ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), table.bias_to_heads(k), table.flatten),
      ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), table.linear_to_heads(k), table.heads_to_linear),
      ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), table.bias_to_heads(k), table.flatten),
      ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), table.out_linear_to_heads(n),
       table.heads_to_out_linear),
      ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), table.linear, table.linear),
      ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), table.linear, table.linear),
      ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), table.linear, table.linear),
      ("input_layernorm.weight", ("input_layernorm", "scale"), None, None),
      ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), None, None),
  ]
  rows = [table.one(f"{prefix}layers.{{i}}.{hf}", ("layers",) + path, to_jax, to_hf, layers)
          for hf, path, to_jax, to_hf in per_layer]
  rows += [table.one(f"{prefix}embed_tokens.weight", ("embed_tokens", "embedding")),
           table.one(f"{prefix}norm.weight", ("norm", "scale"))]
  if not config.tie_word_embeddings:
    rows.append(table.one("lm_head.weight", ("lm_head", "kernel"), table.linear, table.linear))
  return rows


def expected_hf_shapes(config: Qwen2Config, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
  """Every HF key this config needs, with its shape (what a well-formed checkpoint holds)."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  per_layer = {
      "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
      "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
      "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
      "self_attn.o_proj.weight": (d, q),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
  }
  shapes = {f"{prefix}layers.{i}.{name}": s for i in range(config.num_layers) for name, s in per_layer.items()}
  shapes[f"{prefix}embed_tokens.weight"] = (v, d)
  shapes[f"{prefix}norm.weight"] = (d,)
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


def check_tensors(reader, expected: dict[str, tuple[int, ...]], where: str, ignored=frozenset()):
  """One error naming every missing, unexpected and mis-shaped tensor. `ignored` keys may be present."""
  present = set(reader.keys()) - set(ignored)
  problems = []
  missing = sorted(set(expected) - present)
  extra = sorted(present - set(expected))
  if missing:
    problems.append(f"missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  if extra:
    problems.append(f"unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  for name in sorted(set(expected) & present):
    if reader.shape(name) != tuple(expected[name]):
      problems.append(f"tensor {name!r} has shape {reader.shape(name)}, expected {tuple(expected[name])}")
  if problems:
    raise ValueError(f"checkpoint {where!r} does not match its config.json: " + "; ".join(problems))


def tensors_to_params(reader, config: Qwen2Config, prefix: str = "model.", dtype=None, put=None) -> dict:
  """HF tensors -> nested params dict of numpy arrays (layers stacked). `dtype` None keeps the file's; `put`
  as table.to_params."""
  return table.to_params(reader, rules(config, prefix), dtype, put)


def params_to_tensors(params, config: Qwen2Config, prefix: str = "model.", dtype=None) -> dict[str, np.ndarray]:
  """Our params -> HF state-dict tensors, in the order transformers writes them."""
  return table.to_tensors(params, rules(config, prefix), dtype)


# ---------------------------------------------------------------------------------------------- config.json

# Fields that size the model, as (config.json name, our name). What every other field means, and which values
# are implemented: config_fields.FIELDS.
_SIZE_FIELDS = (
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"), ("head_dim", "head_dim"), ("rms_norm_eps", "rms_norm_eps"),
    ("tie_word_embeddings", "tie_word_embeddings"), ("max_position_embeddings", "max_position_embeddings"),
)
# The RoPE kinds (rope_type) the decoder computes; linear, dynamic, llama3, longrope... are refused.
_ROPE_TYPES = ("default", "yarn")


def rope_settings(hf: dict, where: str = "config.json") -> tuple[float, YarnScaling | None]:
  """(rope_theta, YaRN scaling or None) as transformers reads them from a config.json: rope_scaling (4.x's
  name) over rope_parameters (5.x's), the legacy key "type" where "rope_type" is absent, theta in
  rope_parameters (5.x) or at the top level (4.x). Other rope types are refused by name."""
  source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(source) or {})
  rope_type = rope.pop("rope_type", rope.get("type", "default"))
  rope.pop("type", None)
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"{where}: {source}.rope_type = {rope_type!r} is not supported (only {_ROPE_TYPES})")
  theta = rope.pop("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise ValueError(f"{where}: no rope_theta (neither {source}.rope_theta nor rope_theta)")
  if rope_type != "yarn":
    return float(theta), None
  # transformers' YaRN would rotate only part of the head, which its Qwen2 attention cannot apply.
  if rope.pop("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: {source}.partial_rotary_factor = {hf[source]['partial_rotary_factor']!r} is "
                     "not supported (Qwen2 rotates the whole head: only 1.0)")
  try:
    # Built here, where max_position_embeddings is the file's (the default for a missing original one).
    return float(theta), YarnScaling.from_dict(rope, hf.get("max_position_embeddings",
                                                            Qwen2Config.max_position_embeddings))
  except ValueError as e:
    raise ValueError(f"{where}: {source}: {e}") from None


def hf_config_to_dict(hf: dict, where: str = "config.json", scope: str = config_fields.QWEN2) -> dict:
  """The Qwen2 fields of a config.json as Qwen2Config keyword arguments. Fails naming the field if the
  file asks for something this decoder does not implement; warns once naming the fields no table holds.
  `scope`: the kind of file (config_fields.QWEN2, or VIDEOCHAT_FLASH for the whole VideoChat-Flash config)."""
  config_fields.check(hf, where, scope)
  theta, scaling = rope_settings(hf, where)

  fields = {ours: hf[theirs] for theirs, ours in _SIZE_FIELDS if theirs in hf}
  for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if required not in hf:
      raise ValueError(f"{where}: required field {required!r} is missing")
  fields.setdefault("num_kv_heads", hf["num_attention_heads"])
  fields.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
  fields["rope_theta"] = theta
  if scaling is not None:
    fields["rope_scaling"] = scaling
  fields.setdefault("tie_word_embeddings", False)
  return fields


def dict_to_hf_config(config: Qwen2Config, dtype: str) -> dict:
  """A config.json that transformers (4.x and 5.x) loads as Qwen2ForCausalLM."""
  hf = {theirs: getattr(config, ours) for theirs, ours in _SIZE_FIELDS}
  hf.update(
      architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", use_sliding_window=False,
      attention_dropout=0.0, rope_theta=config.rope_theta,
      rope_parameters={"rope_theta": config.rope_theta, "rope_type": "default"},
      dtype=dtype, torch_dtype=dtype, use_cache=True,
      initializer_range=0.02)
  if config.rope_scaling is not None:
    scaling = {"rope_type": "yarn", **config.rope_scaling.to_dict()}
    hf["rope_parameters"].update(scaling)
    # 4.x reads only rope_scaling (VideoChat-Flash's own code its "type"); 5.x prefers it to rope_parameters
    # and takes theta from the top-level rope_theta, so every reader sees the same RoPE.
    hf["rope_scaling"] = {"type": "yarn", **scaling}
  return hf


def read_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
  with open(path) as f:
    return json.load(f)


def read_token_ids(model_dir: str) -> dict:
  """{"eos_token_id", "pad_token_id"} as far as an HF directory sets them: eos from generation_config.json
  over config.json's (where generation stops), pad from config.json."""
  hf = read_config(model_dir)
  token_ids = {k: hf[k] for k in ("eos_token_id", "pad_token_id") if hf.get(k) is not None}
  generation = os.path.join(model_dir, "generation_config.json")
  if os.path.exists(generation):
    with open(generation) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      token_ids["eos_token_id"] = eos
  return token_ids


def load(model_dir: str, *, params_dtype=None, put=None, **config_overrides) -> tuple[Qwen2Config, dict, str]:
  """(config, params as numpy, the checkpoint's dtype name) from a plain HF Qwen2 directory.

  `params_dtype` None keeps the file's dtype; `put` as table.to_params (device arrays as they are read);
  `config_overrides` set compute options (dtype, remat...)."""
  fields = hf_config_to_dict(read_config(model_dir), where=os.path.join(model_dir, "config.json"))
  config = Qwen2Config.from_dict({**fields, **config_overrides})
  reader = CheckpointReader(model_dir)
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); transformers ignores it too.
  check_tensors(reader, expected_hf_shapes(config), model_dir,
                ignored={"lm_head.weight"} if config.tie_word_embeddings else ())
  file_dtype = reader.dtype(reader.keys()[0])
  return config, tensors_to_params(reader, config, dtype=params_dtype, put=put), file_dtype


def save(model_dir: str, config: Qwen2Config, params, dtype: str = "float32", extra_fields: dict | None = None):
  """Writes config.json and safetensors that transformers loads with Qwen2ForCausalLM.from_pretrained.
  `extra_fields` go into config.json as they are (token ids, say)."""
  tensors = params_to_tensors(params, config, dtype=np.dtype(dtype))
  write_checkpoint(tensors, model_dir)
  path = os.path.join(model_dir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump({**dict_to_hf_config(config, dtype), **(extra_fields or {})}, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
