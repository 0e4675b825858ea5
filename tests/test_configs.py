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
