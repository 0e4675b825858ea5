"""LongVid-format training data as a TensorFlow Datasets builder over ArrayRecord, and its reader for Grain.

  python tools/build_shards.py --data data/mine/data.yaml --out data/mine/tfds

The manual directory holds the annotation YAML (hico_jax.data.annotations: a list of LLaVA/LongVid JSON(L)
datasets) and the media its records name. The builder config names the YAML (default `data.yaml`); each
dataset of the YAML becomes one split of the same name. Why splits and not one builder config per dataset:
TFDS configs are fixed when the module is imported, while a user's YAML is not; splits are TFDS's own
unit of named subsets, each with its count in one `dataset_info.json`, built in one run and read with
`as_data_source(split=...)`.

Each example holds the record's id, its annotation index, the dataset name, the media type, the
conversation turns, the media files' bytes exactly as on disk (a sequence, so a record may carry several
images), their paths as the annotation wrote them, and start/end seconds (exact text, empty when absent). Bad records
(malformed lines, conversations that do not alternate, missing or undecodable media) are left out; the
skip report (dataset, id, reason) and each dataset's annotation length and kept indices go to the
dataset's `metadata.json`, so sampling strategies (first:N, end:P%, random:N) select over the annotation's
own numbering at read time and one build serves every mix. TFDS writes into an `incomplete.*` directory
and renames it when done, so a crash never leaves a dataset that looks finished. Media checks (the
expensive part: opening each video and decoding its first frame) run on a thread pool, since TFDS
without Beam writes each split from one generator.

Reading never imports TensorFlow: `tfds.builder_from_directory(...)` finds the build by directory (no
registered name needed), and LongVidSource reads the ArrayRecord files its dataset info names, the records
`tfds.data_source` would serve, in its order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import io
import json
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from hico_jax.data import annotations

BUILDER_NAME = "long_vid"
MEDIA_TYPES = ("video", "image", "text")


@dataclasses.dataclass
class BuildReport:
  taken: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)   # reason -> count
  skipped_ids: list = dataclasses.field(default_factory=list)                            # (dataset, id, reason)

  def summary(self) -> str:
    lines = [f"{name}: {count} records" for name, count in sorted(self.taken.items())]
    lines.append(f"taken {sum(self.taken.values())}, skipped {sum(self.skipped.values())}")
    lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.most_common()]
    return "\n".join(lines)


@dataclasses.dataclass(eq=False)
class LongVidConfig(tfds.core.BuilderConfig):
  annotation_yaml: str = "data.yaml"    # inside the manual directory
  verify_media: bool = True             # decode each video's first frame while building
  num_threads: int = 8                  # media checks in parallel


def _media(record: dict, spec: annotations.DatasetSpec) -> tuple[str, list, list]:
  """(media type, paths as annotated, paths on disk) of a record: one video, one or several images, or none
  (text)."""
  for kind in ("video", "image"):
    if kind in record:
      value = record[kind]
      if isinstance(value, list):
        if not value or (kind == "video" and len(value) != 1):
          raise ValueError(f"{kind} lists of {len(value)} files are not supported (one video per sample, "
                           "one or more images)")
      else:
        value = [value]
      if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{kind} paths must be non-empty strings, got {value!r}")
      return kind, list(value), [os.path.join(spec.data_root, v) for v in value]
  return "text", [], []


def _bad_times(record: dict) -> str | None:
  for key in ("start", "end"):
    if record.get(key) is not None:
      try:
        float(record[key])
      except (TypeError, ValueError):
        return f"{key} {record[key]!r} is not a number of seconds"
  return None


def _readable_video(path: str) -> str | None:
  """Why OpenCV cannot read a first frame of the video, or None when it can."""
  import cv2  # only the builder needs it
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      return "video cannot be opened"
    ok, _ = capture.read()
    return None if ok else "video has no decodable frame"
  finally:
    capture.release()


def _media_problem(media_type: str, paths: list, verify: bool) -> str | None:
  for path in paths:
    if not os.path.isfile(path):
      return f"{media_type} file missing: {path}"
    if verify and media_type == "video":
      reason = _readable_video(path)
      if reason:
        return reason
  return None


def split_name(dataset_name: str) -> str:
  """A dataset name as a TFDS split name: split strings have their own syntax (`a+b`, `a[:10%]`)."""
  return re.sub(r"[^\w-]", "_", dataset_name)


class LongVid(tfds.core.GeneratorBasedBuilder):
  """LongVid/LLaVA annotations + media -> one split per dataset of the annotation YAML."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Conversation, media bytes, media type, start/end, record id and index."}
  BUILDER_CONFIGS = [LongVidConfig(name="default", description="the manual directory's data.yaml")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  The manual directory holds the annotation YAML (`data.yaml` unless the config names another) listing
  LLaVA/LongVid JSON(L) annotation files, and the media those records name (paths relative to the YAML and
  each dataset's data_root). See docs/data.md.
  """

  def __init__(self, *args, log=print, **kwargs):
    self._log = log
    self.report = BuildReport()
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="LongVid/LLaVA-format conversations with their media files' bytes.",
        features=tfds.features.FeaturesDict({
            "id": text,
            "index": tfds.features.Scalar(np.int64, doc="the record's position in its annotation file"),
            "dataset": text,
            "media_type": text,
            "conversations": tfds.features.Sequence({"from": text, "value": text}),
            "media": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "source": tfds.features.Sequence(text),
            # Seconds as decimal text, "" when absent: an Example has no float64, and float32 would move
            # the boundaries (and the frames sampled) of long videos away from what the annotation says.
            "start": tfds.features.Text(doc="seconds, repr of a float; empty when the record has none"),
            "end": tfds.features.Text(doc="seconds, repr of a float; empty when the record has none"),
        }),
        disable_shuffling=True,        # annotation order, so kept indices map to positions by search
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    yaml_path = os.path.join(os.fspath(dl_manager.manual_dir), self.builder_config.annotation_yaml)
    if not os.path.isfile(yaml_path):
      raise FileNotFoundError(f"no annotation YAML {yaml_path!r}: pass the directory holding it as the manual dir")
    datasets, splits = [], {}
    for spec in annotations.load_dataset_list(yaml_path):
      kept, num_raw = self._scan(spec)
      name = split_name(spec.name)
      if name in splits or any(d["split"] == name for d in datasets):
        raise ValueError(f"{yaml_path}: datasets {spec.name!r} and another map to the same split name {name!r}")
      self.report.taken[spec.name] = len(kept)
      datasets.append({"name": spec.name, "split": name, "json_path": spec.json_path, "num_raw": num_raw,
                       "sampling_strategy": spec.sampling_strategy, "kept": [k[0] for k in kept]})
      if kept:                   # TFDS cannot write an empty split; the metadata still names the dataset
        splits[name] = self._generate_examples(spec, kept)
    self.info.metadata["datasets"] = datasets
    self.info.metadata["skipped"] = [list(s) for s in self.report.skipped_ids]
    if not splits:
      raise ValueError(f"{yaml_path}: every record was skipped:\n{self.report.summary()}")
    return splits

  def _scan(self, spec: annotations.DatasetSpec) -> tuple[list, int]:
    """The records of one dataset that can be trained on, [(index, record, media type, sources, paths)], and
    the annotation's length; every other record is reported with its reason."""
    candidates, problems, num_raw = [], {}, 0
    for index, record, error in annotations.read_records(spec.json_path):
      num_raw = index + 1
      record_id = (record or {}).get("id", f"{spec.name}:{index}")
      reason = error or annotations.check_conversations(record) or _bad_times(record)
      if reason is None:
        try:
          candidates.append((index, record_id, record) + _media(record, spec))
          continue
        except ValueError as e:
          reason = str(e)
      problems[index] = (record_id, reason)
    config = self.builder_config
    with concurrent.futures.ThreadPoolExecutor(max(1, config.num_threads)) as pool:
      checks = pool.map(lambda c: _media_problem(c[3], c[5], config.verify_media), candidates)
      kept = []
      for candidate, reason in zip(candidates, checks):
        if reason is None:
          index, _, record, media_type, sources, paths = candidate
          kept.append((index, record, media_type, sources, paths))
        else:
          problems[candidate[0]] = (candidate[1], reason)
    for index in sorted(problems):                 # reported in annotation order, as they were read
      record_id, reason = problems[index]
      self.report.skipped[reason] += 1
      self.report.skipped_ids.append((spec.name, record_id, reason))
      self._log(f"skipped {spec.name} record {record_id} (#{index}): {reason}")
    return kept, num_raw

  def _generate_examples(self, spec: annotations.DatasetSpec, kept: list):
    for index, record, media_type, sources, paths in kept:
      media = []
      for path in paths:
        with open(path, "rb") as f:
          media.append(f.read())
      times = {}
      for key in ("start", "end"):
        times[key] = repr(float(record[key])) if record.get(key) is not None else ""
      yield index, {"id": str(record.get("id", f"{spec.name}:{index}")), "index": index, "dataset": spec.name,
                    "media_type": media_type, "media": media, "source": sources,
                    "conversations": [{"from": t["from"], "value": t["value"]} for t in record["conversations"]],
                    **times}


def build(yaml_path: str, data_dir: str, *, verify_media: bool = True, num_threads: int = 8,
          log=print, quiet: bool = False) -> BuildReport:
  """Prepares the datasets of a YAML list under data_dir (TFDS layout: long_vid/<yaml stem>/<version>/);
  returns what was taken and skipped, and why. An existing complete build is left as it is. quiet: no
  TFDS progress bars, banners or config warnings (the report still goes to `log`)."""
  yaml_path = os.path.abspath(yaml_path)
  config = LongVidConfig(name=split_name(os.path.splitext(os.path.basename(yaml_path))[0]),
                         annotation_yaml=os.path.basename(yaml_path), verify_media=verify_media,
                         num_threads=num_threads)
  with quiet_tfds(quiet):
    builder = LongVid(data_dir=data_dir, config=config, file_format="array_record", log=log)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.dirname(yaml_path)))
  return builder.report


