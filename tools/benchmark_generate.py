#!/usr/bin/env python
"""Long-video generation on one GPU, measured on the path a user takes, beside the official PyTorch path.

  python tools/benchmark_generate.py --work /tmp/bench --out generate.jsonl \
      --preset hico_7b --frames 1000 2000 5000 10000 20000 --dropout none card --torch_frames 1000 10000

1. `write`: random weights of the preset in the official VideoChat-Flash layout (bf16 safetensors +
   config.json + the real Qwen2 tokenizer.json), as a released checkpoint is downloaded.
2. `jax`: `hico_jax.from_pretrained(dir)` with its defaults (plus the model card's visual dropout for
   "card": uniform0_attention, layers [4, 18], ratios [1, 0.75, 0.25]), then `model.generate(ids, video=frames,
   max_new_tokens=16)` for a chat()-style prompt and a video of F frames at the tower's size, for each F in
   ascending order in one process: the first call (compile + run), then the median of three more; device peak
   memory after each F (the allocator's peak so far: F ascending makes it F's), the time to load and the host's
   peak memory while loading. eos is ignored, so every run makes 16 tokens.
3. `torch`: what the official chat() runs, in bf16 on the same weights: the independent PyTorch tower + merge +
   projector (tests/torch_reference, SDPA attention) over the clips (64 at a time), spliced into
   transformers' Qwen2ForCausalLM (sdpa) and its `generate(inputs_embeds=..., max_new_tokens=16)`.
4. `niah`: tools/niah.py single-hop at N frames on a synthetic haystack and needle (one needle, depths 0, 0.5,
   1): seconds per needle placement (between successive records; the first record's time also holds loading
   and encoding the haystack), with the tool's defaults (YaRN x4 as the reference runs it).

Every case runs in its own subprocess; one JSON line per result goes to --out and the console.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = {"type": "uniform0_attention", "layers": [4, 18], "ratios": [1.0, 0.75, 0.25]}
QUESTION = "What happens in the video? Describe it in detail."
MAX_NEW_TOKENS = 16
# Calls timed after the first (which compiles, or warms PyTorch's kernels up): the PyTorch path's time varies
# by up to 25% from call to call (1.11-1.40 s at 1,000 frames), so a row reports the median of three.
TIMED_RUNS = 3


def _timings(times: list[float]) -> dict:
  """first_s: the first call; generate_s: the median of the rest (each listed in runs_s)."""
  rest = sorted(times[1:])
  return {"first_s": times[0], "generate_s": rest[len(rest) // 2], "runs_s": times[1:]}


class HostMemory:
  """Peak anonymous host memory (RssAnon) while the block runs, sampled every 20 ms. ru_maxrss would also
  count the checkpoint's memory-mapped file pages, which are page cache, not a copy of the model."""

  def __enter__(self):
    import threading
    self.peak, self._stop = 0, threading.Event()

    def sample():
      while not self._stop.is_set():
        with open("/proc/self/status") as f:
          for line in f:
            if line.startswith("RssAnon:"):
              self.peak = max(self.peak, int(line.split()[1]) * 1024)
        self._stop.wait(0.02)
    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _prompt_ids(tokenizer, frames: int):
  from hico_jax.data import text
  from hico_jax.infer import chat
  time_msg = text.time_message(float(frames), frames)                    # a 1 fps video of `frames` seconds
  prompt = chat.prompt_text([], chat.first_user_turn(QUESTION, time_msg))
  return text.tokenize_image_prompt(prompt, tokenizer)[None]


def _frames(count: int, size: int):
  import numpy as np
  # Smooth random images (noise would make every ToMe score a tie): a few gradients shifted per frame.
  y, x = np.mgrid[:size, :size].astype(np.float32) / size
  t = np.arange(count, dtype=np.float32)[:, None, None]
  out = np.empty((count, size, size, 3), np.uint8)
  for c in range(3):
    out[..., c] = (127 + 120 * np.sin(6 * x[None] * (c + 1) + 4 * y[None] + 0.05 * t * (c + 1))).astype(np.uint8)
  return out


