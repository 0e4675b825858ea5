"""Bad input to the trainer stops with one clear error before the train step compiles: missing paths, a bad
evaluation set, config numbers that do not fit the mesh, an init checkpoint of another architecture or with other
settings. And the step compiles with the options the benchmark reports its figures with."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from hico_jax import presets
from hico_jax.convert import qwen2_hf, videochat_flash
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.train import checkpoint as ckpt, init_weights, step as step_lib, trainer
from hico_jax.validate import ConfigError
from tests.train_setup import FRAMES, SIZE, trainer_config


@pytest.fixture
def step_never_compiles(monkeypatch):
  def make_train_step(*_, **__):
    def step(*_):
      raise AssertionError("the train step was traced before the bad input was refused")
    return step
  monkeypatch.setattr(step_lib, "make_train_step", make_train_step)


@pytest.fixture
def nothing_compiles(monkeypatch, step_never_compiles):
  def refuse(*_, **__):
    raise AssertionError("something was traced before the bad input was refused")
  monkeypatch.setattr(jax, "jit", refuse)
  monkeypatch.setattr(jax, "eval_shape", refuse)


@pytest.mark.parametrize("field,message", [
    ("data.shards", r"data\.shards '.*missing' does not exist"),
    ("data.tokenizer_dir", r"data\.tokenizer_dir '.*missing' does not exist"),
], ids=["shards", "tokenizer"])
def test_missing_data_path_is_named_before_anything_compiles(synthetic_data, tmp_path, nothing_compiles, field,
                                                              message):
  config = trainer_config(synthetic_data)
  config.data[field.split(".")[1]] = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=message):
    trainer.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("make,message", [
    (lambda path: None, r"eval\.shards '.*eval_set' does not exist"),
    (lambda path: path.mkdir(), r"no prepared long_vid dataset under '.*eval_set'"),
], ids=["missing", "not_a_dataset"])
def test_bad_evaluation_set_is_named_before_anything_compiles(synthetic_data, tmp_path, nothing_compiles, make,
                                                               message):
  """The evaluation runs after the last step: a bad path found only then would cost the whole run."""
  config = trainer_config(synthetic_data)
  make(tmp_path / "eval_set")
  config.eval.shards = str(tmp_path / "eval_set")
  with pytest.raises(FileNotFoundError, match=message):
    trainer.train(config, str(tmp_path / "run"))


def test_the_step_compiles_with_the_benchmarks_options_for_its_rows(synthetic_data, tmp_path, monkeypatch):
  """The trainer asks ops/xla_options for the options of its rows (frame budget, the text the token budget
  leaves), as tools/benchmark.py does for the figures it reports."""
  from hico_jax.ops import xla_options
  asked = []

  class Reached(Exception):
    pass

  def record(model_config, frames_per_row, text_tokens_per_row):
    asked.append((model_config.vit.image_size, frames_per_row, text_tokens_per_row))
    raise Reached
  monkeypatch.setattr(xla_options, "train_compiler_options", record)
  config = trainer_config(synthetic_data)
  with pytest.raises(Reached):
    trainer.train(config, str(tmp_path / "run"))
  assert asked == [(SIZE, FRAMES, 160 - 16 * FRAMES)]


def test_vision_heavy_rows_compile_without_tritons_gemms_on_gpus(monkeypatch):
  """docs/benchmarks.md: XLA's Triton GEMMs run the ViT's projections at a third of cuBLAS's rate, while the
  decoder is faster with them; so the option follows which part of the row has most of the FLOPs."""
  from hico_jax.ops import xla_options
  model = HiCoConfig.from_dict(dict(presets.hico("hico_2b")))
  monkeypatch.setattr(xla_options.jax, "default_backend", lambda: "gpu")
  assert xla_options.train_compiler_options(model, 256, 512) == {"xla_gpu_enable_triton_gemm": False}
  assert xla_options.train_compiler_options(model, 4, 16384) == {}
  monkeypatch.setattr(xla_options.jax, "default_backend", lambda: "tpu")
  assert xla_options.train_compiler_options(model, 256, 512) == {}


@pytest.mark.parametrize("field,value", [("optimizer", "adam"), ("schedule_type", "linear")])
def test_misspelt_optimizer_or_schedule_is_a_config_error_before_anything_compiles(
    synthetic_data, tmp_path, nothing_compiles, field, value):
  """Before, anything but "sgd" ran AdamW and anything but "constant" ran the cosine schedule."""
  config = trainer_config(synthetic_data)
  config.optim[field] = value
  with pytest.raises(ConfigError, match=rf"optim\.{field}='{value}' is not one of"):
    trainer.train(config, str(tmp_path / "run"))


def test_batch_that_does_not_split_over_the_mesh_is_a_config_error_before_anything_compiles(
    synthetic_data, tmp_path, nothing_compiles):
  config = trainer_config(synthetic_data)
  config.batch_size = 6
  with pytest.raises(ConfigError, match=r"batch_size=6 is not divisible by mesh data\*fsdp=4"):
    trainer.train(config, str(tmp_path / "run"))


def test_micro_batch_with_fewer_clips_than_the_chunk_must_still_split_over_the_clip_devices(
    synthetic_data, tmp_path, nothing_compiles):
  """4 rows of one clip on (fsdp 4, seq 2): encode_chunk 8 divides over the 8 clip devices, but the tower's
  one step takes the micro-batch's 4 clips."""
  config = trainer_config(synthetic_data)
  config.mesh = (("fsdp", 4), ("seq", 2))
  config.model.encode_chunk = 8
  with pytest.raises(ConfigError, match=r"a vision-tower step of 4 clips \(a micro-batch's clips, fewer than "
                                        r"model\.encode_chunk=8\) is not divisible by mesh data\*fsdp\*seq=8"):
    trainer.train(config, str(tmp_path / "run"))


