"""The stage configs parse, freeze and scale exactly the modules the reference recipe says, and take every model
field as a command-line override."""

import dataclasses
import importlib.util
from pathlib import Path
import re
import sys

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from hico_jax import sharding
from hico_jax.cli import sweep_default
from hico_jax.data.pipeline import DataConfig
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.models.qwen2 import Qwen2Config
from hico_jax.models.vit import ViTConfig
from hico_jax.train import optimizer

REPO = Path(__file__).resolve().parent.parent


def _config(path, stage):
  spec = importlib.util.spec_from_file_location("stage_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(stage)


def _trainable_modules(config):
  model_config = HiCoConfig.from_dict(dict(config.model))
  abstract = jax.eval_shape(HiCo(model_config).init, jax.random.key(0), *init_inputs(model_config))
  params = sharding.unbox_abstract(abstract)["params"]
  frozen = optimizer.frozen_mask(params, config.optim.schedule)
  modules = {}
  for path, is_frozen in jax.tree_util.tree_flatten_with_path(frozen)[0]:
    top = "/".join(str(k.key) for k in path[:2])
    modules.setdefault(top, set()).add(bool(is_frozen))
  return {name: not any(states) for name, states in modules.items() if len(states) == 1}


@pytest.mark.parametrize("path,stages", [("configs/hico_2b.py", ["stage1", "stage2", "stage3"]),
                                         ("configs/hico_7b.py", ["stage1", "stage2", "stage3", "stage4"])])
def test_stage_configs_freeze_what_the_recipe_freezes(path, stages):
  for stage in stages:
    config = _config(path, stage)
    DataConfig.from_dict(dict(config.data))
    trainable = _trainable_modules(config)
    expected_llm = stage in ("stage2", "stage3")
    assert trainable["visual/projector"] is True
    assert trainable["visual/vision_tower"] is (stage != "stage1")
    assert trainable["llm/layers"] is expected_llm and trainable["llm/embed_tokens"] is expected_llm


def test_stage_learning_rates_follow_the_reference():
  assert _config("configs/hico_7b.py", "stage1").optim.lr == 1e-3
  stage2 = _config("configs/hico_7b.py", "stage2")
  assert stage2.optim.lr == 1e-5 and dict(stage2.optim.schedule)["visual/vision_tower/.*"] == 0.2   # 2e-6
  assert _config("configs/hico_7b.py", "stage4").model.vit.image_size == 448
  assert _config("configs/hico_7b.py", "stage1").data.template == "plain"


def test_sweep_overrides_reach_the_stage_configs():
  """tools/sweep_default.py: dotted overrides land where named (lists become the tuples configs use), a
  "stage:" prefix limits one to that stage, a data root rewires shards, tokenizer and held-out shards together,
  only the scored stage reads held-out shards, and a misspelt key fails instead of being ignored."""
  base = _config("configs/tiny_synthetic.py", "stage2")
  overrides = {"data": "/d", "model.llm.num_layers": 6, "optim.lr": 1e-3, "stage1:total_steps": 90,
               "optim.schedule": [["visual/vision_tower/.*", 1.0], [".*", 1.0]]}
  config = sweep_default.stage_config("stage2", overrides, 3, 7)
  assert config.model.llm.num_layers == 6 != base.model.llm.num_layers
  assert config.optim.lr == 1e-3 and config.optim.schedule == (("visual/vision_tower/.*", 1.0), (".*", 1.0))
  assert (config.data.shards, config.data.tokenizer_dir, config.eval.shards) == ("/d/shards", "/d/tokenizer",
                                                                                   "/d/eval_shards")
  assert (config.seed, config.data.seed, config.eval.max_per_task) == (3, 3, 7)
  assert config.total_steps == base.total_steps                     # stage 1's key left stage 2 alone
  assert config.model.vit.width == base.model.vit.width            # what was not named stays the default's
  stage1 = sweep_default.stage_config("stage1", overrides, 3, None)
  assert stage1.total_steps == 90 and stage1.model.llm.num_layers == 6 and stage1.eval.shards is None
  with pytest.raises((AttributeError, KeyError)):
    sweep_default.stage_config("stage2", {"model.llm.num_layer": 6}, 0, 1)


def test_every_model_field_named_in_the_readme_overrides_from_the_command_line(monkeypatch):
  """README's GPU line (`--config.model.vit.norm_impl=pallas ...`), through absl's real flag parser: a key the
  preset's ConfigDict lacks cannot be overridden, so each tower's every field must be there."""
  readme = (REPO / "README.md").read_text()
  overrides = sorted(set(re.findall(r"--config\.model\.(?:vit|llm)\.[\w.]+=\w+", readme)))
  assert any("vit.norm_impl" in o for o in overrides) and any("llm.attention_impl" in o for o in overrides)
  for path in ("configs/hico_2b.py", "configs/hico_7b.py", "configs/tiny_synthetic.py"):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=values)
    argv = [__file__, f"--config={REPO / path}:stage2", *overrides, "--config.model.vit.block_loop=scan"]
    monkeypatch.setattr(sys, "argv", argv)      # config_flags reads the overrides from sys.argv, as app.run does
    values(argv)
    config = values.config
    for override in overrides:
      dotted, value = override[len("--config."):].split("=")
      node = config
      for key in dotted.split("."):
        node = node[key]
      assert node == value, (path, override)
    assert config.model.vit.block_loop == "scan"
    # What makes that true for any field, not only the README's:
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}
    assert fields(ViTConfig) <= set(config.model.vit) and fields(Qwen2Config) <= set(config.model.llm), path