def case_write(case):
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import numpy as np
  from hico_jax import presets
  from hico_jax.convert import videochat_flash
  from hico_jax.data import tokenizer as tokenizer_lib
  from hico_jax.models import hico

  start = time.perf_counter()
  config = hico.HiCoConfig.from_dict(dict(presets.hico(case["preset"], param_dtype="bfloat16")))
  shapes = nn.unbox(jax.eval_shape(hico.HiCo(config).init, jax.random.key(0), *hico.init_inputs(config)))["params"]
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  values = []
  for i, (path, leaf) in enumerate(leaves):
    key = jax.random.key(i)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      value = jax.random.uniform(key, leaf.shape, jnp.float32, 0.5, 1.5)
    else:
      value = jax.random.normal(key, leaf.shape, jnp.float32) * 0.02
    values.append(np.asarray(jax.device_get(value.astype(jnp.bfloat16))))
  params = jax.tree_util.tree_unflatten(tree, values)
  videochat_flash.save(case["dir"], config, params, dtype="bfloat16",
                       extra_fields={"eos_token_id": 151645, "pad_token_id": 151643})
  tokenizer_lib.build_qwen2_tokenizer_json(case["dir"])
  size = sum(os.path.getsize(os.path.join(case["dir"], f)) for f in os.listdir(case["dir"]))
  return {"seconds": time.perf_counter() - start, "gib_on_disk": size / 2**30}


def case_jax(case):
  import jax
  import hico_jax
  from hico_jax.data import tokenizer as tokenizer_lib

  jax.devices()                                              # the backend's own host memory, before the load
  start = time.perf_counter()
  with HostMemory() as host:
    model = hico_jax.from_pretrained(case["model"], visual_dropout=CARD if case["dropout"] == "card" else None)
    jax.block_until_ready(model.params)
  load_s, load_host_gib = time.perf_counter() - start, host.peak / 2**30
  maxrss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  stats = jax.devices()[0].memory_stats() or {}
  weights_gib = stats.get("bytes_in_use", 0) / 2**30
  tokenizer = tokenizer_lib.load_tokenizer(case["model"])
  size = model.config.vit.image_size
  results = []
  for frames in sorted(case["frames"]):
    ids = _prompt_ids(tokenizer, frames)
    video = _frames(frames, size)[None]         # uint8 at the tower's size, as decode_frames(size=S) gives
    row = {"frames": frames, "prompt_tokens": int(ids.shape[1] - 1 + model.config.visual_tokens(frames))}
    try:
      times = []
      for _ in range(1 + TIMED_RUNS):
        begin = time.perf_counter()
        out = model.generate(ids, video=video, max_new_tokens=MAX_NEW_TOKENS, eos_ids=())
        times.append(time.perf_counter() - begin)
      stats = jax.devices()[0].memory_stats() or {}
      row.update(_timings(times), new_tokens=int(out.shape[1]), peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)
      if frames in case.get("split", ()):
        # One new token is the vision tower and the prefill alone: the rest of the 16 is decoding.
        model.generate(ids, video=video, max_new_tokens=1, eos_ids=())
        begin = time.perf_counter()
        model.generate(ids, video=video, max_new_tokens=1, eos_ids=())
        row["one_token_s"] = time.perf_counter() - begin
        row["decode_ms_per_token"] = 1000 * (row["generate_s"] - row["one_token_s"]) / (MAX_NEW_TOKENS - 1)
        if hasattr(model, "encode_video"):          # the vision tower alone, from uint8 frames
          pixels = _frames(frames, size)
          jax.block_until_ready(model.encode_video(pixels))
          begin = time.perf_counter()
          jax.block_until_ready(model.encode_video(pixels))
          row["encode_s"] = time.perf_counter() - begin
      if frames in case.get("chat", ()):
        row.update(_chat_turns(model, tokenizer, video[0]))
    except Exception as e:  # pylint: disable=broad-except  # a request that does not fit is a result here
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    del video
    print("PROGRESS " + json.dumps(row), flush=True)
    results.append(row)
  return {"load_s": load_s, "load_host_anon_peak_gib": load_host_gib, "load_maxrss_gib": maxrss_gib,
          "weights_gib": weights_gib,
          "device": jax.devices()[0].device_kind, "rows": results}


def _chat_turns(model, tokenizer, frames) -> dict:
  """Seconds of a first question and of a follow-up in hico_jax.infer.chat (the follow-up reuses the first
  prompt's KV cache), in a second conversation after a first one compiled both."""
  import numpy as np
  from hico_jax.infer import chat
  video = chat.Video(frames=frames, duration=float(len(frames)), indices=np.arange(len(frames)), source="bench")
  times = {}
  for attempt in range(2):
    conversation = chat.VideoChat(model, tokenizer, video)
    for name, question in (("chat_first_s", QUESTION), ("chat_follow_up_s", "And what happens at the end?")):
      begin = time.perf_counter()
      turn = conversation.ask(question, max_new_tokens=MAX_NEW_TOKENS)
      times[name] = time.perf_counter() - begin
      times[name.replace("_s", "_new_tokens")] = int(len(turn.answer_ids))
  times["chat_follow_up_cached_tokens"] = int(turn.cached_ids)
  return times


