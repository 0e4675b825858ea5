#!/usr/bin/env python
"""Records/s and decoded frames/s per worker core: the TFDS LongVid source against the legacy shard reader.

  python tools/benchmark_data_source.py --workdir /tmp/bench_source --videos 8 --repeats 7

Both read the same synthetic mp4s: the TFDS build, and the same records in the legacy shard format that the
TFDS builder replaced (written by this script, read as the removed shard reader read them). One process, one
thread, the two readers interleaved record by record (which goes first alternates), so a loaded machine
slows both alike; per repeat it prints each reader's rates and the TFDS/legacy ratio, then the median and
the spread (min..max) of each.
  read     every record fetched (header + media bytes) in a seeded random order, `--read_passes` times
  decode   every record fetched, then what a data worker does with a video: dynamic_fps1 sampling
           (64-256 frames), OpenCV decoding, PIL resize to 224
"""

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time

import numpy as np


# The legacy shard record, kept here only to measure against: b"HICOREC1" + uint32 header length + JSON header
# + the media file's bytes, one record per ArrayRecord entry (what hico_jax/data/records.py wrote before the
# TFDS builder replaced it; its reader below is the removed shards.MixedSource's read path).
_MAGIC, _LENGTH = b"HICOREC1", struct.Struct("<I")


def _write_legacy(tfds_source, path):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
  for i in range(len(tfds_source)):
    header, media = tfds_source[i]
    body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    writer.write(_MAGIC + _LENGTH.pack(len(body)) + body + (media[0] if media else b""))
  writer.close()
  os.replace(path + ".tmp", path)


def _legacy_reader(path):
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)

  def read(i):
    data = reader.read([i])[0]
    (length,) = _LENGTH.unpack_from(data, len(_MAGIC))
    start = len(_MAGIC) + _LENGTH.size
    media = bytes(data[start + length:])
    return json.loads(bytes(data[start:start + length]).decode("utf-8")), [media] if media else []
  return read


def _readers(dataset, root):
  from hico_jax.data import tfds_longvid
  tfds_dir, shard = os.path.join(root, "tfds"), os.path.join(root, "legacy.array_record-00000-of-00001")
  if not dataset.reused or not tfds_longvid.is_prepared(tfds_dir) or not os.path.exists(shard):
    shutil.rmtree(tfds_dir, ignore_errors=True)
    tfds_longvid.build(str(dataset), tfds_dir, log=lambda _: None)
    _write_legacy(tfds_longvid.LongVidSource(tfds_dir), shard)
  source = tfds_longvid.LongVidSource(tfds_dir)
  return {"tfds": source.__getitem__, "legacy": _legacy_reader(shard)}, len(source)


def _decode(header, media):
  from hico_jax.data import video
  raw, _ = video.decode_frames(media[0], mode="dynamic_fps1", min_frames=64, max_frames=256,
                               start=header.get("start"), end=header.get("end"))
  return len(video.resize_frames(raw, 224))


def _interleaved(readers, order, passes, decode):
  """Seconds each reader spent, and frames it decoded: record by record, each record read (and decoded) by
  every reader in turn, the first one alternating, so load that comes and goes falls on both alike."""
  seconds, frames = dict.fromkeys(readers, 0.0), dict.fromkeys(readers, 0)
  names = list(readers)
  for step, i in enumerate(np.tile(order, passes)):
    for name in (names if step % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      header, media = readers[name](int(i))
      if decode:
        frames[name] += _decode(header, media)
      seconds[name] += time.perf_counter() - start
  return seconds, frames


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/bench_source")
  parser.add_argument("--videos", type=int, default=8)
  parser.add_argument("--source_px", type=int, default=640)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--read_passes", type=int, default=20)
  args = parser.parse_args()
  import cv2
  cv2.setNumThreads(1)                 # one worker core
  from hico_jax.data import synthetic
  dataset = synthetic.make_dataset(os.path.join(args.workdir, "videos"), num_videos=args.videos, seed=0,
                                   size=args.source_px, fps_range=(24, 30), duration_range=(40.0, 70.0),
                                   tasks=("captioning",))
  readers, n = _readers(dataset, args.workdir)
  order = np.random.default_rng(0).permutation(n)
  for read in readers.values():        # warm-up: open files, codec set-up
    _decode(*read(int(order[0])))
  results = {(name, kind): [] for name in readers for kind in ("read", "decode")}
  for repeat in range(args.repeats):
    seconds, _ = _interleaved(readers, order, args.read_passes, decode=False)
    for name in readers:
      results[(name, "read")].append(args.read_passes * n / seconds[name])
    seconds, frames = _interleaved(readers, order, 1, decode=True)
    for name in readers:
      results[(name, "decode")].append(frames[name] / seconds[name])
    print(f"repeat {repeat}: " + "  ".join(
        f"{kind} tfds {results[('tfds', kind)][-1]:.1f} legacy {results[('legacy', kind)][-1]:.1f} "
        f"ratio {results[('tfds', kind)][-1] / results[('legacy', kind)][-1]:.3f}" for kind in ("read", "decode")),
        flush=True)
  print(f"{n} videos of {args.source_px} px; per core, median (min..max) over {args.repeats} repeats")
  for kind, unit in (("read", "records/s"), ("decode", "frames/s")):
    ratios = [t / o for t, o in zip(results[("tfds", kind)], results[("legacy", kind)])]
    line = [f"{kind:6s}"]
    for name in readers:
      values = results[(name, kind)]
      line.append(f"{name} {statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f}) {unit}")
    line.append(f"tfds/legacy {statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})")
    print("  ".join(line))
  return 0


if __name__ == "__main__":
  sys.exit(main())