def test_a_merge_that_does_not_split_into_frames_is_a_config_error_before_anything_compiles(
    synthetic_data, tmp_path, nothing_compiles):
  """The pipeline writes a video's placeholders frame by frame (tokens_per_clip / clip_frames each): a merge to
  10 tokens a 4-frame clip has no whole count a frame."""
  config = trainer_config(synthetic_data)
  config.model.tokens_per_clip = 10
  with pytest.raises(ConfigError, match=r"model\.tokens_per_clip=10 is not a multiple of model\.vit\.clip_frames=4"):
    trainer.train(config, str(tmp_path / "run"))


def test_data_written_for_another_merge_is_a_config_error():
  """A DataConfig built with the reference's counts (16 a frame, 64 a tile) for the tiny 64 px model that merges
  a clip to 16 tokens (4 a frame) and gives a 4x4-patch tile 16 tokens: both counts named."""
  from hico_jax.data import pipeline
  from hico_jax.validate import validate_training
  from hico_jax import sharding
  model = HiCoConfig.from_dict(dict(presets.hico("tiny"), tokens_per_clip=16))
  model = dataclasses.replace(model, vit=dataclasses.replace(model.vit, image_size=SIZE))
  config = ml_collections.ConfigDict({"batch_size": 8, "accumulation_steps": 1, "total_steps": 1, "data": {
      "frame_budget": 16, "token_budget": 512, "image_size": SIZE}})
  mesh = sharding.make_mesh((("data", 8),))
  data = pipeline.DataConfig(shards="s", tokenizer_dir="t", image_size=SIZE, frame_budget=16, tile_budget=4)
  with pytest.raises(ConfigError) as error:
    validate_training(config, model, mesh, data)
  assert "writes 16 placeholders a frame in clips of 4, but the model merges a 4-frame clip to 16 tokens (4 a " \
         "frame)" in str(error.value)
  assert "writes 64 placeholders an image tile, but the model gives a tile 16 tokens" in str(error.value)
  validate_training(config, model, mesh, pipeline.DataConfig(shards="s", tokenizer_dir="t", image_size=SIZE,
                                                             frame_budget=16, tile_budget=4,
                                                             **model.pipeline_counts()))


