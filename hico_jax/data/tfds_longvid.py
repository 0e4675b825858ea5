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

Reading never imports TensorFlow: `tfds.builder_from_directory(...).as_data_source()` gives the same
ArrayRecord data sources as `tfds.data_source`, found by directory so no registered name is needed.
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
  with contextlib.ExitStack() as stack:
    if quiet:
      stack.enter_context(contextlib.redirect_stdout(io.StringIO()))     # TFDS prints its banners
      stack.enter_context(_progress_bars_off())
      absl_logger = logging.getLogger("absl")
      stack.callback(absl_logger.setLevel, absl_logger.level)
      absl_logger.setLevel(logging.ERROR)                                # "Using custom data configuration"
    builder = LongVid(data_dir=data_dir, config=config, file_format="array_record", log=log)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.dirname(yaml_path)))
  return builder.report


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


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes, pos: int, end: int):
  """(field number, (start, end) of a length-delimited value, or the varint) of one protobuf message."""
  while pos < end:
    tag, pos = _varint(buf, pos)
    number, wire = tag >> 3, tag & 7
    if wire == 2:
      length, pos = _varint(buf, pos)
      yield number, (pos, pos + length)
      pos += length
    elif wire == 0:
      value, pos = _varint(buf, pos)
      yield number, value
    elif wire in (1, 5):              # fixed64 / fixed32 (float_list values); not used by our features
      pos += 8 if wire == 1 else 4
    else:
      raise ValueError(f"unexpected protobuf wire type {wire}")


def _example_features(buf: bytes) -> dict:
  """A serialized tf.train.Example -> {key: [bytes values] or [int64 values]}, each media file copied once.
  Example(1: Features(1: map entry(1: key, 2: Feature(1: BytesList(1: bytes*), 3: Int64List(1: int64*))))."""
  out = {}
  for _, (f_start, f_end) in _fields(buf, 0, len(buf)):                 # Example.features
    for _, (e_start, e_end) in _fields(buf, f_start, f_end):            # Features.feature entries
      key, values = None, []
      for number, span in _fields(buf, e_start, e_end):
        if number == 1:
          key = buf[span[0]:span[1]].decode("utf-8")
          continue
        for kind, (l_start, l_end) in _fields(buf, *span):              # Feature: which list
          for value_number, value in _fields(buf, l_start, l_end):
            if kind == 1:
              values.append(buf[value[0]:value[1]])
            elif kind == 3 and isinstance(value, tuple):                # packed int64s
              pos = value[0]
              while pos < value[1]:
                number_value, pos = _varint(buf, pos)
                values.append(number_value)
            elif kind == 3:
              values.append(value)
      out[key] = values
  return out


def parse_record(serialized: bytes) -> tuple[dict, list]:
  """A record's serialized tf.train.Example -> what to_header gives for TFDS's decoding of it. Read directly
  because TFDS's generic decoding builds numpy arrays of every feature and copies each media file twice
  more, which made a record's read ~3x (small records) to ~2x (MB videos) slower than the shard format it
  replaced (docs/benchmarks.md). The keys are TFDS's flattening of the FeaturesDict above."""
  feature = _example_features(bytes(serialized))

  def texts(key):
    return [v.decode("utf-8") for v in feature.get(key, [])]

  (record_id,), (dataset,), (media_type,) = texts("id"), texts("dataset"), texts("media_type")
  header = {"id": record_id, "index": int(feature["index"][0]), "dataset": dataset, "media_type": media_type,
            "conversations": [{"from": f, "value": v}
                              for f, v in zip(texts("conversations/from"), texts("conversations/value"))],
            "source": texts("source")}
  for key in ("start", "end"):
    (value,) = texts(key)
    if value:
      header[key] = float(value)
  return header, feature.get("media", [])


class LongVidSource:
  """Random access over the records that each dataset's sampling strategy keeps, datasets concatenated in
  the YAML's order (the reference concatenates its sampled lists the same way); item i is (header, list of
  media bytes). Picklable: the TFDS data sources are opened lazily in each process that reads."""

  def __init__(self, path: str, strategies: dict[str, str] | None = None, seed: int = 0):
    self.path = prepared_dir(path)
    with open(os.path.join(self.path, "metadata.json")) as f:
      self.datasets = json.load(f)["datasets"]
    strategies = strategies or {}
    unknown = sorted(set(strategies) - {d["name"] for d in self.datasets})
    if unknown:
      raise ValueError(f"sampling strategies name unknown dataset(s) {unknown}")
    parts = []
    for number, dataset in enumerate(self.datasets):
      kept = np.asarray(dataset["kept"], np.int64)
      chosen = annotations.select(dataset["num_raw"], strategies.get(dataset["name"], dataset["sampling_strategy"]),
                                  seed)
      position = np.searchsorted(kept, chosen)
      present = (position < len(kept)) & (kept[np.minimum(position, len(kept) - 1)] == chosen) if len(kept) else \
          np.zeros(len(chosen), bool)
      parts.append(np.stack([np.full(present.sum(), number), position[present]], axis=1))
    self._index = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    self._sources = None

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> tuple[dict, list]:
    number, position = self._index[i]
    if self._sources is None:       # serialized records; parse_record decodes them
      sources = tfds.builder_from_directory(self.path).as_data_source(
          deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
      self._sources = [sources.get(d["split"]) for d in self.datasets]
    return parse_record(self._sources[number][int(position)])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sources"] = None
    return state
