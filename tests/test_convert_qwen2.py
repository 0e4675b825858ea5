"""HF Qwen2 checkpoints <-> hico_jax params: round trips are bit-identical, transformers reloads what we save
with the same logits, the layout matches torch's weights head by head, and malformed input fails with one
error that names the problem."""

import copy
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hico_jax.convert import qwen2_hf, safetensors_io
from hico_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE
from hico_jax.models import qwen2
from tests.hf_reference import make_hf_qwen2, rewrite_config

HEADS, KV_HEADS, HIDDEN = 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
THETA = {False: 1e6, True: 10000.0}       # untied and tied checkpoints use different thetas
SMALL_SHARD = 48 * 1024                   # bytes: splits the tiny model into several shards


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{tied: (directory, fp32 torch model)} for one untied and one tied random checkpoint."""
  out = {}
  for tied in (False, True):
    path = str(tmp_path_factory.mktemp(f"hf_tied{int(tied)}"))
    out[tied] = path, make_hf_qwen2(path, heads=HEADS, kv_heads=KV_HEADS, hidden=HIDDEN, theta=THETA[tied],
                                    tied=tied, seed=int(tied))
  return out


def _assert_tensors_bit_identical(expected: dict, actual: dict):
  assert sorted(actual) == sorted(expected)
  for name in expected:
    assert actual[name].dtype == expected[name].dtype, name
    assert actual[name].shape == expected[name].shape, name
    assert actual[name].tobytes() == expected[name].tobytes(), f"{name} differs"


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite_tensors(model_dir, edit):
  path = os.path.join(model_dir, SINGLE_FILE)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _write_sharded(src_dir, out_dir):
  """The checkpoint in `src_dir`, re-written by us in several shards, with its config.json."""
  config, params, dtype = qwen2_hf.load(src_dir)
  safetensors_io.write_checkpoint(qwen2_hf.params_to_tensors(params, config, dtype=np.dtype(dtype)), out_dir,
                                  max_shard_bytes=SMALL_SHARD)
  shutil.copy(os.path.join(src_dir, "config.json"), out_dir)
  return out_dir


# ------------------------------------------------------------------------------------ bit-identical round trips

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_to_jax_to_hf_round_trip_is_bit_identical_fp32(tmp_path, checkpoints, tied):
  src, _ = checkpoints[tied]
  config, params, dtype = qwen2_hf.load(src)
  assert dtype == "float32" and config.tie_word_embeddings == tied
  qwen2_hf.save(str(tmp_path / "out"), config, params, dtype=dtype)
  _assert_tensors_bit_identical(load_file(os.path.join(src, SINGLE_FILE)),
                                load_file(str(tmp_path / "out" / SINGLE_FILE)))


def test_bf16_checkpoint_round_trips_bit_identical_and_stays_bf16(tmp_path, checkpoints):
  src = str(tmp_path / "bf16")
  copy.deepcopy(checkpoints[False][1]).to(torch.bfloat16).save_pretrained(src)
  config, params, dtype = qwen2_hf.load(src)
  assert dtype == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}   # params_dtype None keeps the file's
  qwen2_hf.save(str(tmp_path / "out"), config, params, dtype=dtype)
  _assert_tensors_bit_identical(load_file(os.path.join(src, SINGLE_FILE)),
                                load_file(str(tmp_path / "out" / SINGLE_FILE)))


def test_sharded_write_has_index_and_reads_back_bit_identical(tmp_path, checkpoints):
  src, _ = checkpoints[False]
  out = _write_sharded(src, str(tmp_path / "sharded"))
  original = load_file(os.path.join(src, SINGLE_FILE))

  assert not os.path.exists(os.path.join(out, SINGLE_FILE))
  with open(os.path.join(out, INDEX_FILE)) as f:
    index = json.load(f)
  shard_files = sorted(set(index["weight_map"].values()))
  assert len(shard_files) > 2
  assert sorted(shard_files) == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in original.values())
  for file in shard_files:   # a shard passes the limit only when it holds one tensor that alone passes it
    shard = load_file(os.path.join(out, file))
    assert len(shard) == 1 or sum(a.nbytes for a in shard.values()) <= SMALL_SHARD, file
    assert all(index["weight_map"][name] == file for name in shard)

  reader = safetensors_io.CheckpointReader(out)
  _assert_tensors_bit_identical(original, {name: reader[name] for name in reader.keys()})
  _, params, _ = qwen2_hf.load(out)
  _, params_from_single, _ = qwen2_hf.load(src)
  jax.tree.map(np.testing.assert_array_equal, params, params_from_single)


def test_resaving_over_the_other_layout_leaves_no_stale_files(tmp_path, checkpoints):
  # Readers prefer one layout when both are present (ours the index, transformers the single file), so a
  # stale file of the other layout would make them read different weights.
  src, _ = checkpoints[False]
  out = _write_sharded(src, str(tmp_path / "out"))
  config, params, dtype = qwen2_hf.load(src)
  qwen2_hf.save(out, config, params, dtype=dtype)
  assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE]

  tensors = qwen2_hf.params_to_tensors(params, config)
  safetensors_io.write_checkpoint(tensors, out, max_shard_bytes=SMALL_SHARD)
  many = sorted(os.listdir(out))
  assert SINGLE_FILE not in many and INDEX_FILE in many
  safetensors_io.write_checkpoint(tensors, out, max_shard_bytes=4 * SMALL_SHARD)   # fewer shards this time
  with open(os.path.join(out, INDEX_FILE)) as f:
    shards = set(json.load(f)["weight_map"].values())
  assert sorted(os.listdir(out)) == sorted(shards | {"config.json", INDEX_FILE}) and len(shards) < len(many) - 2


# ------------------------------------------------------------------------------- transformers reads what we save

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_directory_loads_in_transformers_with_identical_logits(tmp_path, checkpoints, tied):
  src, hf_model = checkpoints[tied]
  config, params, dtype = qwen2_hf.load(src)
  out = str(tmp_path / "out")
  qwen2_hf.save(out, config, params, dtype=dtype)

  reloaded, info = transformers.Qwen2ForCausalLM.from_pretrained(
      out, local_files_only=True, attn_implementation="eager", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert reloaded.config.rope_parameters["rope_theta"] == THETA[tied]
  assert reloaded.config.rope_parameters["rope_type"] == "default"
  assert reloaded.config.tie_word_embeddings == tied
  if tied:
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

  ids = torch.tensor(np.random.default_rng(0).integers(0, config.vocab_size, (2, 37)))
  with torch.no_grad():
    expected = hf_model(input_ids=ids).logits.numpy()
    actual = reloaded.eval()(input_ids=ids).logits.numpy()
  np.testing.assert_allclose(actual, expected, atol=1e-6, rtol=0)


def test_sharded_directory_loads_in_transformers_with_identical_logits(tmp_path, checkpoints):
  src, hf_model = checkpoints[False]
  out = _write_sharded(src, str(tmp_path / "sharded"))
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, local_files_only=True,
                                                           attn_implementation="eager").eval()
  ids = torch.tensor(np.random.default_rng(1).integers(0, 320, (1, 29)))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(input_ids=ids).logits.numpy(), hf_model(input_ids=ids).logits.numpy(),
                               atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- layout against torch weights

def test_attention_kernels_are_heads_major_like_torch_rows(checkpoints):
  src, hf_model = checkpoints[False]
  _, params, _ = qwen2_hf.load(src)
  layer = 1                                        # not 0, so the stacking axis is checked too
  attn = params["layers"]["self_attn"]
  torch_attn = hf_model.model.layers[layer].self_attn
  q_weight = torch_attn.q_proj.weight.detach().numpy()      # (heads*head_dim, D), head h = rows h*hd:(h+1)*hd
  k_weight = torch_attn.k_proj.weight.detach().numpy()
  o_weight = torch_attn.o_proj.weight.detach().numpy()      # (D, heads*head_dim)

  q_kernel = attn["q_proj"]["kernel"][layer]                # (D, heads, head_dim)
  assert q_kernel.shape == (HIDDEN, HEADS, HEAD_DIM)
  np.testing.assert_array_equal(q_kernel.reshape(HIDDEN, -1), q_weight.T)
  np.testing.assert_array_equal(attn["k_proj"]["kernel"][layer].reshape(HIDDEN, -1), k_weight.T)
  for h in range(HEADS):
    np.testing.assert_array_equal(q_kernel[:, h, :], q_weight[h * HEAD_DIM:(h + 1) * HEAD_DIM].T)
    np.testing.assert_array_equal(attn["q_proj"]["bias"][layer][h],
                                  torch_attn.q_proj.bias.detach().numpy()[h * HEAD_DIM:(h + 1) * HEAD_DIM])
  for h in range(KV_HEADS):
    np.testing.assert_array_equal(attn["k_proj"]["kernel"][layer][:, h, :],
                                  k_weight[h * HEAD_DIM:(h + 1) * HEAD_DIM].T)

  o_kernel = attn["o_proj"]["kernel"][layer]                # (heads, head_dim, D)
  assert o_kernel.shape == (HEADS, HEAD_DIM, HIDDEN)
  np.testing.assert_array_equal(o_kernel.reshape(-1, HIDDEN), o_weight.T)
  for h in range(HEADS):
    np.testing.assert_array_equal(o_kernel[h], o_weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].T)

  mlp = hf_model.model.layers[layer].mlp
  np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"][layer],
                                mlp.down_proj.weight.detach().numpy().T)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_converted_params_have_exactly_the_models_tree_and_shapes(checkpoints, tied):
  config, params, _ = qwen2_hf.load(checkpoints[tied][0], dtype="float32", remat_policy="none")
  abstract = jax.eval_shape(qwen2.Qwen2ForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  expected = jax.tree.map(lambda x: x.shape, nn.unbox(abstract)["params"])
  assert jax.tree.map(lambda x: x.shape, params) == expected


# -------------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def bad(tmp_path, checkpoints):
  """A private copy of the untied checkpoint to break."""
  return _copy(checkpoints[False][0], tmp_path / "bad")


def _load_error(model_dir, error=ValueError):
  with pytest.raises(error) as caught:
    qwen2_hf.load(model_dir)
  assert caught.value.__context__ is None and caught.value.__cause__ is None   # one error, not a chain
  return str(caught.value)


def test_tied_checkpoint_that_also_stores_lm_head_loads_like_transformers(tmp_path, checkpoints):
  tied_dir = _copy(checkpoints[True][0], tmp_path / "tied_with_head")
  _rewrite_tensors(tied_dir, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  _, params, _ = qwen2_hf.load(tied_dir)
  _, expected, _ = qwen2_hf.load(checkpoints[True][0])
  assert "lm_head" not in params
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"], expected["embed_tokens"]["embedding"])


def test_missing_tensor_is_named(bad):
  _rewrite_tensors(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  message = _load_error(bad)
  assert "missing" in message and "model.layers.1.mlp.up_proj.weight" in message


def test_unexpected_tensor_is_named(bad):
  _rewrite_tensors(bad, lambda t: t.update({"model.layers.0.extra_proj.weight": np.zeros((4, 4), np.float32)}))
  message = _load_error(bad)
  assert "unexpected" in message and "model.layers.0.extra_proj.weight" in message


def test_misshaped_tensor_names_tensor_and_both_shapes(bad):
  name = "model.layers.0.mlp.gate_proj.weight"      # (intermediate, hidden) = (112, 64); store it transposed
  _rewrite_tensors(bad, lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))
  message = _load_error(bad)
  assert name in message and "(64, 112)" in message and "(112, 64)" in message


def test_all_tensor_problems_come_in_one_error(bad):
  def edit(t):
    t.pop("model.norm.weight")
    t["model.bogus"] = np.zeros(3, np.float32)
    t["model.layers.1.self_attn.k_proj.bias"] = np.zeros(5, np.float32)
  _rewrite_tensors(bad, edit)
  message = _load_error(bad)
  assert "model.norm.weight" in message and "model.bogus" in message
  assert "model.layers.1.self_attn.k_proj.bias" in message and "(5,)" in message and "(32,)" in message


def test_unknown_config_fields_are_named_in_one_warning_and_the_checkpoint_loads(bad, caplog):
  rewrite_config(bad, lambda c: c.update(foo_bar=1, baz=[2]))
  _, params, _ = qwen2_hf.load(bad)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "['baz', 'foo_bar']" in warnings[0], warnings
  assert params["embed_tokens"]["embedding"].shape == (320, 64)


# YaRN is implemented (tests/test_rope_scaling.py); these RoPE kinds are not.
SCALED = {"factor": 4.0}


@pytest.mark.parametrize("fields,named", [
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"use_sliding_window": True}, ["use_sliding_window"]),
    ({"rope_scaling": {"type": "dynamic", **SCALED}}, ["rope_scaling", "dynamic"]),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", **SCALED}}, ["rope_type", "linear"]),
    # transformers 5 reads the legacy key "type" inside rope_parameters as the rope type
    ({"rope_parameters": {"rope_theta": 1e6, "type": "llama3", **SCALED}}, ["rope_parameters", "llama3"]),
    ({"layer_types": ["full_attention", "sliding_attention"]}, ["layer_types", "sliding_attention"]),
], ids=["hidden_act", "sliding_window", "rope_scaling", "rope_type", "legacy_type_key",
        "layer_types"])
def test_unsupported_architecture_field_is_named(bad, fields, named):
  rewrite_config(bad, lambda c: c.update(fields))
  message = _load_error(bad)
  assert all(word in message for word in named), message


def test_missing_config_json_is_named(bad):
  os.remove(os.path.join(bad, "config.json"))
  message = _load_error(bad, FileNotFoundError)
  assert "config.json" in message and bad in message


def test_directory_without_safetensors_is_named(bad):
  os.remove(os.path.join(bad, SINGLE_FILE))
  message = _load_error(bad, FileNotFoundError)
  assert SINGLE_FILE in message and bad in message


def test_index_naming_a_missing_shard_is_named(tmp_path, checkpoints):
  out = _write_sharded(checkpoints[False][0], str(tmp_path / "sharded"))
  with open(os.path.join(out, INDEX_FILE)) as f:
    victim = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(out, victim))
  message = _load_error(out, FileNotFoundError)
  assert victim in message and INDEX_FILE in message
