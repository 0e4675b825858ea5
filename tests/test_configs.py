"""The stage configs parse, and freeze and scale exactly the modules the reference recipe says."""

import importlib.util

import jax
import pytest

from hico_jax import sharding
from hico_jax.data.pipeline import DataConfig
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.train import optimizer


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


def test_sweep_overrides_reach_the_stage2_config():
  """tools/sweep_default.py: dotted overrides land where named (lists become the tuples configs use), a data
  root rewires shards, tokenizer and held-out shards together, and a misspelt key fails instead of being
  ignored."""
  spec = importlib.util.spec_from_file_location("sweep_default", "tools/sweep_default.py")
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  base = _config("configs/tiny_synthetic.py", "stage2")
  config = sweep.stage2_config({"data": "/d", "model.llm.num_layers": 6, "optim.lr": 1e-3,
                                "optim.schedule": [["visual/vision_tower/.*", 1.0], [".*", 1.0]]}, 3, 7)
  assert config.model.llm.num_layers == 6 != base.model.llm.num_layers
  assert config.optim.lr == 1e-3 and config.optim.schedule == (("visual/vision_tower/.*", 1.0), (".*", 1.0))
  assert (config.data.shards, config.data.tokenizer_dir, config.eval.shards) == ("/d/shards", "/d/tokenizer",
                                                                                   "/d/eval_shards")
  assert (config.seed, config.data.seed, config.eval.max_per_task) == (3, 3, 7)
  assert config.model.vit.width == base.model.vit.width            # what was not named stays the default's
  with pytest.raises((AttributeError, KeyError)):
    sweep.stage2_config({"model.llm.num_layer": 6}, 0, 1)
