"""YaRN RoPE scaling against transformers: a checkpoint whose config.json asks for it (VideoChat-Flash's
needle-in-a-haystack setting, {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}) gives
transformers' logits past the original context, save_pretrained writes it back so transformers rebuilds the
same model, and the RoPE kinds we do not implement are refused by name."""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hico_jax
from hico_jax import presets
from hico_jax.convert import qwen2_hf, videochat_flash
from hico_jax.models import hico, qwen2
from hico_jax.ops.rope import YarnScaling
from tests.hf_reference import make_hf_qwen2, rewrite_config

THETA = 10000.0
ORIGINAL = 64          # the "pretrained" context: the 300-token input runs well past it
LENGTH = 300

BARE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
CASES = {
    # 4.x's spelling, as VideoChat-Flash's checkpoints carry it: rope_scaling with "type", theta at the top.
    "legacy_rope_scaling": BARE,
    # Every optional key of transformers' YaRN that changes the result, truncate off (a fractional ramp).
    "optional_keys": {**BARE, "attention_factor": 0.8, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    # attention_factor from mscale / mscale_all_dim (DeepSeek's form); another factor and original length.
    "mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 1.0,
               "mscale_all_dim": 0.5},
}


def _make_hf_yarn(out_dir, rope, *, legacy=False, seed=0):
  """A random transformers Qwen2ForCausalLM with YaRN, saved to `out_dir`; the torch model (eval, fp32).

  Weights at std 0.1 (not 0.02) make attention peaked enough that a wrong rotation moves the logits by O(1),
  far beyond the 1e-4 parity tolerance; biases and norm scales are random so nothing passes by being zero."""
  model = make_hf_qwen2(out_dir, seed=seed, max_positions=int(rope["factor"] * rope["original_max_position_embeddings"]),
                        rope_parameters={"rope_theta": THETA, **rope}, init_std=0.1)
  if legacy:
    def to_legacy(hf):
      hf.pop("rope_parameters")
      hf.update(rope_theta=THETA, rope_scaling={"type": "yarn", **{k: v for k, v in rope.items() if k != "rope_type"}})
    rewrite_config(out_dir, to_legacy)
  return model


def _read_config(model_dir):
  with open(os.path.join(model_dir, "config.json")) as f:
    return json.load(f)


def _ids(seed=0):
  return np.random.default_rng(seed).integers(0, 320, (1, LENGTH))


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.numpy()


# ----------------------------------------------------------------------------------------- logits parity

@pytest.mark.parametrize("case", list(CASES))
def test_yarn_logits_match_transformers_past_the_original_context(tmp_path, case):
  rope = CASES[case]
  hf_model = _make_hf_yarn(tmp_path, rope, legacy=case.startswith("legacy"))
  ids = _ids()
  expected = _torch_logits(hf_model, ids)
  config, params, _ = qwen2_hf.load(str(tmp_path), params_dtype=np.float32, dtype="float32", remat_policy="none")
  assert config.rope_scaling == YarnScaling.from_dict(rope, config.max_position_embeddings)

  def logits(cfg):
    return np.asarray(jax.jit(qwen2.Qwen2ForCausalLM(cfg).apply)({"params": params}, jnp.asarray(ids))[0])

  np.testing.assert_allclose(logits(config), expected, atol=1e-4, rtol=0)
  # What makes the test able to fail: the same weights with plain RoPE (or YaRN without the optional keys)
  # are far from transformers' YaRN, but only past what the unscaled rotation reproduces.
  wrong = [dataclasses.replace(config, rope_scaling=None)]
  if case != "legacy_rope_scaling":
    wrong.append(dataclasses.replace(config, rope_scaling=YarnScaling(
        rope["factor"], rope["original_max_position_embeddings"])))
  for cfg in wrong:
    assert np.abs(logits(cfg) - expected).max() > 0.1, cfg.rope_scaling


