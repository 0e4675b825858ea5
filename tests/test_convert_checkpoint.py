"""tools/convert_checkpoint.py and run directories in hico_jax.from_pretrained: an HF checkpoint taken to a run
directory and back is the original file bit for bit; a run the trainer saved exports to what transformers
computes with the run's own params, and from_pretrained reads the run as it reads the export; a converted
directory initialises a training run; bad input is refused with the reason, and a failed conversion leaves no
output that looks complete.

Reference HF directories are written independently of our writers: random torch tensors saved with
safetensors (VideoChat-Flash layout) and transformers' own save_pretrained (plain Qwen2). A run directory is
saved through the trainer's Checkpointer, as the trainer saves it (sharded arrays, optimizer state, the
training config as JSON), which takes a second where a trainer run takes minutes.
"""

import functools
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hico_jax
from hico_jax import VIDEO_TOKEN_ID, presets
from hico_jax.convert import videochat_flash
from hico_jax.data import video as video_lib
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.models.qwen2 import Qwen2ForCausalLM
from hico_jax.train import checkpoint as ckpt, init_weights
from hico_jax.cli import convert_checkpoint as tool
from tests.hf_reference import make_hf_qwen2, qwen2_dir_from_videochat_flash
from tests.train_setup import hico_video_prompt_logits

REPO = Path(__file__).resolve().parents[1]
VOCAB, SIZE = 320, 64



def convert(*argv) -> int:
  return tool.main([str(a) for a in argv])


def _tiny_hico(tied: bool) -> HiCoConfig:
  compute = dict(dtype="float32", param_dtype="float32", remat_policy="none")
  return HiCoConfig.from_dict({"vit": dict(presets.VIT_PRESETS["tiny"], image_size=SIZE, **compute),
                               "llm": dict(presets.llm("tiny", vocab_size=VOCAB, tie_word_embeddings=tied,
                                                       **compute)),
                               "encode_chunk": 8})


@functools.lru_cache(maxsize=None)
def _fresh_params():
  """Random params of a tied tiny HiCo, numpy: noise on every one (zero biases and unit norms would hide a
  swapped or dropped tensor). Shapes from eval_shape: initialising would compile the model (~15 s here)."""
  config = _tiny_hico(tied=True)
  abstract = nn.unbox(jax.eval_shape(HiCo(config).init, jax.random.key(0), *init_inputs(config)))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (centre + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _tensors(model_dir) -> dict:
  return load_file(str(Path(model_dir) / "model.safetensors"))


def _assert_bit_identical(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, tensor in want.items():
    assert got[name].dtype == tensor.dtype, f"{name}: {got[name].dtype} != {tensor.dtype}"
    assert got[name].shape == tensor.shape, f"{name}: {tuple(got[name].shape)} != {tuple(tensor.shape)}"
    bits = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    assert torch.equal(got[name].view(bits), tensor.view(bits)), f"{name} differs"


# ----------------------------------------------------------------------------------------------------------
# HF -> run directory -> HF

@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def videochat_flash_dir(request, tmp_path_factory):
  """A tiny untied VideoChat-Flash checkpoint in the official layout: random tensors of every key the layout
  has, in the given dtype, saved with safetensors.torch; config.json with released bookkeeping fields too."""
  dtype = request.param
  config = _tiny_hico(tied=False)
  root = tmp_path_factory.mktemp(f"videochat_flash_{dtype}")
  generator = torch.Generator().manual_seed(1)
  tensors = {name: torch.randn(shape, generator=generator).to(getattr(torch, dtype))
             for name, shape in videochat_flash.expected_hf_shapes(config).items()}
  save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
  hf = videochat_flash.hico_to_hf_config(config, dtype)
  hf.update(eos_token_id=7, pad_token_id=3, mm_spatial_pool_mode="average", tokenizer_model_max_length=32768)
  (root / "config.json").write_text(json.dumps(hf))
  return root, dtype


def test_videochat_flash_dir_to_run_and_back_is_the_original_safetensors_bit_for_bit(videochat_flash_dir,
                                                                                    tmp_path):
  src, dtype = videochat_flash_dir
  assert convert("hf-to-orbax", src, tmp_path / "run") == 0
  # The form the trainer writes: finished steps under checkpoints/, the params in float32.
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["0"]
  saved = ckpt.ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "0" / "state")
  assert {leaf.dtype for leaf in jax.tree.leaves(saved)} == {np.dtype(np.float32)}
  assert convert("orbax-to-hf", tmp_path / "run", tmp_path / "hf", "--dtype", dtype) == 0

  _assert_bit_identical(_tensors(tmp_path / "hf"), _tensors(src))
  original, back = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "hf"))
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_theta", "tie_word_embeddings", "mm_vision_tower",
                videochat_flash.VISION_CONFIG_FIELD, "eos_token_id", "pad_token_id"):
    assert back[field] == original[field], field
  assert back["torch_dtype"] == dtype


