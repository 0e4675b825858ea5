"""A stage run of the trainer end to end (configs/tiny_synthetic.py, small, on synthetic videos): preempted
halfway and resumed, it is bit-identical to one that was not (params, optimizer state, batches); its log counts
the real tokens; its terminal is one progress bar; its resources are closed on every way out; its HF export is
the trained model (transformers' Qwen2 and hico_jax.from_pretrained agree with it)."""

import contextlib
import io
import os
import re
import signal
import types
from pathlib import Path

import jax
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

import hico_jax
from hico_jax import VIDEO_TOKEN_ID
from hico_jax.data import pipeline, video as video_lib
from hico_jax.models.hico import HiCoConfig
from hico_jax.train import checkpoint as ckpt, progress, trainer
from tests.hf_reference import qwen2_dir_from_videochat_flash
from tests.train_setup import SIZE, hico_video_prompt_logits, numpy_tree, trainer_config


def _train(config, workdir, kill_after=None, terminal=None):
  """trainer.train, recording every batch it takes; with kill_after, SIGTERM (a preemption) arrives while the
  trainer fetches that step's batch. With a list as `terminal`, the run's stdout and stderr are appended to it
  as a terminal would show them (stderr taken for one, so the progress bar is drawn)."""
  batches, to_global = [], pipeline.to_global

  def recording(batch, mesh):
    batches.append({k: np.array(batch[k]) for k in ("input_ids", "targets", "frames", "segment_ids")})
    if len(batches) == kill_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return to_global(batch, mesh)

  previous = signal.getsignal(signal.SIGTERM)
  out, err = io.StringIO(), io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    patch.setattr(pipeline, "to_global", recording)
    patch.setattr(progress, "_is_terminal", lambda stream: stream is err)
    result = trainer.train(config, str(workdir))
  if terminal is not None:
    terminal.append((out.getvalue(), err.getvalue()))
  assert signal.getsignal(signal.SIGTERM) is previous      # train() puts back the handler it found
  return result, batches


def _saved(workdir, step):
  """The train state and the data iterator state a run saved at `step`, as written."""
  directory = Path(workdir) / "checkpoints" / str(step)
  state = numpy_tree(ocp.StandardCheckpointer().restore(directory / "state"))
  data = {name: (directory / "data" / name).read_text() for name in os.listdir(directory / "data")
          if name.endswith(".json")}
  return state, data


@pytest.fixture(scope="module")
def runs(synthetic_data, tmp_path_factory):
  """Stage 2 for 4 steps straight (with the HF export); and the same config preempted after step 2, then
  started again in its workdir."""
  root = tmp_path_factory.mktemp("runs")
  straight_config = trainer_config(synthetic_data)
  straight_config.export_hf = True
  terminal = []
  straight = _train(straight_config, root / "straight", terminal=terminal)
  killed = _train(trainer_config(synthetic_data), root / "resumed", kill_after=2)
  checkpointer = ckpt.Checkpointer(str(root / "resumed"))
  killed_steps = list(checkpointer.manager.all_steps())
  checkpointer.close()
  resumed = _train(trainer_config(synthetic_data), root / "resumed", terminal=terminal)
  return types.SimpleNamespace(root=root, config=straight_config, straight=straight, killed=killed,
                               killed_steps=killed_steps, resumed=resumed, terminal=terminal)


def test_run_preempted_after_2_of_4_steps_and_resumed_is_bit_identical_to_4_straight_steps(runs):
  (straight, straight_batches), (killed, killed_batches), (resumed, resumed_batches) = (
      runs.straight, runs.killed, runs.resumed)
  assert killed["step"] == 2 and 2 in runs.killed_steps and max(runs.killed_steps) == 2
  assert resumed["step"] == straight["step"] == 4
  assert killed["stopped_at"] == 2 and "stopped_at" not in resumed    # what the default's stage chain reads
  # The data iterator resumes at batch 3: the same batches, in the same order, as without the preemption.
  assert len(killed_batches) == 2 and len(resumed_batches) == 2 and len(straight_batches) == 4
  for i, (got, want) in enumerate(zip(killed_batches + resumed_batches, straight_batches)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {i + 1} {key}")
  assert not np.array_equal(straight_batches[1]["input_ids"], straight_batches[2]["input_ids"])

  assert resumed["loss"] == straight["loss"] and resumed["grad_norm"] == straight["grad_norm"]
  state, data = _saved(runs.root / "resumed", 4)
  expected_state, expected_data = _saved(runs.root / "straight", 4)
  assert jax.tree.structure(state) == jax.tree.structure(expected_state)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected_state)):
    assert np.array_equal(got, want), f"{jax.tree_util.keystr(path)} differs after the resume"
  assert int(state["step"]) == 4 and int(state["skipped_updates"]) == 0
  assert data == expected_data and data


def test_a_workdir_of_another_seed_or_rope_base_is_refused_before_anything_is_built(runs, synthetic_data):
  """The resumed run's workdir holds its checkpoints up to step 4, seed 0, RoPE base 1e4. The same config with
  seed 1 would resume them and report seed 0's model as its own: refused, naming both seeds and what to do, and
  the checkpoints stay as they were; likewise another RoPE base."""
  config = trainer_config(synthetic_data)
  config.seed = config.data.seed = 1
  before = sorted(os.listdir(runs.root / "resumed" / "checkpoints"))
  with pytest.raises(trainer.OtherRunInWorkdir, match=r"up to step 4, with seed 0 \(this run's: 1\) and data.seed 0 "
                                       r"\(this run's: 1\).*its own --workdir"):
    trainer.train(config, str(runs.root / "resumed"))
  # The same seed with another RoPE base: the checkpoint would restore without a shape error and compute
  # something else.
  config = trainer_config(synthetic_data)
  config.model.llm.rope_theta = 1e6
  with pytest.raises(trainer.OtherRunInWorkdir, match=r"model\.llm\.rope_theta 10000\.0 \(this run's: 1000000\.0\)"):
    trainer.train(config, str(runs.root / "resumed"))
  assert sorted(os.listdir(runs.root / "resumed" / "checkpoints")) == before


