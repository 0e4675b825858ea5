"""`llm` cases: forward + backward (no optimizer) of the Qwen2 decoder of a preset on one row of random token
ids, bf16 compute, random init: hico_jax (remat policy and master-weight dtype from the case, the fused chunked
loss) and transformers' Qwen2ForCausalLM (bf16, sdpa, gradient checkpointing) on the same ids."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hico_jax import presets
from hico_jax.bench import timing
from hico_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from hico_jax.ops.loss import linear_cross_entropy


def token_ids(vocab: int, seq_len: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (1, seq_len)).astype(np.int32)


def run_jax(case: dict) -> dict:
  on_gpu = jax.devices()[0].platform == "gpu"
  config = Qwen2Config.from_dict(dict(presets.llm(
      case["preset"], dtype="bfloat16", param_dtype=case["param_dtype"], remat_policy=case["remat"],
      attention_impl="cudnn" if on_gpu else "xla")))
  model = Qwen2ForCausalLM(config)
  ids = jnp.asarray(token_ids(config.vocab_size, case["seq_len"]))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids[:, :8])["params"])

  def loss_fn(p, ids):
    _, aux = model.apply({"params": p}, ids, return_logits=False)
    labels = jnp.roll(ids, -1, axis=1)
    weights = jnp.ones_like(ids).at[:, -1].set(0)
    kernel = model.apply({"params": p}, method=Qwen2ForCausalLM.head_kernel)
    total, count = linear_cross_entropy(aux["hidden"], kernel, labels, weights, case["loss_chunk"])
    return total / count

  step = jax.jit(jax.value_and_grad(loss_fn))

  def run():
    loss, grads = step(params, ids)
    jax.block_until_ready((loss, grads))
    return loss

  compile_start = time.perf_counter()
  loss = float(run())
  compile_s = time.perf_counter() - compile_start
  times = timing.time_calls(run, case["warmup"], case["iters"])
  stats = jax.devices()[0].memory_stats() or {}
  return {"loss": loss, "times": times, "compile_s": compile_s,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def run_torch(case: dict) -> dict:
  # torch and transformers only in the torch case's subprocess: the jax cases never load them.
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  p = presets.llm(case["preset"])
  hf_config = transformers.Qwen2Config(
      vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
      num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
      rope_theta=p.rope_theta, rms_norm_eps=p.rms_norm_eps, tie_word_embeddings=p.tie_word_embeddings,
      max_position_embeddings=max(p.max_position_embeddings, case["seq_len"]), use_cache=False)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with torch.device(device):
    model = transformers.Qwen2ForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                                       dtype=torch.bfloat16)
  model.gradient_checkpointing_enable()
  model.train()
  ids = torch.tensor(token_ids(p.vocab_size, case["seq_len"]), dtype=torch.long, device=device)

  def run():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  compile_start = time.perf_counter()
  loss = float(run())
  compile_s = time.perf_counter() - compile_start
  times = timing.time_calls(run, case["warmup"], case["iters"])
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return {"loss": loss, "times": times, "compile_s": compile_s, "peak_gib": peak, "device": kind}