def test_yarn_tables_match_transformers_rotary_embedding_up_to_160k_positions():
  """inv_freq and the cos/sin scale on their own, for the shape of VideoChat-Flash's setting (head_dim 128,
  theta 1e6, factor 4 over 32768), at positions up to 160k."""
  from hico_jax.ops import rope as rope_ops
  hf_config = transformers.Qwen2Config(
      hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
      rope_parameters={"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 32768})
  reference = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(hf_config)
  positions = np.array([[0, 1, 4095, 32767, 32768, 100000, 163839]])
  with torch.no_grad():
    cos_ref, sin_ref = reference(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
  scaling = YarnScaling(4.0, 32768)
  # theta ** x in XLA and in torch may differ by an ulp (plain RoPE's tables too); the rest is the same ops.
  np.testing.assert_allclose(np.asarray(scaling.inverse_frequencies(128, 1e6)), reference.inv_freq.numpy(),
                             rtol=2.5e-7, atol=0)
  assert scaling.attention_scale() == reference.attention_scaling
  cos, sin = rope_ops.rope_cos_sin(jnp.asarray(positions), 128, 1e6, scaling)
  # cos/sin of angles up to 1.6e5 rad: XLA's and torch's range reduction differ in the last bits.
  np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-5, rtol=0)
  plain_cos, _ = rope_ops.rope_cos_sin(jnp.asarray(positions), 128, 1e6)
  assert np.abs(np.asarray(plain_cos) - cos_ref.numpy()).max() > 0.1


# -------------------------------------------------------------------------------------- save_pretrained

def test_save_pretrained_writes_yarn_back_and_transformers_rebuilds_the_same_model(tmp_path):
  rope = CASES["optional_keys"]
  src, out = str(tmp_path / "src"), str(tmp_path / "out")
  hf_model = _make_hf_yarn(src, rope)
  model = hico_jax.from_pretrained(src, dtype="float32")
  model.save_pretrained(out)

  saved = _read_config(out)
  expected_keys = {k: v for k, v in rope.items() if k != "rope_type"}
  for field in ("rope_scaling", "rope_parameters"):     # 4.x reads the first, 5.x both (the first wins)
    assert saved[field]["rope_type"] == "yarn" and saved[field] | expected_keys == saved[field], (field, saved)
  assert saved["rope_scaling"]["type"] == "yarn"        # the key VideoChat-Flash's own code reads

  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, local_files_only=True,
                                                           attn_implementation="eager").eval()
  original_rope = {k: v for k, v in hf_model.config.rope_parameters.items() if k != "type"}
  assert {k: v for k, v in reloaded.config.rope_parameters.items() if k != "type"} == original_rope
  ids = _ids(1)
  np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(hf_model, ids), atol=1e-6, rtol=0)
  assert hico_jax.from_pretrained(out, dtype="float32").config.rope_scaling == model.config.rope_scaling


