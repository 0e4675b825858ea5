"""`validate(config, mesh)`: a config that fits passes; each mismatch stops with the offending numbers."""

import re

import jax
import ml_collections
import pytest

from hico_jax import presets
from hico_jax.models.qwen2 import Qwen2Config
from hico_jax.sharding import make_mesh
from hico_jax.validate import ConfigError, validate


def _config(model, **top):
  return ml_collections.ConfigDict({"model": model, **top})


def _mesh(mesh_config, n=8):
  return make_mesh(mesh_config, devices=jax.devices()[:n])


def test_fitting_config_passes_and_returns_the_parsed_model_config():
  config = _config(presets.llm("qwen2_7b"), batch_size=16, seq_len=4096)
  model = validate(config, _mesh([("data", 2), ("fsdp", 2), ("tensor", 2)]))
  assert isinstance(model, Qwen2Config)
  assert (model.num_heads, model.num_kv_heads, model.hidden_size, model.vocab_size) == (28, 4, 3584, 152064)
  assert model.tie_word_embeddings is False and model.remat_policy == "full"


def test_config_without_batch_or_seq_len_checks_only_the_model():
  model = validate(_config(presets.llm("tiny")), _mesh([("fsdp", 4)], n=4))
  assert model.hidden_size == 64


BAD_CASES = {
    # name: (model preset, overrides, top-level fields, mesh, numbers the message must name)
    "heads_vs_tensor": ("qwen2_5_1_5b", {}, {}, [("tensor", 8)],
                        [r"model\.num_heads=12 is not divisible by mesh tensor=8"]),
    "kv_heads_vs_tensor": ("tiny", {}, {}, [("fsdp", 2), ("tensor", 4)],
                           [r"model\.num_kv_heads=2 is not divisible by mesh tensor=4"]),
    "intermediate_vs_tensor": ("tiny", {"intermediate_size": 129}, {}, [("fsdp", 4), ("tensor", 2)],
                               [r"model\.intermediate_size=129 is not divisible by mesh tensor=2"]),
    "vocab_vs_tensor": ("tiny", {"vocab_size": 151937}, {}, [("fsdp", 4), ("tensor", 2)],
                        [r"model\.vocab_size=151937 is not divisible by mesh tensor=2"]),
    "batch_vs_data_fsdp": ("tiny", {}, {"batch_size": 12}, [("data", 2), ("fsdp", 4)],
                           [r"batch_size=12 is not divisible by mesh data\*fsdp=8"]),
    "seq_len_vs_seq": ("tiny", {}, {"seq_len": 102}, [("fsdp", 2), ("seq", 4)],
                       [r"seq_len=102 is not divisible by mesh seq=4"]),
    "seq_len_vs_max_positions": ("tiny", {"max_position_embeddings": 1024}, {"seq_len": 2048}, [("fsdp", 8)],
                                 [r"seq_len=2048 exceeds model\.max_position_embeddings=1024"]),
    "hidden_vs_fsdp_seq": ("tiny", {"hidden_size": 100}, {}, [("fsdp", 2), ("seq", 4)],
                           [r"model\.hidden_size=100 is not divisible by mesh fsdp\*seq.*=8"]),
    "cudnn_on_cpu": ("tiny", {"attention_impl": "cudnn"}, {}, [("fsdp", 8)],
                     [r"attention_impl='cudnn' runs on GPUs only; this mesh has \['cpu'\] devices"]),
    "cudnn_in_float32": ("tiny", {"attention_impl": "cudnn", "dtype": "float32"}, {}, [("fsdp", 8)],
                         [r"needs model\.dtype bfloat16 or float16, got 'float32'"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_mismatch_raises_config_error_naming_the_numbers(name):
  preset, overrides, top, mesh_config, expected = BAD_CASES[name]
  mesh = _mesh(mesh_config)
  with pytest.raises(ConfigError) as info:
    validate(_config(presets.llm(preset, **overrides), **top), mesh)
  message = str(info.value)
  assert str(dict(mesh.shape)) in message        # the mesh it was checked against
  for pattern in expected:
    assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


def test_mismatch_is_a_value_error_so_generic_handlers_still_catch_it():
  with pytest.raises(ValueError):
    validate(_config(presets.llm("tiny"), batch_size=3), _mesh([("data", 2)], n=2))


def test_unknown_model_field_is_named_with_the_known_fields():
  with pytest.raises(ConfigError, match=r"config\.model: unknown Qwen2 config field\(s\) \['num_experts'\]"):
    validate(_config(presets.llm("tiny", num_experts=8)), _mesh([("fsdp", 8)]))


def test_several_mismatches_are_reported_together_in_one_message():
  mesh = _mesh([("data", 2), ("seq", 2), ("tensor", 2)])
  config = _config(presets.llm("tiny", num_heads=9, num_kv_heads=3, hidden_size=65),
                   batch_size=5, seq_len=33)
  with pytest.raises(ConfigError) as info:
    validate(config, mesh)
  lines = str(info.value).splitlines()
  expected = [r"num_heads=9 .* tensor=2", r"num_kv_heads=3 .* tensor=2", r"hidden_size=65 .*=2",
              r"batch_size=5 .* data\*fsdp=2", r"seq_len=33 .* seq=2"]
  for pattern in expected:
    assert sum(bool(re.search(pattern, line)) for line in lines) == 1, f"{pattern!r} not once in:\n{lines}"
  assert len(lines) == 1 + len(expected)          # the header and one line per problem, nothing else


def test_training_validation_keeps_a_decoder_error_of_one_line():
  """validate_training gathers validate()'s reasons; a decoder config that fails to parse is one line, and
  was dropped with the header lines (a model config built in code, not through from_dict, reaches it)."""
  import dataclasses
  from hico_jax.models.hico import HiCoConfig
  from hico_jax.validate import validate_training
  model = HiCoConfig.from_dict(dict(presets.hico("tiny")))
  model = dataclasses.replace(model, llm=dataclasses.replace(model.llm, num_heads=3, num_kv_heads=2))
  config = ml_collections.ConfigDict({"batch_size": 8, "accumulation_steps": 1, "total_steps": 1, "data": {
      "frame_budget": 16, "token_budget": 512, "image_size": model.vit.image_size}})
  with pytest.raises(ConfigError, match=r"config\.model: .*num_heads=3"):
    validate_training(config, model, _mesh((("data", 8),)))