@contextlib.contextmanager
def quiet_tfds(quiet: bool = True):
  """While preparing: no TFDS banners, progress bars or "Using custom data configuration" warnings."""
  with contextlib.ExitStack() as stack:
    if quiet:
      stack.enter_context(contextlib.redirect_stdout(io.StringIO()))     # TFDS prints its banners
      stack.enter_context(_progress_bars_off())
      absl_logger = logging.getLogger("absl")
      stack.callback(absl_logger.setLevel, absl_logger.level)
      absl_logger.setLevel(logging.ERROR)
    yield


@contextlib.contextmanager
def _progress_bars_off():
  from tensorflow_datasets.core.utils import tqdm_utils
  enabled = tqdm_utils._active          # pylint: disable=protected-access  # TFDS has no getter
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(enabled)


def prepared_dir(path: str) -> str:
  """The directory of a prepared dataset: `path` itself, or the one complete build under a data_dir."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, BUILDER_NAME, "*", "*", "dataset_info.json"))
                 if not os.path.basename(os.path.dirname(p)).startswith("incomplete"))
  if not found:
    raise FileNotFoundError(f"no prepared {BUILDER_NAME} dataset under {path!r}: build it with "
                            f"tools/build_shards.py --data <annotation yaml> --out {path}")
  if len(found) > 1:
    raise ValueError(f"{path!r} holds several prepared datasets {found}: name one of them")
  return found[0]


def is_prepared(path: str) -> bool:
  try:
    prepared_dir(path)
    return True
  except (FileNotFoundError, ValueError):
    return False


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_header(example: dict) -> tuple[dict, list]:
  """An example as TFDS decodes it -> (header dict, list of media bytes): what the pipeline's per-record
  transform takes."""
  turns = example["conversations"]
  header = {"id": _text(example["id"]), "index": int(example["index"]), "dataset": _text(example["dataset"]),
            "media_type": _text(example["media_type"]),
            "conversations": [{"from": _text(f), "value": _text(v)} for f, v in zip(turns["from"], turns["value"])],
            "source": [_text(s) for s in example["source"]]}
  for key in ("start", "end"):
    if _text(example[key]):
      header[key] = float(_text(example[key]))
  return header, [bytes(m) for m in example["media"]]


def _varint(buf: bytes, pos: int, first: int) -> tuple[int, int]:
  """The value of a varint whose first byte, `first` (>= 0x80), was already read, and the position after it."""
  result, shift = first & 0x7F, 7
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7


def _example_features(buf: bytes) -> dict:
  """A serialized tf.train.Example -> {key: [bytes values] or [int64 values]}, each media file copied once.

  Example(1: Features(1: map entry(1: key, 2: Feature(1: BytesList(1: bytes*), 3: Int64List(1: int64*))))).
  One flat loop rather than a generic field iterator: a record's ~10 features and ~20 values made the
  generic one's generator calls cost more than reading the record (docs/benchmarks.md). Every field number
  here is below 16, so each tag is one byte; lengths and ints are varints of any size, read inline when they
  fit one byte. Entries may come in any order (a repeated key: the last wins, as for a protobuf map); a
  float_list feature, no part of ours, has no values here; anything else is an error."""
  out = {}
  pos, end = 0, len(buf)
  while pos < end:
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length >= 0x80:
      length, pos = _varint(buf, pos, length)
    if tag != 0x0A:                                      # Example has one field, features
      raise ValueError(f"not a tf.train.Example: field tag {tag:#x} at byte {pos}")
    features_end = pos + length
    while pos < features_end:                            # Features.feature: one map entry each
      tag, length = buf[pos], buf[pos + 1]
      pos += 2
      if length >= 0x80:
        length, pos = _varint(buf, pos, length)
      if tag != 0x0A:
        raise ValueError(f"not a tf.train.Features entry: field tag {tag:#x} at byte {pos}")
      entry_end = pos + length
      key, values = "", []
      while pos < entry_end:
        tag, length = buf[pos], buf[pos + 1]
        pos += 2
        if length >= 0x80:
          length, pos = _varint(buf, pos, length)
        if tag == 0x0A:                                  # the key
          key = buf[pos:pos + length].decode("utf-8")
          pos += length
          continue
        if tag != 0x12:
          raise ValueError(f"not a tf.train.Features entry: field tag {tag:#x} at byte {pos}")
        feature_end, values = pos + length, []           # the Feature: one of its lists
        while pos < feature_end:
          kind, length = buf[pos], buf[pos + 1]
          pos += 2
          if length >= 0x80:
            length, pos = _varint(buf, pos, length)
          list_end = pos + length
          if kind == 0x0A:                               # bytes_list: (tag, length, bytes)*
            while pos < list_end:
              length = buf[pos + 1]
              pos += 2
              if length >= 0x80:
                length, pos = _varint(buf, pos, length)
              values.append(buf[pos:pos + length])
              pos += length
          elif kind == 0x1A:                             # int64_list: packed (tag 0x0A) or one by one (0x08)
            while pos < list_end:
              tag = buf[pos]
              pos += 1
              if tag == 0x0A:
                length = buf[pos]
                pos += 1
                if length >= 0x80:
                  length, pos = _varint(buf, pos, length)
                stop = pos + length
              elif tag == 0x08:
                stop = pos + 1                           # one varint, however long
              else:
                raise ValueError(f"not a tf.train.Int64List: field tag {tag:#x} at byte {pos}")
              while pos < stop:
                value = buf[pos]
                pos += 1
                if value >= 0x80:
                  value, pos = _varint(buf, pos, value)
                values.append(value - (1 << 64) if value >= 1 << 63 else value)
          elif kind == 0x12:                             # float_list
            pos = list_end
          else:
            raise ValueError(f"not a tf.train.Feature: field tag {kind:#x} at byte {pos}")
      out[key] = values
  return out


def parse_record(serialized: bytes) -> tuple[dict, list]:
  """A record's serialized tf.train.Example -> what to_header gives for TFDS's decoding of it. Read directly
  because TFDS's generic decoding builds numpy arrays of every feature and copies each media file twice
  more, which made a record's read ~3x (small records) to ~2x (MB videos) slower than the shard format it
  replaced (docs/benchmarks.md). The keys are TFDS's flattening of the FeaturesDict above."""
  feature = _example_features(serialized if isinstance(serialized, bytes) else bytes(serialized))
  start, end = feature["start"][0], feature["end"][0]
  header = {"id": feature["id"][0].decode("utf-8"), "index": feature["index"][0],
            "dataset": feature["dataset"][0].decode("utf-8"), "media_type": feature["media_type"][0].decode("utf-8"),
            "conversations": [{"from": f.decode("utf-8"), "value": v.decode("utf-8")}
                              for f, v in zip(feature.get("conversations/from", ()),
                                              feature.get("conversations/value", ()))],
            "source": [s.decode("utf-8") for s in feature.get("source", ())]}
  if start:
    header["start"] = float(start.decode("ascii"))
  if end:
    header["end"] = float(end.decode("ascii"))
  return header, feature.get("media", [])