def test_plain_rope_checkpoint_still_saves_without_rope_scaling(tmp_path):
  config = qwen2.Qwen2Config.from_dict(dict(presets.llm("tiny")))
  hf = qwen2_hf.dict_to_hf_config(config, "float32")
  assert "rope_scaling" not in hf and hf["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
  assert qwen2_hf.hf_config_to_dict(hf).get("rope_scaling") is None


def test_videochat_flash_layout_writes_yarn_and_loads_like_the_references_model_which_ignores_it(
    tmp_path, caplog):
  """The official layout's config.json reuses the Qwen2 fields. VideoChat-Flash's own decoder (Qwen2_Flash)
  has no rope scaling, so its chat() ignores the field, and so does our load of that layout, saying so; the
  reference's NIAH loads the same file as a stock Qwen2 that applies it (rope_scaling_in_file)."""
  config = hico.HiCoConfig.from_dict(dict(presets.hico("tiny")))
  config = dataclasses.replace(config, llm=dataclasses.replace(
      config.llm, rope_scaling=YarnScaling(4.0, 32768)))
  hf = videochat_flash.hico_to_hf_config(config, "bfloat16")
  assert hf["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 32768}
  with caplog.at_level(logging.WARNING):
    assert videochat_flash.hf_config_to_hico(hf).llm.rope_scaling is None
  assert "rope_scaling is ignored" in caplog.text
  # As the released checkpoints are edited for the evaluation: the bare legacy dict, no rope_parameters.
  hf.pop("rope_parameters")
  hf["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert videochat_flash.rope_scaling_in_file(str(tmp_path)) == YarnScaling(4.0, 32768)
  hf.pop("rope_scaling")
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert videochat_flash.rope_scaling_in_file(str(tmp_path)) is None


# -------------------------------------------------------------------------------------------- the config

def test_config_takes_a_dict_and_stays_hashable_for_jit():
  """A run config (ml_collections) gives a dict; jit needs the config hashable, and equal settings equal."""
  fields = dict(presets.llm("tiny", rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64}))
  config = qwen2.Qwen2Config.from_dict(fields)
  assert config.rope_scaling == YarnScaling(4.0, 64)
  assert hash(config) == hash(dataclasses.replace(config, rope_scaling=YarnScaling(4.0, 64)))
  # A missing original length is max_position_embeddings, as transformers defaults it.
  config = qwen2.Qwen2Config.from_dict({**fields, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  assert config.rope_scaling.original_max_position_embeddings == config.max_position_embeddings
  # dataclasses.asdict (a run directory's saved config) reads back to the same config.
  assert qwen2.Qwen2Config.from_dict(dataclasses.asdict(config)) == config


# ------------------------------------------------------------------------------------------------ refusals

def _minimal_hf(**fields):
  return {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": THETA,
          "max_position_embeddings": 256, **fields}


@pytest.mark.parametrize("field,rope_type", [
    ("rope_scaling", "dynamic"), ("rope_scaling", "linear"), ("rope_parameters", "llama3"),
    ("rope_parameters", "longrope"),
])
def test_unsupported_rope_type_is_refused_naming_it(field, rope_type):
  hf = _minimal_hf(**{field: {"type": rope_type, "factor": 4.0}})
  with pytest.raises(ValueError, match=rf"{field}\.rope_type = '{rope_type}' is not supported"):
    qwen2_hf.hf_config_to_dict(hf)


def test_unsupported_rope_type_in_a_checkpoint_is_refused_by_from_pretrained(tmp_path):
  _make_hf_yarn(tmp_path, BARE)
  rewrite_config(tmp_path, lambda hf: hf.update(rope_parameters={"rope_theta": THETA, "rope_type": "dynamic",
                                                                   "factor": 4.0}))
  with pytest.raises(ValueError, match=r"config\.json: rope_parameters\.rope_type = 'dynamic' is not supported"):
    hico_jax.from_pretrained(str(tmp_path), dtype="float32")


@pytest.mark.parametrize("rope,named", [
    ({"factor": 0.5}, r"YaRN factor must be >= 1, got 0\.5"),
    ({"original_max_position_embeddings": 64}, r"YaRN needs the key 'factor'"),
    ({"factor": 4.0, "short_factor": [1.0]}, r"unknown YaRN config field\(s\) \['short_factor'\]"),
    ({"factor": 4.0, "beta_fast": 1.0, "beta_slow": 8.0}, r"beta_fast=1\.0 must be >= beta_slow=8\.0"),
    ({"factor": 4.0, "attention_factor": -1.0}, r"attention_factor must be > 0"),
    ({"factor": 4.0, "partial_rotary_factor": 0.5}, r"partial_rotary_factor = 0\.5 is not supported"),
], ids=["factor_below_1", "no_factor", "unknown_key", "betas_swapped", "negative_attention_factor",
        "partial_rotary"])
def test_bad_yarn_settings_are_refused_naming_them(rope, named):
  hf = _minimal_hf(rope_scaling={"type": "yarn", **rope})
  with pytest.raises(ValueError, match=r"config\.json: rope_scaling.*" + named):
    qwen2_hf.hf_config_to_dict(hf)
