"""A NIAH download (haystack video, needle JSON files, needle images) as a TFDS builder over ArrayRecord.

  from hico_jax.eval import tfds_niah
  path = tfds_niah.build("/data/niah", "/data/tfds", haystack="video_haystack.mkv",      # -> .../video_haystack/1.0.0
                         single_hop="niah-coco-singlehop_20.json", multi_hop="niah-coco-multihop-100.json")
  chunks = tfds_niah.haystack_chunks(path)              # what niah.haystack_chunks(video) yields
  items, images = tfds_niah.needles(path, "single_hop")  # the published records and their RGB images

The same kind of source training reads (hico_jax.data.tfds_longvid), the user's download as the manual
directory. Every example is an index, images, and a JSON record:
  haystack    one per haystack frame the reference samples (every round(fps)-th, niah.haystack_chunks), the
              frame as lossless PNG (RGB exactly as decoded), record {"frame": its number in the video}
  single_hop  one per published record, in the file's order: its image file's bytes as on disk, the record
  multi_hop   likewise, its `images` in order
The haystack is decoded once here instead of at every evaluation, at the price of its frames' PNG size.
tools/niah.py reading the files directly stays the default; `tools/niah.py --tfds_dir PATH` reads this.
"""

from __future__ import annotations

import dataclasses
import json
import os

import cv2
import numpy as np
import tensorflow_datasets as tfds

from hico_jax.data import tfds_longvid
from hico_jax.data import video as video_lib
from hico_jax.eval import niah

BUILDER_NAME = "niah_haystack"
NEEDLE_KEYS = niah.NEEDLE_KEYS


@dataclasses.dataclass(eq=False)
class NiahConfig(tfds.core.BuilderConfig):
  haystack: str = "video_haystack.mkv"     # inside the manual directory, as are the rest
  single_hop: str = ""                     # the needle JSON files; "" leaves the split out
  multi_hop: str = ""
  image_root: str = ""                     # the needle images' paths are relative to it


