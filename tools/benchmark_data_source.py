#!/usr/bin/env python
"""Records/s and decoded frames/s per worker core: the TFDS LongVid source against the shard reader it replaced.

  python tools/benchmark_data_source.py --workdir /tmp/bench_source --videos 6 --repeats 9

The baseline is the removed shard format's own code, taken from git history (`git show` of
hico_jax/data/records.py and shards.py at --legacy_commit, the last commit that had them) into
<workdir>/legacy_code: its builder writes shards of the same synthetic annotations the TFDS builder
reads, and its read path is what the training pipeline did per record then, `MixedSource[i]` and then
`records.decode_record`. The TFDS side is `LongVidSource[i]`, what the pipeline does now. Both must give the
same records (checked before timing). One process, one thread, the two readers interleaved record by record
(which goes first alternates), so load from other work on the machine falls on both alike; per repeat it
prints each reader's rate and the TFDS/shards ratio, then the median and the spread (min..max) of each.
  read     every record fetched (header + media bytes) in a seeded random order, `--read_passes` times
  decode   every record fetched, then what a data worker does with a video: dynamic_fps1 sampling
           (64-256 frames), OpenCV decoding, PIL resize to 224
"""

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

# The parent of 9cd54ea ("remove the HICOREC1 shard format"): the last commit with the shard reader.
LEGACY_COMMIT = "aa0489ea4b670223e962b6a5740cf9fea02f9ecc"
LEGACY_IMPORT = "from hico_jax.data import annotations, records"


def load_legacy(commit: str, dest: str):
  """The shard format's modules at `commit`, as the package `legacy_shards` under dest: (shards, records).
  Their one import of each other is pointed at the copy; everything else is the file as committed."""
  package = os.path.join(dest, "legacy_shards")
  os.makedirs(package, exist_ok=True)
  for name in ("records", "shards"):
    try:
      text = subprocess.run(["git", "show", f"{commit}:hico_jax/data/{name}.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
      raise SystemExit(f"benchmark_data_source: cannot read hico_jax/data/{name}.py at {commit} from git "
                       f"({e}): run it in a clone with the project's history") from None
    if name == "shards":
      if LEGACY_IMPORT not in text:
        raise SystemExit(f"benchmark_data_source: shards.py at {commit} lacks {LEGACY_IMPORT!r}")
      text = text.replace(LEGACY_IMPORT, "from hico_jax.data import annotations\nfrom legacy_shards import records")
    with open(os.path.join(package, f"{name}.py"), "w") as f:
      f.write(text)
  open(os.path.join(package, "__init__.py"), "w").close()
  sys.path.insert(0, dest)
  return importlib.import_module("legacy_shards.shards"), importlib.import_module("legacy_shards.records")


def _readers(dataset, root, commit):
  from hico_jax.data import tfds_longvid
  shards, records = load_legacy(commit, os.path.join(root, "legacy_code"))
  tfds_dir, shard_dir = os.path.join(root, "tfds"), os.path.join(root, "shards")
  if not dataset.reused or not tfds_longvid.is_prepared(tfds_dir) or \
      not os.path.exists(os.path.join(shard_dir, shards.MANIFEST)):
    shutil.rmtree(tfds_dir, ignore_errors=True)
    shutil.rmtree(shard_dir, ignore_errors=True)
    tfds_longvid.build(str(dataset), tfds_dir, log=lambda _: None, quiet=True)
    shards.build(str(dataset), shard_dir, log=lambda _: None)
  new, old = tfds_longvid.LongVidSource(tfds_dir), shards.MixedSource(shard_dir)

  def read_old(i):
    header, media = records.decode_record(old[i])
    return header, [media] if media else []

  if len(new) != len(old):
    raise SystemExit(f"benchmark_data_source: {len(new)} TFDS records against {len(old)} in the shards")
  for i in range(len(new)):      # the same records: the shard header held `source` as one path, not a list
    (header, media), (old_header, old_media) = new[i], read_old(i)
    old_header["source"] = [old_header["source"]] if old_header.get("source") else []
    if (header, media) != (old_header, old_media):
      raise SystemExit(f"benchmark_data_source: record {i} differs between the TFDS build and the shards")
  return {"tfds": new.__getitem__, "shards": read_old}, len(new)


def _decode(header, media):
  from hico_jax.data import video
  frames, _ = video.decode_frames(media[0], mode="dynamic_fps1", min_frames=64, max_frames=256,
                                  start=header.get("start"), end=header.get("end"), size=224)
  return len(frames)


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
  parser.add_argument("--videos", type=int, default=6)
  parser.add_argument("--source_px", type=int, default=640)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--read_passes", type=int, default=20)
  parser.add_argument("--no_decode", action="store_true", help="time bare reads only")
  parser.add_argument("--legacy_commit", default=LEGACY_COMMIT, help="the commit to take the shard reader from")
  args = parser.parse_args()
  import cv2
  cv2.setNumThreads(1)                 # one worker core
  from hico_jax.data import synthetic
  dataset = synthetic.make_dataset(os.path.join(args.workdir, "videos"), num_videos=args.videos, seed=0,
                                   size=args.source_px, fps_range=(24, 30), duration_range=(40.0, 70.0),
                                   tasks=("captioning",))
  readers, n = _readers(dataset, args.workdir, args.legacy_commit)
  order = np.random.default_rng(0).permutation(n)
  kinds = ("read",) if args.no_decode else ("read", "decode")
  for read in readers.values():        # warm-up: open files, codec set-up
    _decode(*read(int(order[0])))
  results = {(name, kind): [] for name in readers for kind in kinds}
  for repeat in range(args.repeats):
    seconds, _ = _interleaved(readers, order, args.read_passes, decode=False)
    for name in readers:
      results[(name, "read")].append(args.read_passes * n / seconds[name])
    if "decode" in kinds:
      seconds, frames = _interleaved(readers, order, 1, decode=True)
      for name in readers:
        results[(name, "decode")].append(frames[name] / seconds[name])
    print(f"repeat {repeat}: " + "  ".join(
        f"{kind} tfds {results[('tfds', kind)][-1]:.1f} shards {results[('shards', kind)][-1]:.1f} "
        f"ratio {results[('tfds', kind)][-1] / results[('shards', kind)][-1]:.3f}" for kind in kinds), flush=True)
  sizes = [len(readers["tfds"](i)[1][0]) for i in range(n)]
  print(f"{n} videos of {args.source_px} px ({min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} kB); per core, "
        f"median (min..max) over {args.repeats} repeats; shard reader from {args.legacy_commit[:10]}")
  for kind, unit in (("read", "records/s"), ("decode", "frames/s"))[:len(kinds)]:
    ratios = [t / o for t, o in zip(results[("tfds", kind)], results[("shards", kind)])]
    line = [f"{kind:6s}"]
    for name in readers:
      values = results[(name, kind)]
      line.append(f"{name} {statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f}) {unit}")
    line.append(f"tfds/shards {statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})")
    print("  ".join(line))
  return 0


if __name__ == "__main__":
  sys.exit(main())
