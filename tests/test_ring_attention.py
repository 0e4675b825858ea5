"""Ring and all-gather attention against dense attention on 8 simulated devices (fp32).

Inputs are rank-coded: every value carries its original position, each output position is weighted
differently in the loss, and packed segments cross shard boundaries, so a block routed to the wrong device,
merged with the wrong weight, or whose gradient returns to the wrong owner cannot pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hico_jax import sharding
from hico_jax.data.pipeline import unzigzag, zigzag
from hico_jax.ops.attention import attention

MESHES = {
    "seq8": [("seq", 8)],
    "data2_seq4": [("data", 2), ("seq", 4)],
    "fsdp2_seq2_tensor2": [("fsdp", 2), ("seq", 2), ("tensor", 2)],
}
LENGTH = 64


def _segments(batch, length):
  """Row 0: three packed documents whose borders fall inside shards, then padding (0) at the end.
  Row 1: two documents."""
  rows = [[1] * 13 + [2] * 22 + [3] * 20 + [0] * 9, [5] * 40 + [6] * 24]
  return np.asarray(rows[:batch], np.int32)[:, :length]


def _inputs(batch, heads, kv_heads, head_dim, length=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  position = np.arange(length, dtype=np.float32)[None, :, None, None] / length
  q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
  v[..., 0] = position[..., 0] * 4.0  # the value's first channel is its original position
  weights = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  return q, k, v, _segments(batch, length), weights


def _loss_and_grads(q, k, v, seg, weights, slots=None, **kwargs):
  def loss(q, k, v):
    out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_slots=slots, kv_slots=slots, **kwargs)
    return jnp.sum(out * weights), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x) for x in (out, *grads)]


def _sharded(mesh_name, q, k, v, seg, weights, order, **kwargs):
  """Runs on the mesh, in zig-zag order if asked; returns out, dq, dk, dv in the original order."""
  mesh = sharding.make_mesh(MESHES[mesh_name])
  shards = mesh.shape["seq"]
  slots = None
  if order == "zigzag":
    q, k, v, seg, weights = (zigzag(x, shards) for x in (q, k, v, seg, weights))
    slots = np.broadcast_to(zigzag(np.arange(q.shape[1], dtype=np.int32)[None], shards), seg.shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    results = _loss_and_grads(q, k, v, seg, weights, slots, **kwargs)
  return [unzigzag(x, shards) if order == "zigzag" else x for x in results]


def _assert_close(got, want, names=("out", "dq", "dk", "dv")):
  for name, g, w in zip(names, got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=f"{name} differs from dense attention")


# (mesh, causal, order, query heads, kv heads): GQA ratios 7 and 1; heads divide tensor=2 where it is used.
RING_CASES = [
    ("seq8", True, "zigzag", 7, 1),
    ("seq8", False, "natural", 2, 2),
    ("data2_seq4", True, "natural", 7, 1),
    ("data2_seq4", False, "zigzag", 2, 2),
    ("fsdp2_seq2_tensor2", True, "zigzag", 14, 2),
    ("fsdp2_seq2_tensor2", True, "natural", 2, 2),
]


@pytest.mark.parametrize("mesh_name,causal,order,heads,kv_heads", RING_CASES)
def test_ring_matches_dense_outputs_and_grads_with_segments_crossing_shards(mesh_name, causal, order, heads,
                                                                             kv_heads):
  q, k, v, seg, weights = _inputs(2, heads, kv_heads, 8 if heads < 14 else 4)
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla", causal=causal)
  got = _sharded(mesh_name, q, k, v, seg, weights, order, impl="ring", causal=causal)
  _assert_close(got, want)


@pytest.mark.parametrize("mesh_name,order,heads,kv_heads", [
    ("seq8", "zigzag", 7, 1),
    ("fsdp2_seq2_tensor2", "natural", 2, 2),
])
def test_all_gather_matches_dense_outputs_and_grads(mesh_name, order, heads, kv_heads):
  q, k, v, seg, weights = _inputs(2, heads, kv_heads, 8, seed=1)
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  _assert_close(_sharded(mesh_name, q, k, v, seg, weights, order, impl="all_gather"), want)


def test_ring_replicates_a_batch_the_data_axis_does_not_divide():
  q, k, v, seg, weights = _inputs(1, 2, 1, 8, seed=2)  # batch 1 on data=2
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  _assert_close(_sharded("data2_seq4", q, k, v, seg, weights, "zigzag", impl="ring"), want)


def test_ring_rejects_a_length_the_sequence_axis_does_not_divide():
  q, k, v, seg, weights = _inputs(2, 2, 2, 8, length=60)
  with pytest.raises(ValueError, match="must divide the query length 60"):
    _sharded("seq8", q, k, v, seg[:, :60], weights, "natural", impl="ring")


def _numpy_attention(q, k, v, seg, causal=True):
  """Independent transcription of the rule: a query sees a key iff same segment id and key slot <= query
  slot; GQA by integer division of the head index."""
  batch, length, heads, head_dim = q.shape
  groups = heads // k.shape[2]
  out = np.zeros_like(q, dtype=np.float64)
  for b in range(batch):
    for n in range(heads):
      logits = q[b, :, n] @ k[b, :, n // groups].T / np.sqrt(head_dim)
      mask = seg[b][:, None] == seg[b][None, :]
      if causal:
        mask &= np.tril(np.ones((length, length), bool))
      logits = np.where(mask, logits, -np.inf)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, n] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, n // groups]
  return out


def test_negative_segment_ids_see_only_themselves_in_dense_and_ring():
  q, k, v, seg, weights = _inputs(2, 2, 1, 8, seed=3)
  # Visual dropout: each dropped token gets its own negative id; kept ones keep their document id.
  dropped = np.zeros_like(seg, bool)
  dropped[:, 5:40:3] = True
  seg = np.where(dropped, -1 - np.arange(LENGTH)[None, :], seg).astype(np.int32)
  reference = _numpy_attention(q, k, v, seg)
  np.testing.assert_allclose(reference[dropped], np.repeat(v[dropped], 2, axis=1), atol=1e-6)
  dense = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  np.testing.assert_allclose(dense[0], reference, atol=1e-5)
  _assert_close(_sharded("seq8", q, k, v, seg, weights, "zigzag", impl="ring"), dense)


def _compiled_forward_text(mesh_config, impl, batch=2):
  q, k, v, seg, _ = _inputs(batch, 2, 1, 8)
  mesh = sharding.make_mesh(mesh_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    fn = jax.jit(lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl))
    return fn.lower(q, k, v).compile().as_text()


def test_ring_forward_permutes_kv_and_never_gathers_it():
  text = _compiled_forward_text(MESHES["seq8"], "ring")
  assert "collective-permute" in text
  assert "all-gather" not in text
  assert "conditional" in text  # causal blocks that see nothing are skipped
  assert "all-gather" in _compiled_forward_text(MESHES["seq8"], "all_gather")


def test_ring_without_a_sequence_axis_is_one_local_block_and_matches_dense():
  # Two query heads do not divide tensor=4, so heads are replicated as well.
  mesh_config = [("data", 2), ("tensor", 4)]
  text = _compiled_forward_text(mesh_config, "ring")
  assert "collective-permute" not in text and "all-gather" not in text
  q, k, v, seg, weights = _inputs(2, 2, 1, 8, seed=4)
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  with jax.set_mesh(sharding.make_mesh(mesh_config)), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    _assert_close(_loss_and_grads(q, k, v, seg, weights, impl="ring"), want)


def test_dense_attention_with_zigzag_slots_matches_natural_order():
  q, k, v, seg, weights = _inputs(2, 7, 1, 8, seed=5)
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  slots = np.broadcast_to(zigzag(np.arange(LENGTH, dtype=np.int32)[None], 4), seg.shape)
  got = _loss_and_grads(*(zigzag(x, 4) for x in (q, k, v, seg, weights)), slots, impl="xla")
  _assert_close([unzigzag(x, 4) for x in got], want)


@pytest.fixture
def xla_fallback_poisoned(monkeypatch):
  """Splash blocks that are neither fully visible nor a diagonal fall back to the xla kernel; poisoning it
  with NaN proves the splash kernels computed everything."""
  from hico_jax.ops import attention_blocks  # pylint: disable=import-outside-toplevel
  forward, backward = attention_blocks._xla_forward, attention_blocks._xla_backward  # pylint: disable=protected-access
  poison = lambda fn: lambda *a: jax.tree.map(lambda x: x * jnp.nan, fn(*a))
  monkeypatch.setattr(attention_blocks, "_xla_forward", poison(forward))
  monkeypatch.setattr(attention_blocks, "_xla_backward", poison(backward))


def _splash_case(impl):
  """Splash in interpret mode (CPU): 128-token blocks, so a 512-token row on seq=2 in zig-zag order."""
  q, k, v, _, weights = _inputs(1, 2, 1, 8, length=512, seed=6)
  seg = np.asarray([[1] * 200 + [2] * 250 + [0] * 62], np.int32)
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  mesh_config = [("data", 4), ("seq", 2)]  # batch 1 on data=4: replicated
  mesh = sharding.make_mesh(mesh_config)
  slots = np.broadcast_to(zigzag(np.arange(512, dtype=np.int32)[None], 2), seg.shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    got = _loss_and_grads(*(zigzag(x, 2) for x in (q, k, v, seg, weights)), slots, impl=impl,
                          block_impl="splash")
  _assert_close([unzigzag(x, 2) for x in got], want)


@pytest.mark.slow   # ~14 s on 2 cores (Pallas interpret mode); the plain splash block test above stays
@pytest.mark.usefixtures("xla_fallback_poisoned")
def test_ring_with_splash_blocks_matches_dense_in_interpret_mode():
  _splash_case("ring")


def test_ring_with_splash_blocks_and_no_sequence_axis_is_the_plain_splash_kernel():
  q, k, v, _, weights = _inputs(1, 2, 1, 8, length=128, seed=7)
  seg = np.asarray([[1] * 50 + [-3] + [2] * 60 + [0] * 17], np.int32)
  want = _loss_and_grads(q, k, v, seg, weights, impl="xla")
  with jax.set_mesh(sharding.make_mesh([("data", 8)])), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    _assert_close(_loss_and_grads(q, k, v, seg, weights, impl="ring", block_impl="splash"), want)


@pytest.mark.slow
@pytest.mark.usefixtures("xla_fallback_poisoned")
def test_all_gather_with_splash_blocks_matches_dense_in_interpret_mode():
  _splash_case("all_gather")
