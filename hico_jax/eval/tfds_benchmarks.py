"""An evaluation benchmark's downloaded copy as a TensorFlow Datasets builder over ArrayRecord, and its reader.

  from hico_jax.eval import tfds_benchmarks
  tfds_benchmarks.build("mvbench", "/data/MVBench", "/data/tfds")     # -> /data/tfds/eval_benchmark/mvbench/1.0.0
  source = tfds_benchmarks.BenchmarkSource("/data/tfds/eval_benchmark/mvbench/1.0.0")
  question, video_bytes = source[0]

The same kind of source training reads (hico_jax.data.tfds_longvid): one builder config per benchmark of
hico_jax.eval.benchmarks, the user's download as the manual directory. The questions are exactly what the
benchmark's own loader (`benchmarks.get(name).load`) makes of the published files, in its order: prompt,
answer, task, qid, start/end and meta (as JSON text, so ints, floats, None and dicts come back as they were),
with `video` the file's path relative to the download. Several questions often share one video (LVBench's
hour-long videos carry ~15 each): its bytes are stored once, in the record of its first question, and the
others name that record (`video_record`). Questions whose video is missing or is a folder of frames
(MVBench's episodic_reasoning) are left out, and with the loader's unreadable rows named in
`metadata.json`'s `skipped`. Reading the benchmark's files directly (`--data_root`, the runner's default)
stays the simpler way for most users; this is for keeping evaluation data where the training data is.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from hico_jax.data import tfds_longvid
from hico_jax.eval import benchmarks

BUILDER_NAME = "eval_benchmark"


class EvalBenchmark(tfds.core.GeneratorBasedBuilder):
  """A downloaded benchmark -> split `test`: one example per question, in the benchmark loader's order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Questions as the benchmark's loader makes them; each video's bytes stored once."}
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
        description="Evaluation questions with their videos' bytes.",
        features=tfds.features.FeaturesDict({
            "benchmark": text, "task": text, "qid": text, "prompt": text,
            "video": tfds.features.Text(doc="the video's path relative to the downloaded folder"),
            "answer": tfds.features.Text(doc="JSON"), "start": tfds.features.Text(doc="JSON"),
            "end": tfds.features.Text(doc="JSON"), "meta": tfds.features.Text(doc="JSON"),
            # The video file's bytes in the first question of the video, none in the others.
            "video_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "video_record": tfds.features.Scalar(np.int64, doc="the record holding this question's video bytes"),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    questions, bad_rows = benchmarks.get(self.builder_config.name).load(root)
    kept, skipped = [], list(bad_rows)
    for question in questions:
      if os.path.isdir(question.video):
        skipped.append(f"{question.qid}: frame folder, not a video file: {question.video}")
      elif not os.path.isfile(question.video):
        skipped.append(f"{question.qid}: missing video {question.video}")
      else:
        kept.append(question)
    for line in skipped:
      self._log(f"skipped {line}")
    if not kept:
      raise ValueError(f"{self.builder_config.name}: no question under {root} has its video")
    self.info.metadata["skipped"] = skipped
    self.info.metadata["num_questions"] = len(questions)
    return {"test": self._generate_examples(root, kept)}

  def _generate_examples(self, root: str, questions: list):
    first = {}
    for number, question in enumerate(questions):
      record = first.setdefault(question.video, number)
      video_bytes = []
      if record == number:
        with open(question.video, "rb") as f:
          video_bytes.append(f.read())
      yield number, {"benchmark": question.benchmark, "task": question.task, "qid": question.qid,
                     "prompt": question.prompt, "video": os.path.relpath(question.video, root),
                     "answer": json.dumps(question.answer), "start": json.dumps(question.start),
                     "end": json.dumps(question.end), "meta": json.dumps(question.meta),
                     "video_bytes": video_bytes, "video_record": record}


def build(name: str, data_root: str, data_dir: str, *, log=print, quiet: bool = False) -> str:
  """Prepares benchmark `name` from its download at data_root under data_dir; returns the prepared folder.
  An existing complete build is left as it is."""
  if name not in benchmarks.names():
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(benchmarks.names())}")
  with tfds_longvid.quiet_tfds(quiet):
    builder = EvalBenchmark(data_dir=data_dir, config=name, file_format="array_record", log=log)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=data_root))
  return os.fspath(builder.data_dir)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class BenchmarkSource:
  """Random access to a prepared benchmark: item i is (Question, the video file's bytes), in the benchmark
  loader's order. Read through `tfds.builder_from_directory(...).as_data_source()`, TFDS's own decoding:
  here a record costs nothing beside decoding its video. `Question.video` is the path relative to the
  download."""

  def __init__(self, path: str):
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
      raise FileNotFoundError(f"no prepared benchmark at {path!r}: build it with "
                              "hico_jax.eval.tfds_benchmarks.build(name, data_root, data_dir)")
    self.path = path
    self._source = tfds.builder_from_directory(path).as_data_source(split="test")
    with open(os.path.join(path, "metadata.json")) as f:
      self.skipped = json.load(f)["skipped"]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> tuple[benchmarks.Question, bytes]:
    example = self._source[i]
    question = benchmarks.Question(
        benchmark=_text(example["benchmark"]), task=_text(example["task"]), qid=_text(example["qid"]),
        video=_text(example["video"]), prompt=_text(example["prompt"]), answer=json.loads(_text(example["answer"])),
        start=json.loads(_text(example["start"])), end=json.loads(_text(example["end"])),
        meta=json.loads(_text(example["meta"])))
    record = int(example["video_record"])
    (video_bytes,) = (example if record == i else self._source[record])["video_bytes"]
    return question, bytes(video_bytes)
