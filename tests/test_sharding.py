"""The mesh and the logical-axis rules: mesh sizes from config, sharded forward == unsharded forward, and the
7B sharding report (no large unsharded parameter may slip in)."""

import math
import re

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from hico_jax import presets, sharding
from hico_jax.models import qwen2


# ----------------------------------------------------------------------------------------------------------
# make_mesh / mesh_shape

def test_mesh_with_one_wildcard_takes_the_remaining_devices():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", -1), ("tensor", 2)])
  assert mesh.axis_names == ("data", "fsdp", "seq", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "seq": 1, "tensor": 2}
  # Auto, not Explicit: linen's with_logical_constraint fails on Explicit axes.
  assert tuple(mesh.axis_types) == (AxisType.Auto,) * 4
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_mesh_on_a_subset_of_devices_and_axes_left_out_have_size_one():
  mesh = sharding.make_mesh([("tensor", -1)], devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "seq": 1, "tensor": 4}
  assert sharding.mesh_shape([("seq", 8)], 8) == {"data": 1, "fsdp": 1, "seq": 8, "tensor": 1}


def test_mesh_with_two_wildcards_is_rejected_naming_both_axes():
  with pytest.raises(ValueError, match=r"two -1 sizes \('fsdp' and 'tensor'\)"):
    sharding.mesh_shape([("data", 2), ("fsdp", -1), ("tensor", -1)], 8)


def test_mesh_naming_an_axis_twice_is_rejected_naming_it():
  with pytest.raises(ValueError, match=r"'fsdp' appears more than once"):
    sharding.mesh_shape([("fsdp", 2), ("fsdp", 4)], 8)


def test_mesh_with_unknown_axis_name_is_rejected_naming_it():
  with pytest.raises(ValueError, match=r"unknown mesh axis 'model'.*'data', 'fsdp', 'seq', 'tensor'"):
    sharding.mesh_shape([("data", 2), ("model", 4)], 8)


def test_mesh_whose_fixed_sizes_do_not_divide_the_devices_is_rejected_with_the_numbers():
  with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 8 devices"):
    sharding.mesh_shape([("data", 3), ("fsdp", -1)], 8)


def test_mesh_without_wildcard_whose_product_differs_from_the_devices_is_rejected_with_the_numbers():
  with pytest.raises(ValueError, match=r"has 4 devices in all, but 8 are available"):
    sharding.mesh_shape([("data", 2), ("tensor", 2)], 8)
  with pytest.raises(ValueError, match=r"has 16 devices in all, but 8 are available"):
    sharding.make_mesh([("fsdp", 4), ("tensor", 4)])


def test_ambient_axes_follow_the_rules_on_the_mesh_in_use_and_drop_what_does_not_divide():
  assert sharding.ambient_axes("act_clips") == ()                         # no mesh set
  with jax.set_mesh(sharding.make_mesh([("data", 2), ("seq", 2), ("tensor", 2)])):
    assert sharding.ambient_axes("act_clips") == ("data", "fsdp", "seq")  # the rule, in the rule's order
    assert sharding.ambient_axes("act_clips", divides=6) == ("data", "fsdp")
    assert sharding.ambient_axes("act_heads") == ("tensor",)
    assert sharding.ambient_axes("act_emb") == () and sharding.ambient_axes(None) == ()
    assert sharding.ambient_size(("data", "seq", "tensor")) == 8 and sharding.ambient_size(()) == 1
    with nn.logical_axis_rules((("act_clips", "tensor"),)):             # rules in force win over the defaults
      assert sharding.ambient_axes("act_clips") == ("tensor",)


def test_axis_size_of_a_logical_name_is_the_product_of_its_mesh_axes():
  """Sizes by logical name, against a hand count on (data 2, seq 2, tensor 2): the rows a batch splits over,
  the tokens of a row, the devices that share the clips, the embedding's shards, a replicated name."""
  mesh = sharding.make_mesh([("data", 2), ("seq", 2), ("tensor", 2)])
  sizes = {name: sharding.axis_size(mesh, name) for name in ("act_batch", "act_len", "act_clips", "embed", "heads",
                                                               "act_emb")}
  assert sizes == {"act_batch": 2, "act_len": 2, "act_clips": 4, "embed": 2, "heads": 2, "act_emb": 1}


def test_mesh_with_non_positive_size_is_rejected_naming_it():
  with pytest.raises(ValueError, match=r"'fsdp' has size 0"):
    sharding.mesh_shape([("fsdp", 0), ("tensor", -1)], 8)


# ----------------------------------------------------------------------------------------------------------
# Sharded forward == unsharded forward

_TINY = qwen2.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
                          dtype="float32", param_dtype="float32", remat_policy="none")


