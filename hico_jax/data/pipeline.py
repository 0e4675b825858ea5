"""The training input pipeline: a prepared TFDS dataset -> samples -> packed rows -> global arrays on the mesh.

  source   LongVidSource over the TFDS ArrayRecord splits (datasets mixed by their sampling strategies);
           each item is (header dict, list of media bytes)
  host     this host's slice, ds[process_index::process_count], before shuffling: hosts never overlap
  order    a seeded global shuffle, a new order every epoch
  decode   in worker processes: record -> sampled, resized frames (uint8) + token ids + shifted targets
  skip     bad records (corrupt video, malformed annotation, too long) dropped, counted, logged once
  pack     first-fit (or best-fit) packing into rows of `token_budget` tokens and `frame_budget` frames,
           with segment ids and per-sample positions
  batch    this host's rows; zig-zag reordered along the sequence when the mesh has a seq axis

Each row's frames are its samples' frames one after another (every sample brings whole clips of 4: the config
asks for whole clips and `video.whole_clips` pads the counts the reference leaves odd), so the
k-th video placeholder of a row is the k-th visual token of the row's clips: exactly what HiCo.embed does.
Targets are shifted here, per sample, before packing: targets[t] is the label of token t + 1, so no
target ever crosses into the next sample, and zig-zag reordering cannot break the shift.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import grain
import numpy as np

from hico_jax.config_dicts import check_fields
from hico_jax.data import image, image_samples, text, tfds_longvid, video
from hico_jax.data.order import unzigzag, zigzag  # pylint: disable=unused-import  # re-exported
from hico_jax.data.order import zigzag_problem

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class DataConfig:
  shards: str                        # a prepared TFDS dataset (tools/build_shards.py --out), or its data_dir
  tokenizer_dir: str
  image_size: int = 224
  token_budget: int = 32768          # tokens per packed row
  frame_budget: int = 512            # frames per packed row (whole clips)
  max_samples_per_row: int = 64
  sampling: str = "dynamic_fps1"     # or "middle"
  num_frames: int | None = None      # "middle": frames to take
  min_frames: int = 64
  max_frames: int = 512
  template: str = "qwen_2"           # or "plain" (stage 1)
  strategies: tuple = ()             # ((dataset name, sampling strategy), ...) overriding the manifest
  packing: str = "first_fit"         # or "best_fit"
  num_packing_bins: int = 8
  # Image tiles per packed row (S x S each; one image is base + up to 36 tiles, several images one tile each).
  # 0: the stage takes no images. A sample with more tiles than this is skipped and counted, like a video
  # over frame_budget (narrow image_grid_pinpoints to cap the tiles an image asks for instead).
  tile_budget: int = 0
  image_grid_pinpoints: str = "(1x1),...,(6x6)"
  num_workers: int = 0
  seed: int = 0
  num_epochs: int | None = None      # None: repeat forever
  # The model's numbers, given to from_dict by whoever builds the model (HiCoConfig.pipeline_counts()); the
  # defaults are the reference's. The vision tower's frames per clip (model.vit.clip_frames): rows hold whole
  # clips, so frame counts are multiples of it. Placeholders a frame (model.tokens_per_clip / clip_frames) and
  # a tile (HiCoConfig.tokens_per_tile: 64, or a tile's patches where fewer): the model splices exactly that
  # many visual tokens into them, so the data must be written for the model that trains on it.
  clip_frames: int = 4
  visual_tokens_per_frame: int = 16
  tokens_per_tile: int = 64

  @classmethod
  def from_dict(cls, fields, clip_frames: int = 4, visual_tokens_per_frame: int = 16,
                tokens_per_tile: int = 64) -> "DataConfig":
    """`fields`: the config's data section; the rest the model's (`**model_config.pipeline_counts()`)."""
    fields = dict(fields)
    if "clip_frames" in fields:
      raise ValueError("data.clip_frames is the vision tower's: set model.vit.clip_frames instead")
    for name in ("visual_tokens_per_frame", "tokens_per_tile"):
      if name in fields:
        raise ValueError(f"data.{name} is the model's (its merge): set model.tokens_per_clip instead")
    fields.update(clip_frames=clip_frames, visual_tokens_per_frame=visual_tokens_per_frame,
                  tokens_per_tile=tokens_per_tile)
    check_fields(cls, fields, "data")
    if "strategies" in fields:
      fields["strategies"] = tuple(tuple(x) for x in (fields["strategies"].items() if isinstance(
          fields["strategies"], dict) else fields["strategies"]))
    config = cls(**fields)
    # Whole clips (the model encodes clip by clip): the row's budget, and the counts a sample asks
    # for. min_frames is only a floor (stage 2's is 1); video.whole_clips pads a count the floor leaves odd.
    counts = {"frame_budget": config.frame_budget, "num_frames": config.num_frames,
              "max_frames": config.max_frames if config.max_frames > 0 else None}   # <= 0: no cap
    for name, value in counts.items():
      if value is not None and value % config.clip_frames:
        raise ValueError(f"data.{name}={value} must be a multiple of {config.clip_frames} (whole clips)")
    if config.packing not in ("first_fit", "best_fit"):
      raise ValueError(f"data.packing={config.packing!r} is not first_fit or best_fit")
    if config.tile_budget < 0:
      raise ValueError(f"data.tile_budget={config.tile_budget} must be >= 0 (0: the stage takes no images)")
    if config.visual_tokens_per_frame < 1 or config.tokens_per_tile < 1:
      raise ValueError(f"visual tokens a frame ({config.visual_tokens_per_frame}) and a tile "
                       f"({config.tokens_per_tile}) must be >= 1: check model.tokens_per_clip")
    if config.tile_budget and math.isqrt(config.tokens_per_tile) ** 2 != config.tokens_per_tile:
      raise ValueError(f"an image tile of {config.tokens_per_tile} tokens cannot take the anyres layout, which views "
                       "a tile's tokens as a square: set model.tokens_per_clip to a square (the reference's 64)")
    image.grid_pinpoints(config.image_grid_pinpoints, config.image_size)   # a bad string fails here, named
    return config


def sample_frames(media: bytes, header: dict, cfg: DataConfig):
  """A video record's frames as a sample takes them (training and held-out evaluation alike): sampled by the
  reference's rules within the record's start/end, resized (each as it is decoded), in whole clips. Returns
  (frames, decode info)."""
  frames, info = video.decode_frames(media, mode=cfg.sampling, num_frames=cfg.num_frames, min_frames=cfg.min_frames,
                                     max_frames=cfg.max_frames, start=header.get("start"), end=header.get("end"),
                                     size=cfg.image_size, clip_frames=cfg.clip_frames)
  return video.whole_clips(frames, cfg.clip_frames), info


_logged_once: set = set()
# The records this process skipped, by reason: for one summary at the end of a stage instead of one warning a
# record (stage 1 of the default skips 80 multi-turn records by a rule of the reference's plain template).
# Grain's worker processes (num_workers > 0) keep their own; the step's counts still cover every skip.
skipped_by_reason: dict[str, list[str]] = {}


def _log_skip(record_id, reason):
  if record_id not in _logged_once:      # each bad record once per process, however many epochs
    _logged_once.add(record_id)
    skipped_by_reason.setdefault(reason, []).append(record_id)
    logging.info("skipping record %s: %s", record_id, reason)


def reset_skip_log():
  """Forgets the skips recorded so far (a new stage in the same process)."""
  _logged_once.clear()
  skipped_by_reason.clear()


def skip_summary(path: str | None = None) -> str:
  """One line: how many records were skipped, by reason (the three commonest); with `path`, every skipped
  record and its reason are written there and the line names the file. "" when nothing was skipped."""
  if not skipped_by_reason:
    return ""
  total = sum(len(ids) for ids in skipped_by_reason.values())
  ranked = sorted(skipped_by_reason.items(), key=lambda item: -len(item[1]))
  reasons = "; ".join(f"{len(ids)} x {reason[:120]}" for reason, ids in ranked[:3])
  more = f"; {len(ranked) - 3} other reasons" if len(ranked) > 3 else ""
  if path:
    with open(path, "w") as f:
      f.writelines(f"{record_id}\t{reason}\n" for reason, ids in ranked for record_id in ids)
  return f"skipped {total} records: {reasons}{more}" + (f" (all in {path})" if path else "")


class DecodeSample(grain.transforms.Map):
  """(header dict, list of media bytes) -> training sample, or a skip marker {"skip": 1} with the reason logged."""

  def __init__(self, config: DataConfig):
    self.config = config
    self._tokenizer = None

  def map(self, record: tuple) -> dict:
    cfg = self.config
    record_id = "<unparsed>"
    try:
      header, blobs = record
      record_id = f"{header.get('dataset')}/{header['id']}"
      if self._tokenizer is None:                  # loaded in each worker process, not pickled
        from hico_jax.data.tokenizer import load_tokenizer
        self._tokenizer = load_tokenizer(cfg.tokenizer_dir)
      frames = np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
      num_frames = duration = None
      tiles, image_tokens, orders = frames, None, []
      if header["media_type"] == "video":
        frames, info = sample_frames(blobs[0], header, cfg)
        num_frames, duration = len(frames), info["duration"]
        if num_frames > cfg.frame_budget:
          raise text.SampleTooLongError(f"{num_frames} frames exceed data.frame_budget={cfg.frame_budget}")
      elif header["media_type"] == "image":
        tiles, image_tokens, orders = image_samples.decode_images(blobs, header, cfg.image_size, cfg.tile_budget,
                                                                  cfg.image_grid_pinpoints,
                                                                  tokens_per_tile=cfg.tokens_per_tile)
      sample = text.encode_sample(header["conversations"], self._tokenizer, num_frames=num_frames,
                                  duration=duration, template=cfg.template, max_length=cfg.token_budget,
                                  image_tokens=image_tokens, tokens_per_frame=cfg.visual_tokens_per_frame)
    except (ValueError, KeyError, TypeError, IndexError) as e:   # VideoDecodeError, SampleTooLongError are ValueErrors
      _log_skip(record_id, f"{type(e).__name__}: {e}")
      return {"skip": np.int32(1)}
    labels = sample["labels"]
    targets = np.concatenate([labels[1:], [IGNORE]]).astype(np.int32)
    out = {"input_ids": sample["input_ids"].astype(np.int32), "targets": targets, "frames": frames,
           "skip": np.int32(0)}
    if cfg.tile_budget > 0:
      out["tiles"] = tiles
      out["image_order"] = image_samples.image_order(out["input_ids"], orders)
    return out


class _SkipCountingIterator(grain.DatasetIterator):
  def __init__(self, parent, image_size: int, tile_budget: int = 0):
    super().__init__(parent)
    self._pending = 0
    self._image_size = image_size
    self._tile_budget = tile_budget

  def __next__(self):
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        if not self._pending:
          raise
        # A finite stream that ends on bad records has no later sample to carry their count: an empty
        # sample (no tokens, no frames) carries it into the last packed row.
        size = self._image_size
        element = {"input_ids": np.zeros(0, np.int32), "targets": np.zeros(0, np.int32),
                   "frames": np.zeros((0, size, size, 3), np.uint8), "skip": np.int32(0)}
        if self._tile_budget > 0:
          element.update(tiles=element["frames"], image_order=np.zeros(0, np.int32))
      if element["skip"]:
        self._pending += 1
        continue
      element = {k: v for k, v in element.items() if k != "skip"}
      element["num_skipped"], self._pending = np.int32(self._pending), 0
      return element

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = state["pending"]


class SkipCounting(grain.IterDataset):
  """Drops skip markers; the next good sample carries how many were dropped before it (`num_skipped`),
  so the count survives worker processes and packing and arrives with the batch."""

  def __init__(self, parent: grain.IterDataset, image_size: int, tile_budget: int = 0):
    super().__init__(parent)
    self._image_size = image_size
    self._tile_budget = tile_budget

  def __iter__(self):
    return _SkipCountingIterator(self._parent.__iter__(), self._image_size, self._tile_budget)


class FinishBatch(grain.transforms.Map):
  """Packed batch -> the names the trainer uses; zig-zag along the sequence for seq-parallel meshes."""

  def __init__(self, seq_shards: int, tokens_per_frame: int):
    self.seq_shards = seq_shards
    self.tokens_per_frame = tokens_per_frame

  def map(self, batch: dict) -> dict:
    return _finish_batch(batch, self.seq_shards, self.tokens_per_frame)


def _finish_batch(batch: dict, seq_shards: int, tokens_per_frame: int) -> dict:
  """`tokens_per_frame`: DataConfig.visual_tokens_per_frame (a row's video tokens come before its tiles')."""
  out = {
      "input_ids": batch["input_ids"], "targets": batch["targets"],
      "segment_ids": batch["input_ids_segment_ids"], "positions": batch["input_ids_positions"],
      "frames": batch["frames"], "num_skipped": batch["num_skipped"].sum().astype(np.int32),
  }
  if "tiles" in batch:      # rows with images: each placeholder's index in the row's visual tokens
    out["tiles"] = batch["tiles"]
    out["visual_index"] = image_samples.visual_index(out["input_ids"], batch["image_order"], out["segment_ids"],
                                                     frame_budget=batch["frames"].shape[1],
                                                     tokens_per_frame=tokens_per_frame)
  if seq_shards > 1:
    for key in [k for k in ("input_ids", "targets", "segment_ids", "positions", "visual_index") if k in out]:
      out[key] = zigzag(out[key], seq_shards)
  # Padding in packed rows has segment 0 and nothing to predict.
  out["targets"] = np.where(out["segment_ids"] == 0, IGNORE, out["targets"]).astype(np.int32)
  return out


def open_source(config: DataConfig):
  """The mixed random-access source of a config: item i is (header dict, list of media bytes)."""
  return tfds_longvid.LongVidSource(config.shards, dict(config.strategies), config.seed)


def make_dataset(config: DataConfig, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                 seq_shards: int = 1) -> grain.IterDataset:
  """This host's packed batches of `batch_size` rows (the global batch divided by the process count)."""
  if problem := zigzag_problem(config.token_budget, seq_shards):
    raise ValueError(problem)
  source = open_source(config)
  if len(source) < process_count:
    raise ValueError(f"{len(source)} records cannot feed {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.seed(config.seed).shuffle().repeat(config.num_epochs)
  ds = ds.map(DecodeSample(config))
  it = SkipCounting(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)), config.image_size,
                    config.tile_budget)
  packer = (grain.experimental.FirstFitPackIterDataset if config.packing == "first_fit"
            else grain.experimental.BestFitPackIterDataset)
  lengths = {"input_ids": config.token_budget, "targets": config.token_budget,
             "frames": config.frame_budget, "num_skipped": config.max_samples_per_row}
  if config.tile_budget > 0:
    lengths.update(tiles=config.tile_budget, image_order=config.token_budget)
  it = packer(it, length_struct=lengths,
              num_packing_bins=config.num_packing_bins, seed=config.seed, meta_features=("num_skipped",))
  it = it.batch(batch_size, drop_remainder=True)
  it = it.map(FinishBatch(seq_shards, config.visual_tokens_per_frame))
  if config.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=2))
  return it


def to_global(batch: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax Arrays sharded for training (rows over data·fsdp, tokens over
  seq). Every host passes its own rows; jax assembles the global batch. The host's own count of skipped
  records (`num_skipped`) stays behind: the trainer sums the counts over processes when it logs."""
  import jax
  from hico_jax import sharding
  specs = {"input_ids": ("act_batch", "act_len"), "targets": ("act_batch", "act_len"),
           "segment_ids": ("act_batch", "act_len"), "positions": ("act_batch", "act_len"),
           "frames": ("act_batch", None, None, None, None), "tiles": ("act_batch", None, None, None, None),
           "visual_index": ("act_batch", "act_len")}
  out = {}
  for key, names in specs.items():
    if key not in batch:
      continue
    local = batch[key]
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding.named_sharding(mesh, *names), local, global_shape)
  return out
