"""The `data` case: decode + sample (dynamic ~1 fps, 64-256 frames) + resize, one process on one core, from a
TFDS build of synthetic mp4s: the work a data worker does per sample, in frames/s."""

from __future__ import annotations

import os
import shutil
import time

from hico_jax.data import synthetic, tfds_longvid, video


def run(case: dict) -> dict:
  root = case["workdir"]
  dataset = synthetic.make_dataset(os.path.join(root, "videos"), num_videos=case["videos"], seed=0,
                                   size=case["source_px"], fps_range=(24, 30), duration_range=(90.0, 150.0))
  out = os.path.join(root, "tfds")
  if not tfds_longvid.is_prepared(out) or not dataset.reused:
    shutil.rmtree(out, ignore_errors=True)
    tfds_longvid.build(str(dataset), out, log=lambda _: None)
  source = tfds_longvid.LongVidSource(out)
  media = [source[i][1][0] for i in range(len(source))]
  video.resize_frames(video.decode_frames(media[0], max_frames=8)[0], 224)   # warm-up: codec and Pillow set-up
  results = {}
  for size in case["sizes"]:
    frames_done, start = 0, time.perf_counter()
    for data in media:
      raw, _ = video.decode_frames(data, mode="dynamic_fps1", min_frames=64, max_frames=256)
      frames_done += len(video.resize_frames(raw, size))
    elapsed = time.perf_counter() - start
    results[str(size)] = {"frames": frames_done, "seconds": elapsed, "frames_per_s": frames_done / elapsed}
  mb = sum(len(m) for m in media) / len(media) / 2**20
  return {"per_size": results, "videos": len(media), "mean_video_mib": mb, "times": [0.0], "device": "cpu"}