class LongVidSource:
  """Random access over the records that each dataset's sampling strategy keeps, datasets concatenated in
  the YAML's order (the reference concatenates its sampled lists the same way); item i is (header, list of
  media bytes).

  The records are those `tfds.data_source` serves, in its order: each split's files and their record counts
  come from TFDS's own dataset info (its file instructions). They are read with array_record's reader,
  opened with the options array_record's data source uses for random access, straight into parse_record:
  the two data-source layers between (TFDS's deserialisation switch, array_record's key -> file lookup)
  cost as much again as the parsing on a small record. Picklable: files are opened lazily in each process
  that reads."""

  def __init__(self, path: str, strategies: dict[str, str] | None = None, seed: int = 0):
    self.path = prepared_dir(path)
    with open(os.path.join(self.path, "metadata.json")) as f:
      self.datasets = json.load(f)["datasets"]
    strategies = strategies or {}
    unknown = sorted(set(strategies) - {d["name"] for d in self.datasets})
    if unknown:
      raise ValueError(f"sampling strategies name unknown dataset(s) {unknown}")
    splits = tfds.builder_from_directory(self.path).info.splits
    self._files, parts = [], []
    for dataset in self.datasets:
      kept = np.asarray(dataset["kept"], np.int64)
      chosen = annotations.select(dataset["num_raw"], strategies.get(dataset["name"], dataset["sampling_strategy"]),
                                  seed)
      if not len(kept):             # TFDS wrote no split for it: nothing to choose from
        continue
      position = np.searchsorted(kept, chosen)          # in the split, where the chosen indices were kept
      position = position[(position < len(kept)) & (kept[np.minimum(position, len(kept) - 1)] == chosen)]
      instructions = splits[dataset["split"]].file_instructions
      if sum(fi.take for fi in instructions) != len(kept):
        raise ValueError(f"{self.path}: split {dataset['split']!r} holds {sum(fi.take for fi in instructions)} "
                         f"records where metadata.json keeps {len(kept)}: the build is damaged, rebuild it")
      takes = np.asarray([fi.take for fi in instructions], np.int64)
      skips = np.asarray([fi.skip for fi in instructions], np.int64)
      shard = np.searchsorted(np.cumsum(takes), position, side="right")
      in_file = skips[shard] + position - (np.cumsum(takes) - takes)[shard]
      parts.append(np.stack([len(self._files) + shard, in_file], axis=1))
      self._files += [fi.filename for fi in instructions]
    self._rows = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)    # (file, record in file)
    self._readers = None

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> tuple[dict, list]:
    file, position = self._rows[i].tolist()
    if self._readers is None:
      self._readers = [None] * len(self._files)
    reader = self._readers[file]
    if reader is None:
      reader = self._readers[file] = ArrayRecordReader(self._files[file], options="readahead_buffer_size:0",
                                                       file_reader_buffer_size=32768)
    return parse_record(reader.read([position])[0])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = None        # file handles do not cross process boundaries
    return state
