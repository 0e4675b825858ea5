#!/usr/bin/env python
"""Long-context benchmarks on one GPU: visual-dropout prefill, and the longest sequence a preset trains at.

  python tools/benchmark_long.py dropout --frames 1000 10000     # hico_7b LLM prefill, card setting vs none
  python tools/benchmark_long.py seqlen --preset qwen2_5_1_5b    # longest fwd+bwd, dense vs blockwise attention

`dropout`: the prefill of the hico_7b preset's LLM (Qwen2-7B, random bf16 weights, cuDNN attention) over a
prompt of 16·F visual tokens and a 128-token text, without dropout and with the model card's setting
(uniform0_attention, layers [4, 18], ratios [1, 0.75, 0.25]) in its compacted form; latency against the FLOP
saving counted in hico_jax/flops.py. The visual tokens are random embeddings (as NIAH feeds cached ones): the
vision tower is the same in both and is benchmarked by tools/benchmark.py clip.

`seqlen`: forward + backward (full remat, fused chunked loss) of a Qwen2 preset with dense attention (XLA:
the (L, L) scores exist) and with blockwise attention (cuDNN flash, which is also what the ring runs per
block): the compiler's memory estimate per length, then one timed step at the longest length that fits.
Each case runs in its own subprocess. --out appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from hico_jax.bench.isolated import print_result, run_case_in_subprocess   # one subprocess runner, one timer
from hico_jax.bench.timing import time_calls

CARD = {"type": "uniform0_attention", "layers": (4, 18), "ratios": (1.0, 0.75, 0.25)}
TEXT_TOKENS = 128


def run_dropout(case: dict) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from hico_jax import flops, presets
  from hico_jax.models import qwen2, visual_dropout as vd

  config = qwen2.Qwen2Config.from_dict(dict(presets.llm(
      case.get("preset", "qwen2_7b"), dtype="bfloat16", param_dtype="bfloat16", remat_policy="none",
      attention_impl=case.get("attention", "cudnn"), **case.get("overrides", {}))))
  dropout = vd.VisualDropoutConfig(**CARD) if case["dropout"] else None
  model = qwen2.Qwen2ForCausalLM(config, dropout=dropout)
  visual = 16 * case["frames"]
  length = visual + TEXT_TOKENS
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  embeddings = jax.random.normal(jax.random.key(1), (1, length, config.hidden_size), jnp.bfloat16) * 0.02
  mask = jnp.zeros((1, length), bool).at[:, 32:32 + visual].set(True)   # system prompt, video, question
  lengths = vd.compacted_lengths(dropout, length, [[visual]]) if dropout else None

  @jax.jit
  def prefill(params, embeddings):
    _, aux = model.apply(params, embeddings=embeddings, visual_mask=mask if dropout else None,
                         compact_lengths=lengths, return_logits=False)
    last = aux["hidden"][:, -1:]
    return model.apply(params, last, method=qwen2.Qwen2ForCausalLM.logits)

  run = lambda: jax.block_until_ready(prefill(params, embeddings))
  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  times = time_calls(run, case["warmup"], case["iters"])
  model_flops = (flops.qwen2_dropout_forward_flops(config, dropout, TEXT_TOKENS, visual) if dropout
                 else flops.qwen2_forward_flops(config, length))
  stats = jax.devices()[0].memory_stats() or {}
  return {"times": times, "compile_s": compile_s, "flops": model_flops, "lengths": lengths,
          "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind}


def run_seqlen(case: dict) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from hico_jax import flops, presets
  from hico_jax.models import qwen2
  from hico_jax.ops.loss import linear_cross_entropy

  config = qwen2.Qwen2Config.from_dict(dict(presets.llm(
      case["preset"], dtype="bfloat16", param_dtype="float32", remat_policy="full",
      attention_impl=case["attention"])))
  model = qwen2.Qwen2ForCausalLM(config)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"])

  def loss_fn(p, ids):
    _, aux = model.apply({"params": p}, ids, return_logits=False)
    kernel = model.apply({"params": p}, method=qwen2.Qwen2ForCausalLM.head_kernel)
    total, count = linear_cross_entropy(aux["hidden"], kernel, jnp.roll(ids, -1, axis=1),
                                        jnp.ones_like(ids).at[:, -1].set(0), 4096)
    return total / count

  step = jax.jit(jax.value_and_grad(loss_fn))
  capacity = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 2**40)
  fits = {}
  for length in case["lengths"]:
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    try:
      analysis = step.lower(params, ids).compile().memory_analysis()
      need = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
      fits[length] = need / 2**30
    except Exception as e:  # pylint: disable=broad-except  # a compile that cannot fit is a result here
      fits[length] = f"{type(e).__name__}"
  longest = max([l for l, v in fits.items() if isinstance(v, float) and v * 2**30 < 0.97 * capacity], default=None)
  result = {"estimate_gib": fits, "longest": longest, "capacity_gib": capacity / 2**30,
            "device": jax.devices()[0].device_kind}
  if longest:
    real = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    ids = jax.random.randint(jax.random.key(1), (1, longest), 0, config.vocab_size)
    run = lambda: jax.block_until_ready(step(real, ids))
    try:
      run()
      seconds = statistics.median(time_calls(run, 0, case["iters"]))
      train_flops = flops.qwen2_train_flops(config, longest)
      stats = jax.devices()[0].memory_stats() or {}
      result.update(step_s=seconds, tokens_per_s=longest / seconds, mfu=flops.mfu(train_flops, seconds),
                    peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)
    except Exception as e:  # pylint: disable=broad-except
      result.update(run_error=str(e).splitlines()[0][:200])
  return result


def _dropout_table(results):
  rows = ["| frames | tokens | dropout | prefill s | TFLOP | TFLOP/s | peak GiB | latency saving | FLOP saving |",
          "|---|---|---|---|---|---|---|---|---|"]
  base = {r["frames"]: r for r in results if not r["dropout"] and "error" not in r}
  for r in results:
    label = f"| {r['frames']} | {16 * r['frames'] + TEXT_TOKENS:,} | {'card' if r['dropout'] else 'none'} | "
    if "error" in r:
      rows.append(label + f"{r['error']} | | | | | |")
      continue
    median = statistics.median(r["times"])
    saving = ""
    if r["dropout"] and r["frames"] in base:
      b = base[r["frames"]]
      saving = (f"{100 * (1 - median / statistics.median(b['times'])):.1f}% | "
                f"{100 * (1 - r['flops'] / b['flops']):.1f}%")
    rows.append(label + f"{median:.3f} | {r['flops'] / 1e12:.1f} | {r['flops'] / median / 1e12:.0f} | "
                f"{r['peak_gib']:.1f} | {saving or ' | '} |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("section", nargs="?", default="dropout", choices=["dropout", "seqlen"])
  parser.add_argument("--frames", nargs="+", type=int, default=[1000, 10000])
  parser.add_argument("--preset", default="qwen2_5_1_5b")
  parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768, 65536, 131072, 262144, 524288])
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--timeout", type=int, default=400)
  parser.add_argument("--out", default=None)
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    case = json.loads(args.case)
    print_result({"dropout": run_dropout, "seqlen": run_seqlen}[case["section"]](case))
    return
  if args.section == "dropout":
    cases = [{"section": "dropout", "frames": f, "dropout": d, "warmup": args.warmup, "iters": args.iters}
             for f in args.frames for d in (False, True)]
  else:
    cases = [{"section": "seqlen", "preset": args.preset, "attention": a, "lengths": args.lengths,
              "iters": args.iters} for a in ("xla", "cudnn")]
  results = []
  for case in cases:
    results.append(run_case_in_subprocess(case, args.timeout, script=__file__))
    print(json.dumps(results[-1]), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps({**results[-1], "date": time.strftime("%Y-%m-%d")}) + "\n")
  if args.section == "dropout":
    print(_dropout_table(results))


if __name__ == "__main__":
  main()