def case_torch(case):
  import glob
  import numpy as np
  import torch
  import transformers
  from safetensors.torch import load_file
  from hico_jax.convert import videochat_flash
  from hico_jax.data import tokenizer as tokenizer_lib, video as video_lib
  from hico_jax import VIDEO_TOKEN_ID
  # The reference's own code lives with the tests, outside the installed package: this comparison runs from the
  # repo root with PYTHONPATH=. (the only part of tools/ that needs it).
  from tests.hf_reference import VISION_KEY_PREFIXES
  from tests.torch_reference.videochat_flash import ClipEncoder, load_official

  device = "cuda" if torch.cuda.is_available() else "cpu"       # cpu: a smoke test of this script
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  start = time.perf_counter()
  with open(os.path.join(case["model"], "config.json")) as f:
    config = videochat_flash.hf_config_to_hico(json.load(f))
  tensors = {}
  for path in sorted(glob.glob(os.path.join(case["model"], "*.safetensors"))):
    tensors.update(load_file(path))
  vit, lm = config.vit, config.llm
  encoder = ClipEncoder(image_size=vit.image_size, width=vit.width, depth=vit.depth, heads=vit.num_heads,
                        mlp_dim=vit.mlp_dim, hidden=lm.hidden_size, attention="sdpa")
  load_official(encoder.encoder, encoder.projector, tensors, allow_other_keys=True)
  encoder = encoder.to(device, torch.bfloat16).eval()
  hf_config = transformers.Qwen2Config(
      vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
      num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
      rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_norm_eps, tie_word_embeddings=lm.tie_word_embeddings,
      max_position_embeddings=lm.max_position_embeddings, torch_dtype=torch.bfloat16)
  hf_config._attn_implementation = "sdpa"
  with torch.device(device):
    llm = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16).eval()
  llm.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(VISION_KEY_PREFIXES)},
                      strict=not lm.tie_word_embeddings)
  del tensors
  load_s = time.perf_counter() - start
  tokenizer = tokenizer_lib.load_tokenizer(case["model"])
  results = []
  for frames in sorted(case["frames"]):
    ids = _prompt_ids(tokenizer, frames)[0]
    at = int(np.argmax(ids == VIDEO_TOKEN_ID))
    pixels = video_lib.normalize(_frames(frames, vit.image_size))
    row = {"frames": frames}
    try:
      times = []
      for _ in range(1 + TIMED_RUNS):
        sync()
        begin = time.perf_counter()
        with torch.no_grad():
          clips = torch.from_numpy(pixels).permute(0, 3, 1, 2)            # (T, 3, S, S)
          tokens = []
          for first in range(0, frames, 64 * 4):                          # 64 clips at a time
            chunk = clips[first:first + 256].to(device, torch.bfloat16)[None]
            tokens.append(encoder(chunk)[0])
          visual = torch.cat(tokens)
          embed = llm.get_input_embeddings()
          text_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
          embeds = torch.cat([embed(text_ids[:at]), visual, embed(text_ids[at + 1:])])[None]
          out = llm.generate(inputs_embeds=embeds, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, pad_token_id=151643)
        sync()
        times.append(time.perf_counter() - begin)
      row.update(_timings(times), new_tokens=int(out.shape[1]),
                 peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0)
    except torch.OutOfMemoryError as e:
      row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
      torch.cuda.empty_cache()
    print("PROGRESS " + json.dumps(row), flush=True)
    results.append(row)
  return {"load_s": load_s, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "rows": results}


