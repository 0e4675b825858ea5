"""Stage 1 from the released parts: a UMT encoder checkpoint written by torch.save in the released naming
(`encoder.*`, the final norm as `encoder.norm`, one stored block more than runs) and a transformers Qwen2
directory become a run directory that the stage-1 config starts from; its tower computes what the independent
PyTorch reference computes when loaded as the official build_vit loads it, its projector is drawn as torch's
nn.Linear draws one, and a file that is not the encoder is refused in one line naming the tensor.

The encoder is tiny (width 128, 2 blocks run, 3 stored) for the parity and init tests; the tool itself only
takes UMT-L, so its refusals are checked with small files of the wrong depth or width.
"""

import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest
import torch

from hico_jax import presets
from hico_jax.convert import released_parts, run_dir
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.vit import UMTViT, ViTConfig
from hico_jax.train import init_weights, recipe
from tests.hf_reference import make_hf_qwen2
from tests.random_params import random_hico_params
from tests.test_convert_checkpoint import _refused, convert
from tests.torch_reference import videochat_flash as ref

SIZE, VOCAB = 224, 320
TINY_TOWER = dict(width=128, heads=2, mlp_dim=256)


def _released_encoder_state(encoder: ref.UMTEncoder, extra: dict | None = None) -> dict:
  """A reference encoder's state dict in the released file's naming: `encoder.` + its key, the final norm
  stored as the pretrained UMT's `encoder.norm`."""
  state = {"encoder." + k.replace("vision_layernorm.", "norm."): v.detach().clone()
           for k, v in encoder.state_dict().items()}
  return {**state, **(extra or {})}


