"""The embedded default with still pictures (configs/tiny_synthetic.py, hico_jax/train/default.py): stage 1 trains
every module on the picture tasks alone (rows of no frames), stage 2 on videos and pictures together; both data
configs build for the 64 px model (16 tokens a tile); a few steps of each, small, train, and the held-out table
lists the picture tasks apart from the five video tasks, whose summary line stays as it was."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from hico_jax import sharding
from hico_jax.data import pipeline, synthetic, synthetic_images, tfds_longvid
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.train import default, evaluate, optimizer, trainer

REPO = Path(__file__).resolve().parents[1]


def _stage(name, root=None):
  module = default.load_config_module(str(REPO / "configs" / "tiny_synthetic.py"))
  c = module.get_config(name)
  if root is not None:
    c.data.shards, c.data.tokenizer_dir = str(root / "shards"), str(root / "tokenizer")
  return module, c


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
  """default.prepare_data, small: 20 videos and 16 pictures to train on, 10 and 8 held out, in one build each."""
  root = tmp_path_factory.mktemp("default_mixed")
  default.prepare_data(str(root), 20, 10, 64, train_images=16, eval_images=8, fps_range=(4, 8),
                       duration_range=(4.0, 8.0))
  return root


def test_stage1_trains_everything_on_pictures_alone_and_stage2_mixes_them_with_the_videos(mixed_data):
  module, stage1 = _stage("stage1", mixed_data)
  _, stage2 = _stage("stage2", mixed_data)
  assert module.IMAGES[1] >= 4 * 50 and stage2.eval.max_per_task == 100   # 50 held-out questions a picture task
  model = HiCoConfig.from_dict(dict(stage1.model))
  assert model.tokens_per_tile == 16 and model.pipeline_counts()["visual_tokens_per_frame"] == 16
  data1 = pipeline.DataConfig.from_dict(dict(stage1.data), **model.pipeline_counts())
  data2 = pipeline.DataConfig.from_dict(dict(stage2.data), **model.pipeline_counts())
  assert (data1.frame_budget, data1.template) == (0, "qwen_2") and data1.tile_budget >= 5
  assert data2.tile_budget >= 5                   # a picture of 128 px takes base + 2x2 tiles
  abstract = jax.eval_shape(HiCo(model).init, jax.random.key(0), *init_inputs(model))
  frozen = optimizer.frozen_mask(sharding.unbox_abstract(abstract)["params"], stage1.optim.schedule)
  assert not any(jax.tree.leaves(frozen))         # a random decoder: every module learns in stage 1
  media = lambda data: {pipeline.open_source(data)[i][0]["media_type"] for i in range(len(pipeline.open_source(data)))}
  assert media(data1) == {"image"} and media(data2) == {"image", "video"}
  names = {d["name"] for d in tfds_longvid.LongVidSource(str(mixed_data / "eval_shards")).datasets}
  assert names == set(synthetic.TASKS) | set(synthetic_images.IMAGE_TASKS)


def _small(c):
  c.model.encode_chunk = 4
  c.mesh = (("fsdp", 4), ("tensor", 2))
  c.total_steps, c.log_every, c.checkpoint.every = 2, 1, 1000
  c.export_hf = False
  c.eval.max_per_task = 2
  return c


@pytest.mark.slow      # ~50 s on 2 cores (the real vocabulary's step compiles); tests/test_image_train_step.py's
                       # rows of pictures alone are its fast sibling
def test_three_steps_of_stage1_on_rows_of_pictures_alone_train(mixed_data, tmp_path):
  """Rows of no frames (data.frame_budget 0): the step encodes the tiles alone, and the loss falls."""
  _, c = _stage("stage1", mixed_data)
  c = _small(c)
  c.total_steps = 3
  c.eval.shards = None
  losses = []
  with pytest.MonkeyPatch.context() as patch:
    write = trainer.metrics.MetricWriter.write
    patch.setattr(trainer.metrics.MetricWriter, "write",
                  lambda self, step, values: (losses.append(values["loss"]), write(self, step, values))[1])
    trainer.train(c, str(tmp_path / "stage1"))
  assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.slow      # ~2 min on 2 cores: two stages' compiles and the held-out scoring of nine tasks
def test_a_few_steps_of_each_stage_train_and_the_table_lists_the_picture_tasks_apart(mixed_data, tmp_path):
  previous, results = None, {}
  for name in ("stage1", "stage2"):
    _, c = _stage(name, mixed_data)
    c = _small(c)
    c.init.path = previous
    c.eval.shards = str(mixed_data / "eval_shards") if name == "stage2" else None
    results[name] = trainer.train(c, str(tmp_path / name))
    assert np.isfinite(results[name]["loss"]) and results[name]["num_tokens"] > 0, name
    previous = str(tmp_path / name)
  scores = results["stage2"]["eval"]
  assert {t for t, r in scores.items() if r["media"] == "image"} == set(synthetic_images.IMAGE_TASKS)
  assert {t for t, r in scores.items() if r["media"] == "video"} == set(synthetic.TASKS)
  assert all(r["count"] == 2 and r["skipped"] == 0 for r in scores.values())
  lines = evaluate.format_results(scores).splitlines()
  assert [line.split()[0] for line in lines[1:6]] == sorted(synthetic.TASKS)
  assert lines[6].startswith("mean choice over 5 tasks ") and "of 5 tasks; p:" in lines[6]
  assert [line.split()[0] for line in lines[7:11]] == sorted(synthetic_images.IMAGE_TASKS)
  assert lines[11].startswith("mean choice over 4 image tasks ") and len(lines) == 12


def test_a_stage_whose_workdir_was_already_trained_says_so_instead_of_a_nan_loss():
  """A second run of the default in the same checkout resumes each stage at its last step: no step runs, no
  loss is logged, and the line says that instead of "final loss nan"."""
  assert default.stage_line("stage2", 1000, 8.24, {"loss": 0.0781, "step": 1000}, "runs/tiny/stage2") == (
      "stage2: 1000 steps in 8.2 min, final loss 0.078")
  assert default.stage_line("stage1", 40, 0.01, {"eval": {}}, "runs/tiny/stage1") == (
      "stage1: already trained to step 40 in runs/tiny/stage1; nothing to do (delete it to train again)")
  # Stopped by SIGTERM before its first logged step: no loss either, and not finished.
  assert default.stage_line("stage1", 40, 0.1, {"stopped_at": 3}, "runs/tiny/stage1") == (
      "stage1: stopped at step 3 of 40 on SIGTERM, its checkpoint saved in runs/tiny/stage1; the same command "
      "resumes it")


def test_a_stage_stopped_by_sigterm_ends_the_sequence_instead_of_starting_the_next_from_it(monkeypatch, tmp_path,
                                                                                           capsys):
  """The trainer returns `stopped_at` when SIGTERM stopped it (tests/test_train_run.py checks that); the default
  then stops too, rather than start stage 2 from an unfinished stage 1 while the job is being shut down."""
  from absl import flags
  from absl.testing import flagsaver
  stages = []

  def stopped_after_3_steps(config, workdir):
    stages.append(os.path.basename(workdir))
    return {"stopped_at": 3}

  monkeypatch.setattr(default, "prepare_data", lambda *args, **kwargs: None)
  monkeypatch.setattr(trainer, "train", stopped_after_3_steps)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(workdir=str(tmp_path / "runs"), stage_config=str(REPO / "configs" / "tiny_synthetic.py")):
    default.main([])
  assert stages == ["stage1"]
  assert "stage1: stopped at step 3 of 40 on SIGTERM" in capsys.readouterr().out