# ----------------------------------------------------------------------------------------------------------
# Plain Qwen2 -> run directory -> from_pretrained, transformers, a training run's init

@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
  """transformers' own tiny tied Qwen2 (the tiny preset's decoder sizes, 320 tokens), and its run directory."""
  root = tmp_path_factory.mktemp("qwen2")
  model = make_hf_qwen2(root / "hf", inter=128, heads=4, kv_heads=2, theta=1e6, tied=True, seed=3)
  assert convert("hf-to-orbax", root / "hf", root / "run") == 0
  return root, model


def test_plain_qwen2_run_directory_computes_as_transformers_and_exports_the_original_bit_for_bit(qwen2_dir):
  root, reference = qwen2_dir
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids)).logits.numpy()
  model = hico_jax.from_pretrained(str(root / "run"))
  assert not model.is_video_model and model.checkpoint_dtype == "float32"
  np.testing.assert_allclose(model(ids), expected, atol=1e-4, rtol=0)

  assert convert("orbax-to-hf", root / "run", root / "back", "--dtype", "float32") == 0
  _assert_bit_identical(_tensors(root / "back"), _tensors(root / "hf"))
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(root / "back", local_files_only=True,
                                                           attn_implementation="eager").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.from_numpy(ids)).logits.numpy(), expected)


def _init_state(path):
  """A fresh tiny HiCo state with its params replaced from `path` as the trainer does (init.kind "run")."""
  config = _tiny_hico(tied=True)
  fresh = _fresh_params()
  init = ml_collections.ConfigDict({"path": str(path), "kind": "run"})
  init_weights.check_settings(init, config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = init_weights.load_into_state({"params": fresh}, init, config, jax.tree.map(lambda _: device, fresh))
  return fresh, jax.tree.map(np.asarray, state["params"])


def test_plain_qwen2_run_directory_initialises_the_llm_of_a_training_run_and_leaves_the_vision_tower(qwen2_dir):
  root, reference = qwen2_dir
  fresh, params = _init_state(root / "run")
  llm = params["llm"]
  torch_params = {k: v.detach() for k, v in reference.named_parameters()}
  np.testing.assert_array_equal(llm["embed_tokens"]["embedding"], torch_params["model.embed_tokens.weight"].numpy())
  np.testing.assert_array_equal(llm["norm"]["scale"], torch_params["model.norm.weight"].numpy())
  np.testing.assert_array_equal(llm["layers"]["self_attn"]["q_proj"]["bias"][1],
                                torch_params["model.layers.1.self_attn.q_proj.bias"].numpy().reshape(4, 16))
  jax.tree.map(np.testing.assert_array_equal, params["visual"], fresh["visual"])


# ----------------------------------------------------------------------------------------------------------
# A run directory as the trainer leaves it -> HF

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """Steps 2 and 3 saved through the trainer's Checkpointer: params on the 8 devices (some; orbax's first save
  of each device array shape costs seconds), an optimizer state beside them, the training config as JSON (its
  model trained with cuDNN attention, as on a GPU)."""
  root = tmp_path_factory.mktemp("trained")
  model = presets.hico("tiny", dtype="float32", remat_policy="none")
  model.vit.image_size, model.llm.vocab_size, model.encode_chunk = SIZE, VOCAB, 8
  model.llm.attention_impl = "cudnn"
  config = ml_collections.ConfigDict({"model": model, "seed": 0, "total_steps": 3})
  config_json = json.loads(config.to_json_best_effort())
  mesh = jax.make_mesh((8,), ("data",))
  by_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step_params = {2: jax.tree.map(lambda p: p * 0.5, _fresh_params()), 3: _fresh_params()}
  checkpointer = ckpt.Checkpointer(str(root), async_save=False)
  for step, params in step_params.items():
    llm = params["llm"]
    on_devices = {**params, "llm": {**llm, "embed_tokens": {"embedding": jax.device_put(
        llm["embed_tokens"]["embedding"], by_rows)}, "norm": jax.device_put(llm["norm"], replicated)}}
    state = {"params": on_devices, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)},
             "step": np.asarray(step, np.int32)}
    checkpointer.save(step, state, config=config_json, force=True)
  checkpointer.close()
  (root / "config.json").write_text(json.dumps(config_json))
  return root, step_params