def _randomised(encoder: ref.UMTEncoder, seed: int) -> ref.UMTEncoder:
  """torch's init leaves q/v biases at 0 and norms at 1, where a converter's mix-up would not show."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in encoder.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
      elif name.endswith(("bias", "q_bias", "v_bias")):
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))
  return encoder.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """(encoder file, LLM directory, the torch reference tower as build_vit loads the file, the HF LLM)."""
  root = tmp_path_factory.mktemp("released_parts")
  stored = _randomised(ref.UMTEncoder(image_size=SIZE, depth=3, **TINY_TOWER), seed=0)
  # A UMT pretraining checkpoint may carry more than the encoder; build_vit keeps only `encoder.*`.
  torch.save(_released_encoder_state(stored, {"clip_decoder.0.weight": torch.zeros(4, 4)}),
             root / "UMT-L_f4_vision.pt")
  # The reference tower, loaded the way umt_encoder.py's build_vit loads the file: encoder.* only,
  # encoder.norm renamed, load_state_dict(strict=False) into a tower of the blocks that run.
  reference = ref.UMTEncoder(image_size=SIZE, depth=2, **TINY_TOWER).eval()
  loaded = torch.load(root / "UMT-L_f4_vision.pt", weights_only=True)
  result = reference.load_state_dict(
      {k[len("encoder."):].replace("norm.", "vision_layernorm.") if k.startswith("encoder.norm.")
       else k[len("encoder."):]: v for k, v in loaded.items() if k.startswith("encoder.")}, strict=False)
  assert not result.missing_keys and all(k.startswith("blocks.2.") for k in result.unexpected_keys)
  tiny = presets.LLM_PRESETS["tiny"]
  llm = make_hf_qwen2(root / "Qwen2-tiny-Instruct", vocab=VOCAB, hidden=tiny["hidden_size"],
                      inter=tiny["intermediate_size"], layers=tiny["num_layers"], heads=tiny["num_heads"],
                      kv_heads=tiny["num_kv_heads"], theta=tiny["rope_theta"], eps=tiny["rms_norm_eps"],
                      tied=True, max_positions=tiny["max_position_embeddings"], seed=5)
  return root / "UMT-L_f4_vision.pt", root / "Qwen2-tiny-Instruct", reference, llm


def _tiny_vit() -> ViTConfig:
  return ViTConfig.from_dict(dict(presets.VIT_PRESETS["tiny"], image_size=SIZE, dtype="float32"))


@pytest.fixture(scope="module")
def run(parts, tmp_path_factory):
  """The run directory made of the parts, as parts-to-orbax writes it (with the tiny tower)."""
  vision, llm_dir, _, _ = parts
  config, params, token_ids = released_parts.load(str(vision), str(llm_dir), seed=3, vit=_tiny_vit())
  out = tmp_path_factory.mktemp("run") / "init"
  out.mkdir()
  init_weights.save_run(str(out), params, {"model": run_dir.config_to_dict(config),
                                           run_dir.TOKEN_IDS_FIELD: token_ids})
  return out


def _stage1_config(init_path) -> ml_collections.ConfigDict:
  """The stage-1 recipe over the tiny preset (the LLM's vocabulary cut to the test checkpoint's), starting
  from `init_path` as `--config.init.path` sets it."""
  model = presets.hico("tiny", dtype="float32", remat_policy="none")
  model.vit.image_size, model.llm.vocab_size = SIZE, VOCAB
  c = recipe.stage_config("stage1", model, shards="unused", tokenizer_dir="unused", batch_size=8, total_steps=2)
  c.init.path = str(init_path)
  return c


@pytest.fixture(scope="module")
def stage1_params(run):
  """The params a stage-1 run starts with: fresh ones replaced from the run directory by the trainer's
  init (its settings check first, as the trainer does before compiling)."""
  c = _stage1_config(run)
  config = HiCoConfig.from_dict(c.model)
  init_weights.check_settings(c.init, config)
  fresh = random_hico_params(config, seed=9)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = init_weights.load_into_state({"params": fresh}, c.init, config, jax.tree.map(lambda _: device, fresh))
  return config, fresh, jax.tree.map(np.asarray, state["params"])


def test_stage1_starts_from_the_run_and_its_tower_computes_the_torch_reference_features(parts, stage1_params):
  _, _, reference, _ = parts
  config, fresh, params = stage1_params
  frames = np.random.default_rng(0).standard_normal((2, 4, SIZE, SIZE, 3)).astype(np.float32)
  ours = jax.jit(UMTViT(config.vit).apply)({"params": params["visual"]["vision_tower"]}, frames)
  with torch.no_grad():
    expected = reference(torch.from_numpy(np.moveaxis(frames, -1, 2).copy())).numpy()
  assert ours.shape == expected.shape == (2, 4 * (SIZE // 16) ** 2, 128)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
  # Every param came from the run: none is left at the fresh state's value.
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(fresh)):
    assert not np.array_equal(got, want), jax.tree_util.keystr(path)


def test_the_llm_is_the_qwen2_checkpoints(parts, stage1_params):
  _, _, _, llm = parts
  _, _, params = stage1_params
  torch_params = {k: v.detach().numpy() for k, v in llm.named_parameters()}
  np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"], torch_params["model.embed_tokens.weight"])
  np.testing.assert_array_equal(params["llm"]["layers"]["mlp"]["down_proj"]["kernel"][1],
                                torch_params["model.layers.1.mlp.down_proj.weight"].T)


def test_projector_is_drawn_as_torch_draws_a_fresh_nn_linear(stage1_params):
  """The official stage 1 builds the projector after from_pretrained: two nn.Linear at torch's default init."""
  config, _, params = stage1_params
  projector = params["visual"]["projector"]
  for name, (fan_in, fan_out) in (("fc1", (config.vit.width, config.llm.hidden_size)),
                                  ("fc2", (config.llm.hidden_size, config.llm.hidden_size))):
    torch_linears = [torch.nn.Linear(fan_in, fan_out) for _ in range(8)]       # torch's own draw, 8 times over
    for ours, theirs in ((projector[name]["kernel"], torch.stack([m.weight.detach().T for m in torch_linears])),
                         (projector[name]["bias"], torch.stack([m.bias.detach() for m in torch_linears]))):
      theirs = theirs.numpy()
      assert ours.shape == theirs.shape[1:]
      bound = np.abs(theirs).max()                   # torch's bound, to within a sample's reach of it
      assert np.abs(ours).max() <= bound * 1.02 and np.abs(ours).max() >= bound * (0.9 if ours.ndim == 2 else 0.5)
      assert abs(ours.std() - theirs.std()) < 0.1 * theirs.std() and abs(ours.mean()) < 0.2 * theirs.std()


def test_run_directory_names_the_model_it_holds(run):
  model = run_dir.read(str(run))
  assert isinstance(model.config, HiCoConfig) and model.config.vit.depth == 2 and model.config.llm.vocab_size == VOCAB


# ----------------------------------------------------------------------------------------------------------
# Files that are not the encoder

def _write(path, state):
  torch.save(state, path)
  return str(path)


def _library_error(path, vit=None) -> str:
  with pytest.raises(ValueError) as error:
    released_parts.umt_encoder_params(released_parts.read_torch_state_dict(path), path, vit or _tiny_vit())
  assert "\n" not in str(error.value)
  return str(error.value)


