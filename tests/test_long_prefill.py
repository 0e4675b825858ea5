"""The long-prompt prefill: the chunked online-softmax kernel against the dense one; cached generation through
the new prefill (the prompt attending to itself, rows moved to right padding, the MLP in token chunks) against
greedy decoding that re-runs the whole sequence each step, with and without visual dropout, for padded batches;
and the compiled prefill's memory growing linearly with the prompt, where the dense kernel's grows as L².
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hico_jax import presets
from hico_jax.infer import generate as gen
from hico_jax.models import qwen2, visual_dropout as vd
from hico_jax.ops import attention as attention_ops, chunked_attention
from tests.greedy_reference import rerun_greedy

VOCAB = 320
CARD = vd.VisualDropoutConfig(type="uniform0_attention", layers=(1, 2), ratios=(1.0, 0.75, 0.25))


def _dense_reference(q, k, v, q_seg, kv_seg, causal):
  """Attention written out in numpy float64: softmax over visible keys, queries the last T keys."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  k = np.repeat(k, n // kh, axis=2)
  v = np.repeat(v, n // kh, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  visible = np.ones((b, t, s), bool)
  if causal:
    visible &= np.arange(s)[None, None, :] <= (s - t + np.arange(t))[None, :, None]
  if q_seg is not None:
    visible &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
  logits = np.where(visible[:, None], logits, -np.inf)
  row_max = logits.max(-1, keepdims=True)
  weights = np.where(visible[:, None], np.exp(logits - np.where(np.isfinite(row_max), row_max, 0)), 0)
  total = weights.sum(-1, keepdims=True)
  probs = weights / np.where(total > 0, total, 1)
  return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("t,s,causal,segmented,chunk", [
    (37, 37, True, False, 8),     # chunks that do not divide the length
    (37, 37, True, True, 16),     # packed segments and padding
    (21, 50, True, True, 8),      # queries are the last keys (T < S)
    (40, 40, False, True, 16),    # bidirectional
    (12, 12, True, False, 64),    # one chunk larger than the prompt
])
def test_chunked_attention_equals_dense_softmax(t, s, causal, segmented, chunk):
  rng = np.random.default_rng(t * s + chunk)
  q = rng.normal(size=(2, t, 6, 16)).astype(np.float32)
  k = rng.normal(size=(2, s, 2, 16)).astype(np.float32)
  v = rng.normal(size=(2, s, 2, 16)).astype(np.float32)
  q_seg = kv_seg = None
  if segmented:
    kv_seg = np.ones((2, s), np.int32)
    kv_seg[0, s // 3:] = 2
    kv_seg[1, s - 5:] = 0                     # right padding
    q_seg = kv_seg[:, s - t:]
  ours = chunked_attention.chunked_attention(q, k, v, q_seg, kv_seg, causal=causal, chunk=chunk)
  expected = _dense_reference(q, k, v, q_seg, kv_seg, causal)
  if segmented:   # padding queries: the dense entry point lets them see padding; only real rows matter
    expected = np.where((q_seg > 0)[:, :, None, None], expected, np.asarray(ours))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5, rtol=2e-5)


def _llm_config(impl, layers=3):
  return qwen2.Qwen2Config.from_dict(dict(presets.llm("tiny", vocab_size=VOCAB, dtype="float32",
                                                      remat_policy="none"), num_layers=layers,
                                          attention_impl=impl))


@functools.lru_cache(maxsize=None)
def _params():
  config = _llm_config("xla")
  return nn.unbox(qwen2.Qwen2ForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


# ~12 s a case on 2 cores: the default suite runs the plain rows stacked and the dropout rows per layer.
@pytest.mark.parametrize("dropout,layers", [
    (None, "stacked"), pytest.param(None, "per_layer", marks=pytest.mark.slow),
    pytest.param(CARD, "stacked", marks=pytest.mark.slow), (CARD, "per_layer")],
    ids=["plain-stacked", "plain-per_layer", "dropout-stacked", "dropout-per_layer"])
def test_cached_generation_through_the_chunked_prefill_equals_rerunning_the_whole_sequence(dropout, layers,
                                                                                           monkeypatch):
  # Small chunks, so the 40-token prompts cross several attention and MLP chunks.
  monkeypatch.setattr(chunked_attention, "DEFAULT_CHUNK", 8)
  monkeypatch.setattr(qwen2, "PREFILL_MLP_CHUNK", 16)
  rng = np.random.default_rng(5)
  ids = rng.integers(1, VOCAB, (3, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :6] = 0                                       # left padding
  mask[2, 31:] = 0                                      # right padding
  visual = np.zeros_like(ids, bool)
  visual[0, 4:36] = True                                # 32 visual tokens
  visual[1, 9:33] = True                                # 24
  visual[2, 2:26] = True                                # 24
  new = 6
  params = _params()
  # The reference: the dense XLA kernel over prompt + tokens so far, no cache, one row at a time.
  reference = qwen2.Qwen2ForCausalLM(_llm_config("xla"), dropout=dropout)
  rerun = jax.jit(lambda tokens, vis, seg, targets: reference.apply(
      params, tokens, visual_mask=vis if dropout else None, segment_ids=seg, targets=targets if dropout else None)[0])
  expected = rerun_greedy(rerun, ids, mask, visual, new)
  model = qwen2.Qwen2ForCausalLM(_llm_config("chunked"), dropout=dropout)
  if layers == "per_layer":     # what from_pretrained holds: one buffer per layer, run as an unrolled loop
    params = {"params": qwen2.unstack_layers(params["params"])}
    assert qwen2.layers_are_unstacked(params["params"]["layers"])
  ours = gen.generate(model, params, np.where(mask > 0, ids, 0), mask, max_new_tokens=new,
                      visual_mask=jnp.asarray(visual) if dropout else None)
  np.testing.assert_array_equal(ours, expected)


def _prefill_temp_bytes(impl, length):
  """XLA's temporary memory for the prefill of one `length`-token prompt into a cache (no run)."""
  config = qwen2.Qwen2Config.from_dict(dict(presets.llm("tiny", vocab_size=VOCAB, dtype="float32",
                                                        remat_policy="none"), num_layers=2, attention_impl=impl))
  model = qwen2.Qwen2ForCausalLM(config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))

  def prefill(params, ids):
    cache = qwen2.init_cache(config, 1, length + 8)
    mask = jnp.ones_like(ids)
    _, aux = model.apply(params, ids, segment_ids=mask, positions=jnp.cumsum(mask, 1) - 1, cache=cache,
                         return_logits=False, prefill=True, right_padded=True)
    return aux["cache"], aux["hidden"][:, -1]      # the hidden state, or XLA prunes the attention away
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.jit(prefill).lower(params, ids).compile().memory_analysis().temp_size_in_bytes


def test_prefill_memory_grows_linearly_with_the_prompt_on_the_chunked_path():
  lengths = (2048, 4096, 8192)
  chunked = [_prefill_temp_bytes("chunked", n) for n in lengths]
  dense = [_prefill_temp_bytes("xla", n) for n in lengths]
  # Doubling the prompt twice: linear growth is 4x; an (L x L) score matrix is 16x.
  assert chunked[2] / chunked[0] < 5, chunked
  assert chunked[1] / chunked[0] < 2.5, chunked
  # The measure can tell: the dense kernel's scores do grow quadratically, and dwarf the chunked path's.
  assert dense[2] / dense[0] > 12, dense
  assert dense[2] > 10 * chunked[2], (dense, chunked)


def test_attention_entry_point_dispatches_chunked_without_a_mask_matrix():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(1, 24, 4, 8)).astype(np.float32)
  k = rng.normal(size=(1, 24, 2, 8)).astype(np.float32)
  v = rng.normal(size=(1, 24, 2, 8)).astype(np.float32)
  ours = attention_ops.attention(q, k, v, impl="chunked")
  np.testing.assert_allclose(np.asarray(ours), _dense_reference(q, k, v, None, None, True), atol=2e-5)


def test_splash_prefill_generates_what_the_dense_path_does_in_interpret_mode():
  # TPUs prefill with splash (interpret mode here): the prompt is padded to its 512-token blocks.
  rng = np.random.default_rng(8)
  ids = rng.integers(1, VOCAB, (2, 30)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :5] = 0
  params = _params()
  ours = gen.generate(qwen2.Qwen2ForCausalLM(_llm_config("splash")), params, ids, mask, max_new_tokens=4)
  dense = gen.generate(qwen2.Qwen2ForCausalLM(_llm_config("xla")), params, ids, mask, max_new_tokens=4)
  np.testing.assert_array_equal(ours, dense)


def test_request_too_large_for_the_device_fails_before_compiling_with_the_frames_that_fit(monkeypatch):
  from hico_jax.infer import memory
  config = qwen2.Qwen2Config.from_dict(dict(presets.llm("qwen2_7b", dtype="bfloat16", param_dtype="bfloat16",
                                                        attention_impl="cudnn")))
  # Independent arithmetic for Qwen2-7B at 10,000 frames: the KV cache alone is 28 layers x 160,016 tokens x
  # 4 KV heads x 128 x (K and V) x 2 bytes = 9.2 GB, so 8 GiB free cannot hold it.
  kv_cache = 28 * (16 * 10000 + 100 + 16) * 4 * 128 * 2 * 2
  assert kv_cache > 8 * memory.GIB
  with pytest.raises(ValueError) as error:
    memory.check_fits(config, None, batch=1, text_len=100, frames=10000, tokens_per_frame=16, clip_frames=4,
                      max_new_tokens=16, available=8 * memory.GIB)
  message = str(error.value)
  assert "10000 frames" in message and "160,000 visual tokens" in message and "8.0 GiB free" in message
  fit = int(message.split("at most about ")[1].split(" frames")[0])
  assert fit % 4 == 0 and 0 < fit < 10000
  # The frames it names do fit by its own estimate, and a clip more does not.
  memory.check_fits(config, None, batch=1, text_len=100, frames=fit, tokens_per_frame=16, clip_frames=4,
                    max_new_tokens=16, available=8 * memory.GIB)
  with pytest.raises(ValueError):
    memory.check_fits(config, None, batch=1, text_len=100, frames=fit + 4, tokens_per_frame=16, clip_frames=4,
                      max_new_tokens=16, available=8 * memory.GIB)
  # Dropout shortens the later stages' caches, so more frames fit.
  card = vd.VisualDropoutConfig(type="uniform0_attention", layers=(4, 18), ratios=(1.0, 0.75, 0.25))
  assert memory.generation_bytes(config, card, 1, 160100, [160000], 16) < \
      0.85 * memory.generation_bytes(config, None, 1, 160100, [160000], 16)
  # XLA's dense kernel would hold (heads x L x L) scores: the estimate says so, and refuses long prompts.
  dense = qwen2.Qwen2Config.from_dict({**config.__dict__, "attention_impl": "xla"})
  assert memory.generation_bytes(dense, None, 1, 32100, [32000], 16) > 28 * 32100**2 * 4


def test_the_estimate_covers_what_xla_allocates_for_a_cpu_prefill():
  """The estimate against the compiler's own count of the prefill's buffers (cache + temporaries) for a
  small decoder, at two prompt lengths: never below it, and not wildly above it."""
  from hico_jax.infer import memory
  for length in (2048, 8192):
    config = qwen2.Qwen2Config.from_dict(dict(presets.llm("tiny", vocab_size=VOCAB, dtype="float32",
                                                          remat_policy="none"), num_layers=2,
                                              attention_impl="chunked"))
    model = qwen2.Qwen2ForCausalLM(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))

    def prefill(params, embeddings):
      cache = qwen2.init_cache(config, 1, length + 16)
      mask = jnp.ones(embeddings.shape[:2], jnp.int32)
      _, aux = model.apply(params, embeddings=embeddings, segment_ids=mask, positions=jnp.cumsum(mask, 1) - 1,
                           cache=cache, return_logits=False, prefill=True, right_padded=True)
      return aux["cache"], aux["hidden"][:, -1]
    embeddings = jax.ShapeDtypeStruct((1, length, config.hidden_size), jnp.float32)
    analysis = jax.jit(prefill).lower(params, embeddings).compile().memory_analysis()
    actual = analysis.temp_size_in_bytes + analysis.output_size_in_bytes + analysis.argument_size_in_bytes
    weights = sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(params))
    estimate = memory.generation_bytes(config, None, 1, length, [0], 16) + weights
    assert actual <= estimate <= 4 * actual, (length, actual, estimate)