def test_run_resources_are_all_closed_when_the_loop_stops_on_a_non_finite_loss(tmp_path):
  """The trainer's non-finite stop raises out of RunResources: the save in flight completes, the metric writer
  closes and the SIGTERM handler the run found is back. (The runs above cover the loop's end and SIGTERM.)"""
  config = ml_collections.ConfigDict({"checkpoint": dict(keep=2, every=1, async_save=True)})
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(FloatingPointError):
    with trainer.RunResources(str(tmp_path), config) as run:
      writer = run.open_writer(total_steps=2, start_step=0, flops_per_step=lambda supervised: 0.0)
      assert signal.getsignal(signal.SIGTERM) is not previous
      os.kill(os.getpid(), signal.SIGTERM)                 # a preemption now only asks the loop to stop
      assert run.stop_requested
      run.checkpointer.save(1, {"w": np.arange(3.0)}, force=True)
      raise FloatingPointError("loss or gradient non-finite 5 steps in a row")
  assert signal.getsignal(signal.SIGTERM) is previous
  assert writer._writer.all_writers is None                # tensorboardX's SummaryWriter after close()
  assert os.listdir(tmp_path / "checkpoints") == ["1"]     # finished and renamed from its temporary name
  np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "1" / "state")["w"],
                                np.arange(3.0))


def test_logged_tokens_are_the_real_tokens_of_every_step_since_the_last_log_line(runs):
  result, batches = runs.straight
  assert result["step"] == 4 and len(batches) == 4
  real_tokens = sum(int((batch["segment_ids"] > 0).sum()) for batch in batches[2:])   # steps 3 and 4
  assert 0 < real_tokens < sum(batch["segment_ids"].size for batch in batches[2:])     # rows are padded
  assert result["tokens_since_last_log"] == real_tokens
  # The run resumed at step 3 logs the same interval: the counts add up over a preemption.
  assert runs.resumed[0]["tokens_since_last_log"] == real_tokens


def test_the_terminal_shows_one_progress_bar_with_loss_speed_and_eta_not_a_line_per_log_step(runs):
  """The straight run logs at steps 2 and 4, the resumed one at step 4: the bar is drawn in place (carriage
  returns) and ends on one newline, the resumed bar starts at the resumed step, and stdout stays empty."""
  (straight_out, straight_err), (resumed_out, resumed_err) = runs.terminal
  for out, err, result, start in ((straight_out, straight_err, runs.straight[0], 0),
                                  (resumed_out, resumed_err, runs.resumed[0], 2)):
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    states = [state for state in err.strip().split("\r") if state]
    assert not any(re.match(r"\s*step \d+/\d+", state) for state in states)     # the old per-log-step line
    assert f"| {start}/4 [" in states[0], states[0]
    final = states[-1]
    assert final.startswith("stage2: 100%|") and "| 4/4 [" in final, final
    loss = re.search(r"loss (\d+\.\d{4}), ", final)
    assert loss and float(loss.group(1)) == pytest.approx(result["loss"], abs=1e-4)
    assert re.search(r", \d+\.\d\d (s/step|steps/s), [\d,]+ tok/s, ETA 0\.0 min\]$", final), final


def test_export_is_the_trained_model_for_transformers_qwen2_and_from_pretrained(runs, tmp_path):
  export = runs.root / "straight" / "hf"
  trained, _ = _saved(runs.root / "straight", 4)
  # The export stores the trained weights rounded to bfloat16, and nothing else.
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), trained["params"])
  model = hico_jax.from_pretrained(str(export))
  assert model.checkpoint_dtype == "bfloat16"
  # Complete: the tokenizer it was trained with beside the weights, as tools/chat.py reads it.
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (export / name).read_bytes() == (Path(runs.config.data.tokenizer_dir) / name).read_bytes(), name
  jax.tree.map(np.testing.assert_array_equal, model.stacked_params(), rounded)

  rng = np.random.default_rng(0)
  config = HiCoConfig.from_dict(dict(runs.config.model))
  vocab = config.llm.vocab_size
  # The LLM alone, in transformers.
  qwen2_dir_from_videochat_flash(export, tmp_path / "qwen2")
  reference = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "qwen2"), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  ids = rng.integers(0, vocab, (2, 24))
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_allclose(model(ids), expected, atol=1e-4, rtol=0)

  # The whole model on a video prompt, against HiCo.__call__ with the (rounded) trained params.
  frames = video_lib.normalize(rng.integers(0, 256, (1, 8, SIZE, SIZE, 3), dtype=np.uint8))
  ids = rng.integers(0, vocab, (1, 20))
  ids[0, 6] = VIDEO_TOKEN_ID
  logits = model(ids, video=frames)
  assert logits.shape == (1, 19 + 128, vocab)
  np.testing.assert_allclose(logits, hico_video_prompt_logits(config, rounded, ids, frames), atol=1e-4, rtol=0)