def case_niah(case):
  import cv2
  import numpy as np
  work = case["work"]
  haystack = os.path.join(work, "haystack.mp4")
  frames = case["frames"]
  unique = frames // 2 if frames > 7500 else frames          # the tool, as the reference, repeats the first half
  writer = cv2.VideoWriter(haystack, cv2.VideoWriter_fourcc(*"mp4v"), 1.0, (224, 224))
  for frame in _frames(unique, 224):
    writer.write(frame[..., ::-1])
  writer.release()
  cv2.imwrite(os.path.join(work, "needle.png"), np.full((300, 400, 3), (40, 200, 90), np.uint8))
  with open(os.path.join(work, "needles.json"), "w") as f:
    json.dump([{"question": "What colour is the needle?\n(A) green\n(B) red\nBest option: (", "answer": "A",
                "image": "needle.png"}], f)
  out = os.path.join(work, "niah.json")
  command = [sys.executable, os.path.join(REPO, "tools", "niah.py"), "single", "--model", case["model"],
             "--haystack", haystack, "--needles", os.path.join(work, "needles.json"), "--image_root", work,
             "--min_frame_num", str(frames), "--max_frame_num", str(frames), "--frame_interval", str(frames),
             "--depth_interval", "0.5", "--yarn_factor", "4", "--out", out]
  # Each placement's record is printed as it finishes: the gaps between them are the seconds a needle takes
  # (prefill over the haystack with the needle spliced in, then the answer); the first also holds the load,
  # the haystack's decoding and its encoding.
  start = time.perf_counter()
  child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})   # each record when it is printed
  stamps, lines = [], []
  for line in child.stdout:
    lines.append(line.rstrip())
    if line.startswith("{"):
      stamps.append(time.perf_counter() - start)
  seconds = time.perf_counter() - start
  if child.wait():
    return {"error": "\n".join(lines)[-600:]}
  with open(out) as f:
    records = json.load(f)
  gaps = [b - a for a, b in zip(stamps, stamps[1:])]
  return {"seconds": seconds, "placements": len(records), "first_record_s": stamps[0] if stamps else None,
          "seconds_per_placement": sum(gaps) / len(gaps) if gaps else None, "gaps_s": gaps,
          "tail": lines[-3:]}


CASES = {"write": case_write, "jax": case_jax, "torch": case_torch, "niah": case_niah}


def _run(case: dict, timeout: int) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
  start = time.perf_counter()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    progress = [json.loads(l[9:]) for l in (e.stdout or b"").decode().splitlines() if l.startswith("PROGRESS ")]
    return {**case, "error": f"timed out after {timeout} s", "rows": progress}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("RESULT "):
      return {**case, **json.loads(line[len("RESULT "):]), "wall_s": time.perf_counter() - start}
  progress = [json.loads(l[9:]) for l in done.stdout.splitlines() if l.startswith("PROGRESS ")]
  return {**case, "error": " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])[-800:],
          "rows": progress}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--case", help=argparse.SUPPRESS)
  parser.add_argument("--work", default="/tmp/hico_bench", help="where the checkpoints and haystack are written")
  parser.add_argument("--out", default=None, help="append JSON lines here")
  parser.add_argument("--preset", nargs="+", default=["hico_7b"])
  parser.add_argument("--frames", type=int, nargs="*", default=[1000, 2000, 5000, 10000, 20000])
  parser.add_argument("--dropout", nargs="+", default=["none", "card"], choices=["none", "card"])
  parser.add_argument("--torch_frames", type=int, nargs="*", default=[1000, 10000])
  parser.add_argument("--split_frames", type=int, nargs="*", default=[1000, 10000],
                      help="frame counts also timed with one new token (vision + prefill), to split off decoding")
  parser.add_argument("--chat_frames", type=int, nargs="*", default=[10000],
                      help="frame counts also timed as a chat: a first question, then a follow-up (dropout none)")
  parser.add_argument("--niah_frames", type=int, default=0, help="0: no NIAH case")
  parser.add_argument("--timeout", type=int, default=1800)
  args = parser.parse_args()
  if args.case:
    case = json.loads(args.case)
    print("RESULT " + json.dumps(CASES[case["kind"]](case)), flush=True)
    return
  os.makedirs(args.work, exist_ok=True)
  for preset in args.preset:
    model_dir = os.path.join(args.work, preset)
    cases = [] if os.path.exists(os.path.join(model_dir, "config.json")) else [
        {"kind": "write", "preset": preset, "dir": model_dir}]
    cases += [{"kind": "jax", "model": model_dir, "preset": preset, "frames": args.frames, "dropout": d,
               "split": args.split_frames, "chat": args.chat_frames if d == "none" else []}
              for d in args.dropout if args.frames]
    if args.torch_frames:
      cases.append({"kind": "torch", "model": model_dir, "preset": preset, "frames": args.torch_frames})
    if args.niah_frames:
      cases.append({"kind": "niah", "model": model_dir, "preset": preset, "frames": args.niah_frames,
                    "work": args.work})
    for case in cases:
      result = _run(case, args.timeout)
      line = json.dumps(result)
      print(line, flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(line + "\n")


if __name__ == "__main__":
  main()