def test_gpu_kernels_for_the_vision_tower_on_cpu_are_a_config_error_before_anything_compiles(
    synthetic_data, tmp_path, nothing_compiles):
  config = trainer_config(synthetic_data)
  config.model.vit.attention_impl = "cudnn"
  config.model.vit.norm_impl = "pallas"
  with pytest.raises(ConfigError, match=r"(?s)vit\.attention_impl='cudnn' runs on GPUs only.*"
                                        r"vit\.norm_impl='pallas' runs on GPUs only"):
    trainer.train(config, str(tmp_path / "run"))


def test_missing_init_path_is_named_before_the_step_compiles(synthetic_data, tmp_path, step_never_compiles):
  config = trainer_config(synthetic_data)
  config.init.path = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match=r"init\.path '.*no_such_run' does not exist"):
    trainer.train(config, str(tmp_path / "run"))


def test_init_from_a_run_of_another_hidden_size_names_the_parameter_and_both_shapes(synthetic_data, tmp_path,
                                                                                     step_never_compiles):
  config = trainer_config(synthetic_data)
  other = config.copy_and_resolve_references()
  other.model.llm.hidden_size = 32
  other_config = HiCoConfig.from_dict(dict(other.model))
  abstract = jax.eval_shape(HiCo(other_config).init, jax.random.key(0), *init_inputs(other_config))
  saver = ckpt.Checkpointer(str(tmp_path / "other_run"))
  saver.save(1, {"params": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(abstract)["params"])},
             force=True)
  saver.close()

  config.init.path = str(tmp_path / "other_run")
  with pytest.raises(ValueError, match=r"init\.path .* parameter llm/embed_tokens/embedding has shape "
                                       r"\(151936, 32\), the configured model needs \(151936, 64\)"):
    trainer.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("field, value", [("rope_theta", 5e6), ("rms_norm_eps", 1e-5)])
def test_init_from_a_run_saved_with_settings_no_shape_carries_names_them(synthetic_data, tmp_path,
                                                                         nothing_compiles, field, value):
  config = trainer_config(synthetic_data)
  other = config.copy_and_resolve_references()
  other.model.llm[field] = value                  # same shapes, another model
  saver = ckpt.Checkpointer(str(tmp_path / "other_run"))
  # The config saved with the step is all the check reads (params are checked after compiling, by shape).
  saver.save(1, {"params": {"x": np.zeros(2, np.float32)}}, config=json.loads(other.to_json_best_effort()),
             force=True)
  saver.close()
  (tmp_path / "other_run" / "config.json").write_text(config.to_json_best_effort())   # as a later restart leaves it

  config.init.path = str(tmp_path / "other_run")
  configured = config.model.llm[field]
  with pytest.raises(ValueError, match=rf"init\.path .* was saved with llm\.{field}={value!r} "
                                       rf"\(configured: {configured!r}\)"):
    trainer.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("kind", ["videochat_flash", "qwen2"])
def test_init_from_hf_weights_saved_with_another_rope_theta_names_it(synthetic_data, tmp_path, kind):
  config = trainer_config(synthetic_data)
  model_config = HiCoConfig.from_dict(dict(config.model))
  abstract = jax.eval_shape(HiCo(model_config).init, jax.random.key(0), *init_inputs(model_config))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(abstract)["params"])
  saved = dataclasses.replace(model_config, llm=dataclasses.replace(model_config.llm, rope_theta=1e7))
  if kind == "videochat_flash":
    videochat_flash.save(str(tmp_path / "hf"), saved, params)
  else:
    qwen2_hf.save(str(tmp_path / "hf"), saved.llm, params["llm"])
  init = ml_collections.ConfigDict({"path": str(tmp_path / "hf"), "kind": kind})
  configured = re.escape(repr(model_config.llm.rope_theta))      # the default config's own base
  with pytest.raises(ValueError, match=rf"was saved with llm\.rope_theta=10000000\.0 \(configured: {configured}\)"):
    init_weights.check_settings(init, model_config)
  init_weights.check_settings(init, saved)          # the matching config passes
