"""The clip path (videochat_flash.md §1-§3): UMT ViT, position tables, token merge and projector, checked
against the independent PyTorch reference (tests/torch_reference) loaded from our own exported
safetensors, against torch's bicubic, and against a plain numpy transcription of the merge.

Small widths (128, 2 heads of 64, 2 blocks, MLP 256) at the real resolutions 224 and 448, fp32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from hico_jax import presets
from hico_jax.convert import videochat_flash
from hico_jax.convert.safetensors_io import SINGLE_FILE
from hico_jax.models import position_tables, tome, vit
from hico_jax.models.hico import HiCo, HiCoConfig, init_inputs
from hico_jax.models.vit import UMTViT
from tests.torch_reference import videochat_flash as ref

TINY_VIT = dict(width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32")
HEADS = TINY_VIT["num_heads"]


# ------------------------------------------------------------------------------- numpy transcription of §2

def numpy_merge_step(x, sizes, members, r, heads):
  """One bipartite merge of one sequence, written from the spec: x (P, C) float64, sizes (P,), members
  (P, P_in) counts of the original tokens each current token holds. Returns the three, merged."""
  p, c = x.shape
  metric = x.reshape(p, heads, c // heads).mean(axis=1)
  metric = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = np.arange(0, p, 2), np.arange(1, p, 2)
  scores = metric[a] @ metric[b].T
  best, partner = scores.max(axis=-1), scores.argmax(axis=-1)       # argmax: first (lowest) index on ties
  ranked = np.argsort(-best, kind="stable")                         # descending, lower index first on ties
  src, kept = ranked[:r], ranked[r:]
  total, new_sizes, new_members = x[b] * sizes[b, None], sizes[b].copy(), members[b].copy()
  np.add.at(total, partner[src], x[a[src]] * sizes[a[src], None])
  np.add.at(new_sizes, partner[src], sizes[a[src]])
  np.add.at(new_members, partner[src], members[a[src]])
  return (np.concatenate([x[a[kept]], total / new_sizes[:, None]]),
          np.concatenate([sizes[a[kept]], new_sizes]),
          np.concatenate([members[a[kept]], new_members]))


def numpy_merge(x, target, heads):
  """(P, C) -> merged (target, C), sizes (target,), members (target, P), with the spec's r schedule."""
  x = np.asarray(x, np.float64)
  p = x.shape[0]
  sizes, members = np.ones(p), np.eye(p)
  while p != target:
    r = p - target if p - target <= p // 2 else p // 2
    x, sizes, members = numpy_merge_step(x, sizes, members, r, heads)
    p -= r
  return x, sizes, members


_jit_merge = jax.jit(tome.merge_tokens, static_argnums=(1, 2, 3))


# ------------------------------------------------------------------------------- position tables (§1)