@pytest.fixture(scope="module")
def tiny_model_params_and_batch():
  model = qwen2.Qwen2ForCausalLM(_TINY)
  rng = np.random.default_rng(0)
  batch, length = 4, 64
  ids = rng.integers(0, _TINY.vocab_size, (batch, length)).astype(np.int32)
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[1, 40:] = 0                                     # row 1 right-padded
  segment_ids[2, 25:] = 2                                     # row 2 packs two samples
  params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(ids)))["params"]
  # Init leaves biases at 0 and norm scales at 1; randomise every leaf so a dropped or mis-sharded one shows.
  leaves, treedef = jax.tree.flatten(params)
  leaves = [np.asarray(x) + rng.normal(0.0, 0.05, x.shape).astype(np.float32) for x in leaves]
  params = jax.tree.unflatten(treedef, leaves)
  return model, params, ids, segment_ids


@pytest.mark.parametrize("mesh_config", [
    [("data", 2), ("fsdp", 2), ("tensor", 2)],
    [("fsdp", 4), ("tensor", 2)],
], ids=["data2_fsdp2_tensor2", "fsdp4_tensor2"])
def test_sharded_forward_matches_single_device_forward_with_padded_and_packed_rows(
    tiny_model_params_and_batch, mesh_config):
  model, params, ids, segment_ids = tiny_model_params_and_batch
  device = jax.devices()[0]
  expected, _ = jax.jit(model.apply)({"params": jax.device_put(params, device)},
                                     jax.device_put(ids, device), segment_ids=jax.device_put(segment_ids, device))
  expected = np.asarray(expected)

  mesh = sharding.make_mesh(mesh_config)
  size = dict(mesh.shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids))
    shardings = sharding.logical_to_sharding(abstract, mesh)["params"]
    sharded_params = jax.device_put(params, shardings)
    tokens = sharding.named_sharding(mesh, "act_batch", "act_len")
    logits, _ = jax.jit(model.apply)({"params": sharded_params}, jax.device_put(ids, tokens),
                                     segment_ids=jax.device_put(segment_ids, tokens))

  # The params really are split: q_proj (layers, D, heads, head_dim) over fsdp on D and tensor on heads;
  # the embedding (vocab, D) over tensor on vocab and fsdp on D.
  fsdp, tensor = size["fsdp"] * size["seq"], size["tensor"]
  q_kernel = sharded_params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.shape == (2, 64, 4, 16)
  assert q_kernel.addressable_shards[0].data.shape == (2, 64 // fsdp, 4 // tensor, 16)
  embedding = sharded_params["embed_tokens"]["embedding"]
  assert embedding.addressable_shards[0].data.shape == (320 // tensor, 64 // fsdp)
  down = sharded_params["layers"]["mlp"]["down_proj"]["kernel"]
  assert down.addressable_shards[0].data.shape == (2, 128 // tensor, 64 // fsdp)
  # The logits come back split over the batch (data*fsdp) too, not gathered onto one device.
  assert logits.addressable_shards[0].data.shape[0] == 4 // (size["data"] * size["fsdp"])

  diff = np.max(np.abs(np.asarray(logits) - expected))
  assert diff <= 1e-5, f"sharded logits differ from single-device logits by {diff}"


# ----------------------------------------------------------------------------------------------------------
# The 7B sharding report

def _qwen2_7b_param_count(c) -> int:
  """By hand from the preset's sizes: embedding, untied head, per layer q/k/v (+bias), o, 3 MLP mats and two
  norms, and the final norm."""
  d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
  q, kv = c.num_heads * hd, c.num_kv_heads * hd
  per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
  head = 0 if c.tie_word_embeddings else d * v
  return v * d + head + c.num_layers * per_layer + d


def test_qwen2_7b_on_fsdp8_is_sharded_except_small_vectors_and_report_counts_every_param(capsys):
  config = presets.llm("qwen2_7b")
  assert not config.tie_word_embeddings
  model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config.from_dict(dict(config)))
  mesh = sharding.make_mesh([("fsdp", 8)])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
    shardings = sharding.logical_to_sharding(abstract, mesh)
  report, unsharded = sharding.sharding_report(nn.unbox(abstract), shardings)
  with capsys.disabled():
    print("\n" + report)

  assert unsharded <= 0.02, f"{100 * unsharded:.2f}% of the 7B parameter bytes are replicated on every device"
  embed_rows = [r for r in report.splitlines() if r.startswith("params/embed_tokens/embedding")]
  assert len(embed_rows) == 1, report
  assert "(152064, 3584)" in embed_rows[0]
  assert re.search(r"P\('tensor', \('fsdp', 'seq'\)\)", embed_rows[0]), embed_rows[0]
  # 152064*3584 fp32 bytes split 8 ways.
  assert f"{152064 * 3584 * 4 / 8 / 2**20:10.2f} MiB" in embed_rows[0]

  expected_count = _qwen2_7b_param_count(config)
  assert 7.0e9 < expected_count < 7.7e9                      # "7B": 7.6e9 with the untied head
  leaves = jax.tree.leaves(nn.unbox(abstract))
  assert sum(math.prod(x.shape) for x in leaves) == expected_count
  total_gib = float(re.search(r"^total ([0-9.]+) GiB", report.splitlines()[-1]).group(1))
  assert total_gib == pytest.approx(expected_count * 4 / 2**30, abs=1e-3)
  # One row per parameter plus the total line.
  assert len(report.splitlines()) == len(leaves) + 1