@pytest.fixture(scope="module")
def tiny_state():
  return _released_encoder_state(_randomised(ref.UMTEncoder(image_size=SIZE, depth=3, **TINY_TOWER), seed=1))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("encoder.blocks.1.attn.q_bias"),
     "tensor 'encoder.blocks.1.attn.q_bias' is missing (expected shape (128,)"),
    (lambda s: s.update({"encoder.blocks.0.mlp.fc1.weight": torch.zeros(128, 128)}),
     "tensor 'encoder.blocks.0.mlp.fc1.weight' has shape (128, 128), expected (256, 128)"),
    (lambda s: s.update({"encoder.blocks.0.gamma_1": torch.ones(128)}),
     "unexpected tensor(s) ['encoder.blocks.0.gamma_1']"),
    (lambda s: [s.pop(k) for k in [k for k in s if k.startswith("encoder.blocks.2.")]],
     "holds encoder blocks 0-1; expected blocks 0-2"),
    (lambda s: s.pop("encoder.norm.bias"), "tensor 'encoder.norm.bias' is missing"),
], ids=["missing", "shape", "unexpected", "no_unused_block", "no_final_norm"])
def test_a_file_that_is_not_the_encoder_is_refused_naming_the_tensor(tiny_state, tmp_path, edit, message):
  state = dict(tiny_state)
  edit(state)
  got = _library_error(_write(tmp_path / "bad.pt", state))
  assert got.startswith(str(tmp_path / "bad.pt") + ": ") and message in got, got


def test_the_tool_refuses_what_is_not_umt_l_in_one_line(parts, run, tiny_state, tmp_path, capsys):
  vision, llm_dir, _, _ = parts
  out = tmp_path / "out"

  def refused(vision_file, *extra):
    return _refused(capsys, "parts-to-orbax", "--vision", vision_file, "--llm", llm_dir, out, *extra)

  # The tiny encoder: 3 blocks stored, not UMT-L's 24.
  assert "holds encoder blocks 0-2; expected blocks 0-23 (the UMT encoder: width 1024" in refused(vision)
  # 24 blocks of width 64: the depth is UMT-L's, the width is not.
  narrow = ref.UMTEncoder(image_size=SIZE, depth=24, width=64, heads=1, mlp_dim=256)
  message = refused(_write(tmp_path / "narrow.pt", _released_encoder_state(narrow)))
  assert ("tensor 'encoder.patch_embed.proj.weight' has shape (64, 3, 1, 16, 16), expected (1024, 3, 1, 16, 16)"
          in message), message
  assert "holds no 'encoder.*' tensors" in refused(_write(tmp_path / "llm.pt", {"model.norm.weight": torch.ones(4)}))
  assert "not a state dict of named tensors" in refused(_write(tmp_path / "nested.pt", {"model": tiny_state}))
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
  assert "not a PyTorch checkpoint torch.load(weights_only=True) can read" in refused(tmp_path / "junk.pt")
  assert f"vision checkpoint '{tmp_path / 'missing.pt'}' does not exist" in refused(tmp_path / "missing.pt")
  assert "is neither a Hugging Face model directory (no config.json)" in _refused(
      capsys, "parts-to-orbax", "--vision", vision, "--llm", tmp_path, out)
  assert f"--llm '{run}' is not a plain Qwen2 directory (a run)" in _refused(
      capsys, "parts-to-orbax", "--vision", vision, "--llm", run, out)
  assert not out.exists()


class _RunsCodeWhenUnpickled:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))            # would create the marker file if unpickled


def test_pickled_code_in_the_file_is_refused_not_run(tmp_path):
  marker = tmp_path / "was_run"
  with open(tmp_path / "evil.pt", "wb") as f:
    pickle.dump({"encoder.patch_embed.proj.bias": _RunsCodeWhenUnpickled(str(marker))}, f, protocol=2)
  with pytest.raises(ValueError, match="not a PyTorch checkpoint torch.load"):
    released_parts.read_torch_state_dict(str(tmp_path / "evil.pt"))
  assert not os.path.exists(marker)


def test_the_tool_writes_the_run_and_refuses_to_overwrite(parts, tmp_path, capsys, monkeypatch):
  """The tool's own path to the output, with UMT-L swapped for the tiny tower the test file holds."""
  vision, llm_dir, _, _ = parts
  monkeypatch.setattr(released_parts, "umt_l", lambda image_size: _tiny_vit())
  assert convert("parts-to-orbax", "--vision", vision, "--llm", llm_dir, tmp_path / "init") == 0
  assert "(step 0, float32)" in capsys.readouterr().out
  assert run_dir.steps(str(tmp_path / "init")) == [0]
  assert "exists and is not empty (pass --overwrite" in _refused(
      capsys, "parts-to-orbax", "--vision", vision, "--llm", llm_dir, tmp_path / "init")