def test_224_position_table_is_the_1d_sinusoid_over_t_h_w():
  positions, dims = np.arange(784, dtype=np.float64)[:, None], np.arange(1024)
  angles = positions / 10000.0 ** (2 * (dims // 2) / 1024)
  expected = np.where(dims % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)
  np.testing.assert_array_equal(position_tables.umt_position_table(224, 4, 1024), expected)
  np.testing.assert_array_equal(position_tables.umt_position_table(224, 1, 1024), expected[:196])


def test_448_position_table_is_torch_bicubic_of_the_224_table_and_image_table_is_frame_0():
  base = torch.from_numpy(position_tables.umt_position_table(224, 4, 1024))          # (784, 1024) float32
  nchw = base.reshape(4, 14, 14, 1024).permute(0, 3, 1, 2)
  resized = F.interpolate(nchw, size=(28, 28), mode="bicubic", align_corners=False)
  expected = resized.permute(0, 2, 3, 1).reshape(3136, 1024).numpy()
  video = position_tables.umt_position_table(448, 4, 1024)
  assert video.shape == (3136, 1024) and video.dtype == np.float32
  np.testing.assert_allclose(video, expected, rtol=0, atol=1e-6)
  image = position_tables.umt_position_table(448, 1, 1024)
  assert image.shape == (784, 1024)
  np.testing.assert_array_equal(image, video[:784])


# ------------------------------------------------------------------------------- merge (§2)

@pytest.mark.parametrize("tokens,target,steps", [
    (784, 64, [392, 196, 98, 34]),                    # UMT 224 clip; 448 image
    (3136, 64, [1568, 784, 392, 196, 98, 34]),        # UMT 448 clip
    (196, 64, [98, 34]),                              # UMT 224 image
    (1024, 64, [512, 256, 128, 64]),                  # InternVideo2 clip
    (256, 64, [128, 64]),                             # InternVideo2 image
])
def test_merge_schedule_matches_spec_table(tokens, target, steps):
  assert tome.merge_schedule(tokens, target) == steps


@pytest.mark.parametrize("tokens", [784, 3136, 196])
def test_merge_reaches_64_tokens_and_conserves_size_weighted_sum(tokens):
  x = jax.random.normal(jax.random.key(tokens), (2, tokens, 128))
  out, sizes = _jit_merge(x, 64, HEADS, True)
  assert out.shape == (2, 64, 128) and sizes.shape == (2, 64)
  np.testing.assert_array_equal(np.asarray(sizes).sum(axis=1), [tokens, tokens])
  weighted = np.einsum("np,npc->nc", np.asarray(sizes, np.float64), np.asarray(out, np.float64))
  total = np.asarray(x, np.float64).sum(axis=1)
  np.testing.assert_allclose(weighted, total, rtol=1e-4, atol=1e-4 * np.abs(total).max())


def test_planted_duplicate_pairs_merge_with_each_other():
  rng = np.random.default_rng(0)
  p, c = 40, 128
  x = rng.standard_normal((1, p, c)).astype(np.float32)     # 128-d Gaussians: cosines ~ +-0.1, no ties
  pairs = {3: 11, 7: 2, 12: 12, 18: 0}                       # A index -> B index (positions 2a, 2b + 1)
  for a, b in pairs.items():
    x[0, 2 * b + 1] = x[0, 2 * a]
  out, sizes = tome.merge_tokens(jnp.asarray(x), p - len(pairs), HEADS, return_sizes=True)
  out, sizes = np.asarray(out[0]), np.asarray(sizes[0])
  kept = p // 2 - len(pairs)                                 # unmerged A tokens come first
  expected_sizes = np.ones(p // 2)
  expected_sizes[list(pairs.values())] = 2
  np.testing.assert_array_equal(sizes[kept:], expected_sizes)
  np.testing.assert_array_equal(sizes[:kept], np.ones(kept))
  np.testing.assert_allclose(out[kept:], x[0, 1::2], rtol=0, atol=1e-6)   # B order kept; pairs = their value
  kept_a = {int(np.flatnonzero((x[0, ::2] == row).all(axis=1))[0]) for row in out[:kept]}
  assert kept_a == set(range(p // 2)) - set(pairs)


def test_merge_step_output_order_and_weights_match_numpy():
  """unmerged A by descending score, then B in original order, size-weighted: one step, uneven sizes."""
  rng = np.random.default_rng(1)
  n, p, c, r = 2, 50, 128, 17
  x = rng.standard_normal((n, p, c)).astype(np.float32)
  sizes = rng.integers(1, 6, (n, p)).astype(np.float32)
  out, out_sizes = tome.merge_step(jnp.asarray(x), jnp.asarray(sizes), r, HEADS)
  for i in range(n):
    expected, expected_sizes, _ = numpy_merge_step(x[i].astype(np.float64), sizes[i].astype(np.float64),
                                                   np.eye(p), r, HEADS)
    np.testing.assert_array_equal(out_sizes[i], expected_sizes)
    np.testing.assert_allclose(out[i], expected, rtol=0, atol=1e-5)
    # the unmerged A tokens are copied bit for bit, in the numpy order
    np.testing.assert_array_equal(out[i, :p // 2 - r], expected[:p // 2 - r].astype(np.float32))


@pytest.mark.parametrize("tokens", [784, 3136])
def test_multistep_merge_matches_numpy_and_torch_reference(tokens):
  x = np.array(jax.random.normal(jax.random.key(7 + tokens), (2, tokens, 128)))   # writable, for torch
  out, sizes = _jit_merge(jnp.asarray(x), 64, HEADS, True)
  torch_out, torch_sizes = ref.merge_tokens_with_sizes(torch.from_numpy(x), 64, heads=HEADS)
  np.testing.assert_allclose(out, torch_out.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(sizes, torch_sizes[..., 0].numpy())
  for i in range(2):
    expected, expected_sizes, members = numpy_merge(x[i], 64, HEADS)
    np.testing.assert_array_equal(sizes[i], expected_sizes)
    np.testing.assert_allclose(out[i], expected, rtol=0, atol=1e-5)
    # size-weighted averaging over steps = the plain mean of the original tokens each output holds
    np.testing.assert_allclose(out[i], members @ x[i] / expected_sizes[:, None], rtol=0, atol=1e-5)


def test_merge_gradient_is_the_weighted_average_with_fixed_assignment():
  """The metric carries no gradient: d out_j / d x_i = [i in group j] / size_j, exactly."""
  x = np.asarray(jax.random.normal(jax.random.key(3), (1, 784, 128)))
  weights = np.asarray(jax.random.normal(jax.random.key(4), (1, 64, 128)))
  grad = jax.jit(jax.grad(lambda v: jnp.sum(tome.merge_tokens(v, 64, HEADS) * weights)))(jnp.asarray(x))
  grad = np.asarray(grad[0])
  assert np.isfinite(grad).all() and np.abs(grad).min() > 0
  _, sizes, members = numpy_merge(x[0], 64, HEADS)
  expected = (members / sizes[:, None]).T @ weights[0]                # (784, 128)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def test_exact_ties_pick_the_lowest_index_partner_and_rank_lower_a_first():
  """tome.py's tie rule. Cosine ignores scale, so scaled basis vectors give bit-exact equal scores while
  the scales show which token went where. A = positions 0, 2, 4, 6; B = 1, 3, 5, 7."""
  e = np.eye(8, dtype=np.float32)
  x = np.stack([e[3],          # A0: score 0 with every B
                e[0],          # B0
                3 * e[0],      # A1: ties B0 and B1 (score 1) -> B0, the lower index
                4 * e[0],      # B1
                5 * e[1],      # A2: score 1 with B2
                e[1],          # B2
                7 * e[2],      # A3: score 1 with B3
                e[2]])[None]   # B3
  # A1, A2, A3 tie at score 1: the stable rank merges A1 and A2 (r = 2) and keeps A3, then A0 (score 0).
  out, sizes = tome.merge_tokens(jnp.asarray(x), 6, num_heads=1, return_sizes=True)
  expected = np.stack([7 * e[2], e[3], 2 * e[0], 4 * e[0], 3 * e[1], e[2]])
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(sizes[0], [1, 1, 2, 1, 2, 1])
  torch_out = ref.merge_tokens(torch.from_numpy(x), 6, heads=1)      # the reference sorts stably too
  np.testing.assert_array_equal(out[0], torch_out[0].numpy())


# ------------------------------------------------------------------------------- ViT + merge + projector vs torch

@pytest.fixture(scope="module", params=[224, 448], ids=lambda s: f"{s}px")
def exported(request, tmp_path_factory):
  """(config, perturbed params, torch ClipEncoder loaded from our safetensors) at one resolution."""
  image_size = request.param
  cfg = HiCoConfig.from_dict({"vit": dict(image_size=image_size, **TINY_VIT),
                              "llm": dict(presets.llm("tiny", dtype="float32", vocab_size=300))})
  params = nn.unbox(HiCo(cfg).init(jax.random.key(0), *init_inputs(cfg)))["params"]
  rng = np.random.default_rng(image_size)
  # Noise on every param, so zero biases (q, v, patch) and unit norms cannot hide a layout error.
  params = jax.tree.map(lambda p: (np.asarray(p) + 0.1 * rng.standard_normal(p.shape)).astype(np.float32), params)
  model_dir = str(tmp_path_factory.mktemp(f"videochat_flash_{image_size}"))
  videochat_flash.save(model_dir, cfg, params)
  torch_model = ref.ClipEncoder(image_size=image_size, width=128, depth=2, heads=2, mlp_dim=256,
                                hidden=cfg.llm.hidden_size, attention="eager")
  ref.load_official(torch_model.encoder, torch_model.projector, load_file(f"{model_dir}/{SINGLE_FILE}"),
                    allow_other_keys=True)
  return cfg, params, torch_model.eval()


def _frames(shape, seed):
  """Normalised frames (..., T, S, S, 3) and the same as torch (B, T, 3, S, S)."""
  frames = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return frames, torch.from_numpy(np.moveaxis(frames.reshape(-1, *shape[-4:]), -1, -3).copy())


@pytest.mark.parametrize("num_frames", [4, 1], ids=["clip", "image"])
def test_vit_matches_torch_umt_encoder_loaded_from_our_safetensors(exported, num_frames):
  cfg, params, torch_model = exported
  size = cfg.vit.image_size
  frames, torch_frames = _frames((2 if num_frames == 1 else 1, num_frames, size, size, 3), seed=num_frames)
  ours = jax.jit(UMTViT(cfg.vit).apply)({"params": params["visual"]["vision_tower"]}, frames)
  with torch.no_grad():
    expected = torch_model.encoder(torch_frames).numpy()
  assert ours.shape == expected.shape == (frames.shape[0], num_frames * (size // 16) ** 2, 128)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_encode_video_matches_torch_clip_encoder_loaded_from_our_safetensors(exported):
  """ViT -> merge to 64 -> projector for two 4-frame clips, in time order. Merging is discrete, but
  random inputs have no near-ties, so both pick the same tokens."""
  cfg, params, torch_model = exported
  size = cfg.vit.image_size
  video, torch_video = _frames((1, 1, 8, size, size, 3), seed=8)
  ours = jax.jit(lambda v: HiCo(cfg).apply({"params": params}, v, method=HiCo.encode_video))(video)
  with torch.no_grad():
    expected = torch_model(torch_video).numpy()
  assert ours.shape == expected.shape == (1, 128, cfg.llm.hidden_size)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_exact_gelu_is_torch_gelu_with_erf_in_float32_and_bfloat16():
  from hico_jax.models.layers import exact_gelu
  x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(0, 3, 4000)]).astype(np.float32)
  expected = F.gelu(torch.from_numpy(x).double()).numpy()           # torch's default: the erf form
  np.testing.assert_allclose(np.asarray(exact_gelu(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)
  x_bf16 = torch.from_numpy(x).to(torch.bfloat16)
  ours = np.asarray(exact_gelu(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
  # Both compute in float32 and round once to bf16: at most one bf16 step apart (the two erf approximations
  # can land on either side of a rounding boundary).
  np.testing.assert_allclose(ours, F.gelu(x_bf16).float().numpy(), rtol=2**-7, atol=2e-5)


def test_unrolled_blocks_compute_the_scanned_blocks_output_and_gradients():
  """block_loop only changes how XLA sees the blocks: one loop, or straight-line code without the loop's
  stacks of saved activations, whose remat then stops XLA from merging each block's recompute with its
  forward (prevent_cse, optimisation barriers). With remat, as training runs it."""
  base = vit.ViTConfig(image_size=32, patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=64, dtype="float32",
                       remat_policy="attn")
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.normal(size=(2, 4, 32, 32, 3)), jnp.float32)
  # A random readout: the tower ends in a LayerNorm, so a sum of squares would be constant.
  readout = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)     # (clips, 4·2·2 tokens, width)
  results = {}
  for loop in ("scan", "unrolled", "auto"):
    model = vit.UMTViT(dataclasses.replace(base, block_loop=loop))
    params = model.init(jax.random.key(0), frames)
    step = jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply(p, frames) * readout)))
    lowered = step.lower(params)
    text = lowered.as_text()
    results[loop] = (text.count("stablehlo.while"), text.count("optimization_barrier"),
                     *(lowered.compile()(params) if loop != "auto" else ()))
  assert results["scan"][:2] == results["auto"][:2] and results["scan"][0] > 0 and results["scan"][1] == 0
  assert results["unrolled"][0] == 0 and results["unrolled"][1] > 0
  np.testing.assert_allclose(results["unrolled"][2], results["scan"][2], rtol=1e-6)
  assert jax.tree.structure(results["unrolled"][3]) == jax.tree.structure(results["scan"][3])
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(results["unrolled"][3]),
                               jax.tree.leaves(results["scan"][3])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))   # fp32 sums


def test_training_unrolls_the_vision_blocks_on_gpus_only_unless_told():
  assert vit.training_block_loop("auto", "gpu") == "unrolled"
  assert vit.training_block_loop("auto", "cpu") == vit.training_block_loop("auto", "tpu") == "scan"
  assert vit.training_block_loop("scan", "gpu") == "scan" and vit.training_block_loop("unrolled", "cpu") == "unrolled"