class NiahHaystack(tfds.core.GeneratorBasedBuilder):
  """A NIAH download -> splits haystack, single_hop, multi_hop."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Haystack frames at 1 fps as PNG; needle records with their images' bytes."}
  BUILDER_CONFIGS = [NiahConfig(name="default", description="video_haystack.mkv, no needle files")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  The manual directory holds the haystack video, the needle JSON files (the reference's single-hop
  {question, answer, image} and multi-hop {images, question1, answer1, question2, answer2} records) and
  their images; the config names them (hico_jax.eval.tfds_niah.build).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="A NIAH haystack's sampled frames and its needles.",
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(np.int64, doc="position in the haystack at 1 fps, or in the needle file"),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "record": tfds.features.Text(doc="JSON: the published needle record, or the haystack frame's number"),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root, config = os.fspath(dl_manager.manual_dir), self.builder_config
    haystack = os.path.join(root, config.haystack)
    if not os.path.isfile(haystack):
      raise FileNotFoundError(f"no haystack video {haystack!r}: name it in the config, inside the manual dir")
    splits = {"haystack": self._generate_examples("haystack", haystack)}
    for kind in ("single_hop", "multi_hop"):
      if getattr(config, kind):
        path, image_root = os.path.join(root, getattr(config, kind)), os.path.join(root, config.image_root)
        splits[kind] = self._generate_examples(kind, path, _checked_needles(kind, path, image_root), image_root)
    return splits

  def _generate_examples(self, kind: str, path: str, items: list | None = None, image_root: str = ""):
    if kind == "haystack":
      yield from _haystack_examples(path)
      return
    for i, item in enumerate(items):
      images = []
      for image in _image_paths(kind, item):
        with open(os.path.join(image_root, image), "rb") as f:
          images.append(f.read())
      yield i, {"index": i, "images": images, "record": json.dumps(item, ensure_ascii=False)}


def _haystack_examples(path: str):
  capture = cv2.VideoCapture(path)
  step = max(round(capture.get(cv2.CAP_PROP_FPS)), 1)     # niah.haystack_chunks' stride, for the record
  capture.release()
  index = 0
  for chunk in niah.haystack_chunks(path):
    for frame in chunk:
      ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
      if not ok:
        raise ValueError(f"haystack {path}: frame {index * step} does not encode as PNG")
      yield index, {"index": index, "images": [png.tobytes()], "record": json.dumps({"frame": index * step})}
      index += 1


def _checked_needles(kind: str, path: str, image_root: str) -> list:
  """The needle file's records, checked whole before anything is written: one missing its fields or images
  is a one-line error, as tools/niah.py makes it (the benchmark's score counts every record)."""
  with open(path, encoding="utf-8") as f:
    items = json.load(f)
  for i, item in enumerate(items):
    missing = [key for key in NEEDLE_KEYS[kind] if key not in item]
    if missing:
      raise ValueError(f"{path} record {i} has no {missing} (a {kind} record needs {list(NEEDLE_KEYS[kind])})")
    for image in _image_paths(kind, item):
      if not os.path.isfile(os.path.join(image_root, image)):
        raise FileNotFoundError(f"{path} record {i}: needle image {os.path.join(image_root, image)} is missing")
  return items


def _image_paths(kind: str, item: dict) -> list:
  return [item["image"]] if kind == "single_hop" else list(item["images"])


def build(manual_dir: str, data_dir: str, *, haystack: str, single_hop: str = "", multi_hop: str = "",
          image_root: str = "", name: str | None = None, quiet: bool = False) -> str:
  """Prepares a NIAH download under data_dir (niah_haystack/<name>/1.0.0/, name: the haystack's file stem
  unless given); returns that folder. The file names are relative to manual_dir. An existing complete build
  is left as it is."""
  name = name or tfds_longvid.split_name(os.path.splitext(os.path.basename(haystack))[0])
  config = NiahConfig(name=name, haystack=haystack, single_hop=single_hop, multi_hop=multi_hop,
                      image_root=image_root)
  with tfds_longvid.quiet_tfds(quiet):
    builder = NiahHaystack(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_dir)


def _source(path: str, split: str):
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no prepared NIAH data at {path!r}: prepare it with `python tools/prepare_tfds.py niah "
                            "--download DIR --data_dir DIR --haystack FILE --single_hop FILE ...`, which prints "
                            "the folder to give")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"{path} has no {split!r} split (it has {sorted(builder.info.splits)}): prepare it with "
                     f"--{split} FILE")
  return builder.as_data_source(split=split)


def _decode_image(data: bytes, what: str) -> np.ndarray:
  """RGB uint8, as tools/niah.py reads a needle file (cv2.imread, colour)."""
  frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if frame is None:
    raise video_lib.VideoDecodeError(f"{what} does not decode")
  return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def haystack_chunks(path: str, chunk_frames: int = 64):
  """The prepared haystack, `chunk_frames` uint8 RGB frames at a time: niah.haystack_chunks of the video."""
  source = _source(path, "haystack")
  frames = []
  for i in range(len(source)):
    (png,) = source[i]["images"]
    frames.append(_decode_image(bytes(png), f"{path} haystack frame {i}"))
    if len(frames) == chunk_frames:
      yield np.stack(frames)
      frames = []
  if frames:
    yield np.stack(frames)


def needles(path: str, kind: str) -> tuple[list, list]:
  """(the published records, their images): one RGB array per single-hop record, a list per multi-hop one."""
  if kind not in NEEDLE_KEYS:
    raise ValueError(f"kind must be one of {list(NEEDLE_KEYS)}, got {kind!r}")
  source = _source(path, kind)
  items, images = [], []
  for i in range(len(source)):
    example = source[i]
    record = example["record"]
    items.append(json.loads(record.decode("utf-8") if isinstance(record, bytes) else str(record)))
    decoded = [_decode_image(bytes(data), f"{path} {kind} record {i} image") for data in example["images"]]
    images.append(decoded[0] if kind == "single_hop" else decoded)
  return items, images