def test_run_exports_what_transformers_and_hico_jax_compute_with_the_runs_params(trained_run, tmp_path):
  run, step_params = trained_run
  params, config = step_params[3], _tiny_hico(tied=True)
  assert convert("orbax-to-hf", run, tmp_path / "hf", "--dtype", "float32") == 0
  qwen2_dir_from_videochat_flash(tmp_path / "hf", tmp_path / "qwen2")
  reference = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen2", dtype=torch.float32,
                                                            attn_implementation="eager").eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB, (2, 24))
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids)).logits.numpy()
  ours = jax.jit(lambda p, i: Qwen2ForCausalLM(config.llm).apply({"params": p}, i)[0])(params["llm"], ids)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)

  from_run, from_export = (hico_jax.from_pretrained(str(d)) for d in (run, tmp_path / "hf"))
  # The machine's kernel (the CPU's chunked one), not whatever the run was trained with.
  assert from_run.is_video_model and from_run.config.llm.attention_impl == "chunked"
  np.testing.assert_allclose(from_run(ids), expected, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(from_run(ids), from_export(ids))


def test_run_and_its_export_compute_a_video_prompt_as_hico_with_the_runs_params(trained_run, tmp_path):
  """The vision tower and projector come through too."""
  run, step_params = trained_run
  params, config = step_params[3], _tiny_hico(tied=True)
  assert convert("orbax-to-hf", run, tmp_path / "hf", "--dtype", "float32") == 0
  from_run, from_export = (hico_jax.from_pretrained(str(d)) for d in (run, tmp_path / "hf"))
  rng = np.random.default_rng(1)
  frames = video_lib.normalize(rng.integers(0, 256, (1, 4, SIZE, SIZE, 3), dtype=np.uint8))
  ids = rng.integers(0, VOCAB, (1, 12))
  ids[0, 5] = VIDEO_TOKEN_ID
  got = from_run(ids, video=frames)
  np.testing.assert_allclose(got, hico_video_prompt_logits(config, params, ids, frames), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(got, from_export(ids, video=frames))


def test_orbax_to_hf_takes_the_latest_step_or_the_one_asked_for(trained_run, tmp_path):
  run, step_params = trained_run
  assert convert("orbax-to-hf", run, tmp_path / "latest", "--dtype", "float32") == 0
  assert convert("orbax-to-hf", run, tmp_path / "step2", "--step", 2) == 0
  embedding = lambda step: step_params[step]["llm"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(_tensors(tmp_path / "latest")["model.embed_tokens.weight"].numpy(), embedding(3))
  step2 = _tensors(tmp_path / "step2")["model.embed_tokens.weight"]
  assert step2.dtype == torch.bfloat16                     # the default, as the trainer's export
  np.testing.assert_array_equal(step2.float().numpy(), torch.from_numpy(embedding(2)).bfloat16().float().numpy())


def _tokenizer_dir(path: Path) -> Path:
  """A small real Hugging Face tokenizer (word level, written by `tokenizers`) with a tokenizer_config.json."""
  import tokenizers   # pylint: disable=import-outside-toplevel
  vocab = {word: i for i, word in enumerate(["[UNK]", "red", "green", "blue", "circle", "<|im_end|>"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  path.mkdir(parents=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32768, "eos_token": "<|im_end|>"}))
  return path


def test_every_export_carries_the_tokenizer_the_run_was_trained_with(tmp_path, monkeypatch):
  """A run saved from a repository root names its tokenizer relative to it (data.tokenizer_dir, as the default
  writes it): orbax-to-hf run from elsewhere finds it above the run, copies it beside the weights byte for byte,
  and save_pretrained of the run or of the export writes it again; a run without one exports the weights alone."""
  repo = tmp_path / "repo"
  tokenizer = _tokenizer_dir(repo / "data" / "tok")
  want = {name: (tokenizer / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
  model = presets.hico("tiny", dtype="float32", remat_policy="none")
  model.vit.image_size, model.llm.vocab_size, model.encode_chunk = SIZE, VOCAB, 8
  for name, data in (("with", {"tokenizer_dir": "data/tok"}), ("without", {"tokenizer_dir": "data/gone"})):
    config = json.loads(ml_collections.ConfigDict({"model": model, "data": data}).to_json_best_effort())
    checkpointer = ckpt.Checkpointer(str(repo / "runs" / name / "stage2"), async_save=False)
    checkpointer.save(1, {"params": _fresh_params(), "step": np.asarray(1, np.int32)}, config=config, force=True)
    checkpointer.close()
  monkeypatch.chdir(tmp_path)        # not the repository root: data/tok is found from the run's place
  run = repo / "runs" / "with" / "stage2"
  assert convert("orbax-to-hf", run, tmp_path / "hf", "--dtype", "float32") == 0
  hico_jax.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "again"))
  hico_jax.from_pretrained(str(run)).save_pretrained(str(tmp_path / "from_run"))
  for out in ("hf", "again", "from_run"):
    assert {name: (tmp_path / out / name).read_bytes() for name in want} == want, out
  assert convert("orbax-to-hf", repo / "runs" / "without" / "stage2", tmp_path / "bare") == 0
  assert (tmp_path / "bare" / "config.json").is_file() and not (tmp_path / "bare" / "tokenizer.json").exists()


def test_converted_videochat_flash_run_initialises_a_training_run(tmp_path):
  """hf-to-orbax's output is a training run's init.path: all params come from it."""
  config, params = _tiny_hico(tied=True), _fresh_params()
  shifted = jax.tree.map(lambda p: p + 1, params)
  videochat_flash.save(str(tmp_path / "hf"), config, shifted)
  assert convert("hf-to-orbax", tmp_path / "hf", tmp_path / "run") == 0
  _, loaded = _init_state(tmp_path / "run")
  jax.tree.map(np.testing.assert_array_equal, loaded, shifted)


# ----------------------------------------------------------------------------------------------------------
# Bad input

def _refused(capsys, *argv) -> str:
  """The reason, after checking that the tool exited non-zero with it on one line (argparse's own errors
  print the usage first)."""
  with pytest.raises(SystemExit) as exit_info:
    convert(*argv)
  assert exit_info.value.code != 0
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 or lines[0].startswith("usage:"), lines
  assert lines[-1].startswith("convert_checkpoint.py") and ": error: " in lines[-1], lines
  return lines[-1]


def test_bad_input_is_refused_with_one_line_naming_it(qwen2_dir, trained_run, tmp_path, capsys):
  root, _ = qwen2_dir
  run, _ = trained_run
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "notes.txt").write_text("keep me")
  (tmp_path / "neither").mkdir()
  (tmp_path / "neither" / "weights.bin").write_bytes(b"")

  assert "'" + str(tmp_path / "missing") + "' does not exist" in _refused(
      capsys, "hf-to-orbax", tmp_path / "missing", tmp_path / "out")
  assert "is neither a Hugging Face model directory (no config.json) nor a training run directory" in _refused(
      capsys, "hf-to-orbax", tmp_path / "neither", tmp_path / "out")
  assert "exists and is not empty (pass --overwrite" in _refused(capsys, "hf-to-orbax", root / "hf", tmp_path / "full")
  assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
  assert "has no step 7; its steps are [2, 3]" in _refused(capsys, "orbax-to-hf", run, tmp_path / "out", "--step", 7)
  assert "is a Hugging Face directory (the plain Qwen2 layout), not a training run" in _refused(
      capsys, "orbax-to-hf", root / "hf", tmp_path / "out")
  assert "is already a training run directory" in _refused(capsys, "hf-to-orbax", root / "run", tmp_path / "out")
  # --overwrite of a directory that holds the input would delete the input with it.
  assert "lie one inside the other" in _refused(capsys, "orbax-to-hf", run, Path(run).parent, "--overwrite")
  assert os.path.isdir(run)
  assert "invalid choice: 'float16'" in _refused(capsys, "orbax-to-hf", run, tmp_path / "out", "--dtype", "float16")
  assert not (tmp_path / "out").exists()
  with pytest.raises(SystemExit) as exit_info:
    convert("--help")
  assert exit_info.value.code == 0 and "hf-to-orbax" in capsys.readouterr().out


def test_overwrite_replaces_a_non_empty_output(qwen2_dir, tmp_path):
  root, _ = qwen2_dir
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "stale.txt").write_text("old")
  assert convert("orbax-to-hf", root / "run", tmp_path / "out", "--dtype", "float32", "--overwrite") == 0
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["out"]           # no temporary sibling left behind


def test_a_conversion_that_fails_midway_leaves_no_output(qwen2_dir, tmp_path, monkeypatch):
  root, _ = qwen2_dir
  real_save = tool.run_dir.save_hf

  def save_then_fail(out_dir, *args, **kwargs):
    real_save(out_dir, *args, **kwargs)
    raise OSError("No space left on device")

  monkeypatch.setattr(tool.run_dir, "save_hf", save_then_fail)
  with pytest.raises(SystemExit):
    convert("orbax-to-hf", root / "run", tmp_path / "out")
  assert os.listdir(tmp_path) == []
