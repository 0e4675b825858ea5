"""An evaluation benchmark's downloaded copy as a TensorFlow Datasets builder over ArrayRecord, and its reader.

  python tools/prepare_tfds.py benchmark mvbench --download /data/MVBench --data_dir /data/tfds
  python tools/evaluate.py ... --benchmark mvbench --tfds_dir /data/tfds

  from hico_jax.eval import tfds_benchmarks
  tfds_benchmarks.build("mvbench", "/data/MVBench", "/data/tfds")     # -> /data/tfds/eval_benchmark/mvbench/2.0.0
  source = tfds_benchmarks.BenchmarkSource("/data/tfds/eval_benchmark/mvbench/2.0.0")
  source.questions[0], source.video(0)

The same kind of source training reads (hico_jax.data.tfds_longvid): one builder config per benchmark of
hico_jax.eval.benchmarks, the user's download as the manual directory. Two splits:
  test    one example per question, exactly what the benchmark's own loader (`benchmarks.get(name).load`)
          makes of the published files, in its order: prompt, answer, task, qid, start/end and meta (as JSON
          text, so ints, floats, None and dicts come back as they were), `video` the path relative to the
          download, `video_index` the example of `videos` holding it (-1 with `video_error` saying why none:
          a missing file, an unreadable frame folder; the runner records that as it does for the download)
  videos  one example per distinct video, in order of first use: a file's bytes, or a frame folder's images
          (MVBench's episodic_reasoning) in the order read_frames reads them with the folder's frame rate
Several questions often share a video (LVBench's hour-long videos carry ~15 each): its bytes are stored once,
and listing the questions reads none of them. `metadata.json` holds the loader's unreadable rows (`skipped`)
and the questions without a video. A video of 2 GiB or more does not fit a record (one protobuf message):
the build names it. Reading the benchmark's files directly (`--data_root`) stays the simpler
way for most users; this is for keeping evaluation data where the training data is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import numpy as np
import tensorflow_datasets as tfds

from hico_jax.data import tfds_longvid
from hico_jax.eval import benchmarks, frame_folders

BUILDER_NAME = "eval_benchmark"
VERSION = "2.0.0"
KIND_FILE, KIND_FRAMES = "file", "frames"
# A record is one protobuf message, which cannot reach 2 GiB.
MAX_VIDEO_BYTES = 2**31 - 2**24


class EvalBenchmark(tfds.core.GeneratorBasedBuilder):
  """A downloaded benchmark -> split `test` (one example per question, in the benchmark loader's order) and
  split `videos` (each video once)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "Questions as the benchmark's loader makes them; each video's bytes stored once.",
                   "2.0.0": "Every question, videos in their own split, frame folders stored as their images."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"{name} as hico_jax.eval.benchmarks loads it")
                     for name in benchmarks.names()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  The manual directory is the benchmark's downloaded folder, the one the evaluation tool's --data_root names
  (e.g. MVBench: json/<task>.json and video/<source>/...). See hico_jax/eval/benchmarks/<name>.py.
  """

  def __init__(self, *args, log=print, **kwargs):
    self._log = log
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="Evaluation questions, and their videos' bytes once each.",
        features=tfds.features.FeaturesDict({
            "benchmark": text, "task": text, "qid": text, "prompt": text,
            "video": tfds.features.Text(doc="the video's path relative to the downloaded folder"),
            "answer": tfds.features.Text(doc="JSON"), "start": tfds.features.Text(doc="JSON"),
            "end": tfds.features.Text(doc="JSON"), "meta": tfds.features.Text(doc="JSON"),
            "video_index": tfds.features.Scalar(np.int64, doc="test: the `videos` example, -1 for none; "
                                                "videos: its own index"),
            "video_error": tfds.features.Text(doc="test: why the question has no video"),
            "kind": tfds.features.Text(doc="videos: 'file' or 'frames'"),
            "frame_rate": tfds.features.Scalar(np.float64, doc="videos: a frame folder's frames per second"),
            "data": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_),
                                           doc="videos: the file's bytes, or the frame images' bytes in order"),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    questions, bad_rows = benchmarks.get(self.builder_config.name).load(root)
    videos, placed, without = {}, [], []
    for question in questions:
      index, error = -1, ""
      if os.path.isdir(question.video):
        try:
          frame_folders.frame_files(question.video)
          index = videos.setdefault(question.video, len(videos))
        except (OSError, ValueError) as e:     # named as the runner names it, by the path inside the download
          error = f"unreadable frame folder: {e}".replace(question.video, os.path.relpath(question.video, root))
      elif os.path.isfile(question.video):
        index = videos.setdefault(question.video, len(videos))
      else:
        error = f"missing video {os.path.relpath(question.video, root)}"
      placed.append((question, index, error))
      if error:
        without.append(f"{question.qid}: {error}")
    for line in [*bad_rows, *without]:
      self._log(f"skipped {line}")
    if not videos:
      raise ValueError(f"{self.builder_config.name}: no question under {root} has its video (is this the "
                       "benchmark's download?)")
    for path in videos:
      size = (sum(os.path.getsize(os.path.join(path, n)) for n in frame_folders.frame_files(path))
              if os.path.isdir(path) else os.path.getsize(path))
      if size > MAX_VIDEO_BYTES:
        raise ValueError(f"{path} is {size / 2**30:.1f} GiB; a TFDS record holds under 2 GiB: evaluate "
                         f"{self.builder_config.name} from its download (--data_root) instead")
    self.info.metadata["skipped"] = list(bad_rows)
    self.info.metadata["without_video"] = without
    self.info.metadata["num_questions"] = len(questions)
    return {"test": self._generate_examples(root, placed), "videos": self._video_examples(root, videos)}

  def _video_examples(self, root: str, videos: dict):
    empty = {key: "" for key in ("benchmark", "task", "qid", "prompt", "answer", "start", "end", "meta")}
    for path, index in videos.items():
      example = {**empty, "video": os.path.relpath(path, root), "video_index": index, "video_error": "",
                 "kind": KIND_FILE, "frame_rate": 0.0}
      if os.path.isdir(path):
        names = frame_folders.frame_files(path)
        example.update(kind=KIND_FRAMES, frame_rate=frame_folders.frames_per_second(path),
                       data=[_read(os.path.join(path, name)) for name in names])
      else:
        example["data"] = [_read(path)]
      yield index, example

  def _generate_examples(self, root: str, placed: list):
    for number, (question, index, error) in enumerate(placed):
      yield number, {"benchmark": question.benchmark, "task": question.task, "qid": question.qid,
                     "prompt": question.prompt, "video": os.path.relpath(question.video, root),
                     "answer": json.dumps(question.answer), "start": json.dumps(question.start),
                     "end": json.dumps(question.end), "meta": json.dumps(question.meta), "video_index": index,
                     "video_error": error, "kind": "", "frame_rate": 0.0, "data": []}


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def prepare_command(name: str, data_dir: str) -> str:
  return f"python tools/prepare_tfds.py benchmark {name} --download DIR --data_dir {data_dir}"


def build(name: str, data_root: str, data_dir: str, *, log=print, quiet: bool = False) -> str:
  """Prepares benchmark `name` from its download at data_root under data_dir; returns the prepared folder.
  An existing complete build is left as it is."""
  if name not in benchmarks.names():
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(benchmarks.names())}")
  if not os.path.isdir(data_root):
    raise FileNotFoundError(f"no download folder {data_root!r} for {name}")
  with tfds_longvid.quiet_tfds(quiet):
    builder = EvalBenchmark(data_dir=data_dir, config=name, file_format="array_record", log=log)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=data_root))
  return os.fspath(builder.data_dir)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class StoredVideo:
  kind: str                 # KIND_FILE or KIND_FRAMES
  data: list                # [the file's bytes], or the frame images' bytes in their order
  frame_rate: float         # a frame folder's frames per second


class BenchmarkSource:
  """A prepared benchmark: `questions` in the benchmark loader's order (`Question.video` the path relative to
  the download), `bad_rows` the loader's unreadable rows, `video_error[i]` why question i has no video ("" when
  it has), `video(i)` its stored video. Read through `tfds.builder_from_directory(...).as_data_source()`."""

  def __init__(self, path: str):
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
      raise FileNotFoundError(f"no prepared benchmark at {path!r}: prepare it with "
                              "hico_jax.eval.tfds_benchmarks.build(name, data_root, data_dir)")
    builder = tfds.builder_from_directory(path)
    if str(builder.info.version) != VERSION:
      raise ValueError(f"{path} was prepared by version {builder.info.version} of the builder, this code reads "
                       f"{VERSION}: prepare it again")
    self.path = path
    questions = builder.as_data_source(split="test")
    self._videos = builder.as_data_source(split="videos")
    self._lock = threading.Lock()     # decoding threads share one reader
    self.questions, self._video_index, self.video_error = [], [], []
    for i in range(len(questions)):
      example = questions[i]
      self.questions.append(benchmarks.Question(
          benchmark=_text(example["benchmark"]), task=_text(example["task"]), qid=_text(example["qid"]),
          video=_text(example["video"]), prompt=_text(example["prompt"]),
          answer=json.loads(_text(example["answer"])), start=json.loads(_text(example["start"])),
          end=json.loads(_text(example["end"])), meta=json.loads(_text(example["meta"]))))
      self._video_index.append(int(example["video_index"]))
      self.video_error.append(_text(example["video_error"]))
    with open(os.path.join(path, "metadata.json")) as f:
      self.bad_rows = json.load(f)["skipped"]

  def __len__(self) -> int:
    return len(self.questions)

  def video(self, i: int) -> StoredVideo:
    """Question i's video (one with a video_error has none: a ValueError)."""
    if self._video_index[i] < 0:
      raise ValueError(f"question {self.questions[i].qid} has no video: {self.video_error[i]}")
    with self._lock:
      example = self._videos[self._video_index[i]]
    return StoredVideo(kind=_text(example["kind"]), data=[bytes(d) for d in example["data"]],
                       frame_rate=float(example["frame_rate"]))
