"""The user entry points over prepared TFDS data: an evaluation through `--tfds_dir` gives the records the same
run gives from the download (same questions, prompts, frames, answers and scores), and NIAH through a prepared
haystack writes the records the files give. Fixtures in the published layouts (test_evaluate's MVBench with a
missing video and a broken row, LVBench's spans, MVBench's TVQA frame folders), prepared with
tools/prepare_tfds.py's program, the tiny random models of the eval and NIAH tests.

The reference is the download path itself, pinned against hand counts and the official code in
test_evaluate.py, test_eval_frame_folders.py and test_niah.py."""

import json
import os

import numpy as np
import pytest

from hico_jax.cli import niah as niah_tool
from hico_jax.cli import prepare_tfds
from hico_jax.eval import results as results_io, runner, sources
from tests.test_eval_frame_folders import EPISODIC_ROWS, write_frames
from tests.test_evaluate import _json, loaded, make_lvbench, make_mvbench, model_dir  # noqa: F401  (fixtures)
from tests.test_niah import niah_files, saved_model  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
  """MVBench (with a missing video, a row without candidates, and two TVQA frame folders: one readable, one
  with a stray file) and LVBench (time spans), as published; and both prepared under one TFDS data_dir."""
  root = tmp_path_factory.mktemp("downloads")
  make_mvbench(root / "mvbench")
  # A span of 3 s at 3 fps: 8 frames, as the mp4s give (one compiled program for the run).
  _json(root / "mvbench/json/episodic_reasoning.json", [{**EPISODIC_ROWS[1], "start": 0.0, "end": 3.0},
                                                        EPISODIC_ROWS[2]])
  frames = root / "mvbench/video/tvqa/frames_fps3_hq"
  write_frames(str(frames / "house_s01e02_seg02_clip_00"), 12, lambda i: f"house_s01e02_seg02_clip_00_{i:05d}",
               ".png")
  write_frames(str(frames / "stray_file_clip"), 20, lambda i: f"s_{i}", ".jpg")
  (frames / "stray_file_clip" / "Thumbs.db").write_bytes(b"\0")
  make_lvbench(root / "lvbench")
  for name in ("mvbench", "lvbench"):
    assert prepare_tfds.main(["benchmark", name, "--download", str(root / name), "--data_dir",
                              str(root / "tfds"), "--quiet"]) == 0
  return root


def _run(loaded, out, names, chosen):     # noqa: F811
  model, tokenizer = loaded
  run = runner.Runner(model, tokenizer, str(out), runner.Options(batch_size=2, progress=False))
  for name in names:
    run.run(name, chosen[name])
  return runner.summarize(str(out), names, chosen, "tiny")


def test_an_evaluation_through_the_prepared_benchmarks_gives_the_downloads_records(loaded, downloads, tmp_path):  # noqa: F811
  names = ["mvbench", "lvbench"]
  from_files = sources.resolve(names, data_roots=[str(downloads)])
  from_tfds = sources.resolve(names, tfds_dirs=[str(downloads / "tfds")])
  assert {type(s) for s in from_files.values()} == {sources.DownloadSource}
  assert {type(s) for s in from_tfds.values()} == {sources.PreparedSource}
  for name in names:       # the model's input, question by question: frames decoded from the stored bytes
    questions, _ = from_files[name].load()
    for q, p in zip(questions, from_tfds[name].load()[0]):
      want, got = from_files[name].decode(q, 512, 32), from_tfds[name].decode(p, 512, 32)
      assert (got.duration, got.error == "") == (want.duration, want.error == "")
      if want.pixels is not None:
        np.testing.assert_array_equal(got.pixels, want.pixels)
  want = _run(loaded, tmp_path / "files", names, from_files)
  got = _run(loaded, tmp_path / "tfds", names, from_tfds)

  def relative(value, name):      # a prepared record names the video by its path inside the download
    return json.loads(json.dumps(value).replace(str(downloads / name) + os.sep, ""))

  for name, summary in zip(names, want):
    files = results_io.read_records(str(tmp_path / "files"), name)
    prepared = results_io.read_records(str(tmp_path / "tfds"), name)
    assert list(prepared) == list(files)                 # the same questions, in the same order
    assert prepared == relative(files, name)             # prompt, frames, answer, parse and score alike
    assert got[names.index(name)] == relative(summary, name)
  by_qid = results_io.read_records(str(tmp_path / "tfds"), "mvbench")
  # What the run had to cover: a frame folder answered (at 8 frames), a stray file and a missing video
  # recorded as such, the spans of LVBench.
  assert (by_qid["episodic_reasoning/0"]["status"], by_qid["episodic_reasoning/0"]["num_frames"]) == ("answered", 8)
  assert "Thumbs.db" in by_qid["episodic_reasoning/1"]["error"]
  assert by_qid["action_count/2"]["error"] == "missing video video/perception/videos/gone.mp4"
  assert got[0]["unreadable_rows"] and got[0]["overall"] == want[0]["overall"]
  assert (tmp_path / "tfds" / "summary.md").read_text() == (tmp_path / "files" / "summary.md").read_text()


def test_a_missing_prepared_benchmark_and_a_benchmark_with_two_sources_are_one_line_errors(downloads, tmp_path):
  source = sources.resolve(["mvbench", "videomme"], data_roots=[f"mvbench={downloads / 'mvbench'}"],
                           tfds_dirs=[str(tmp_path)])["videomme"]
  with pytest.raises(FileNotFoundError) as error:
    source.load()
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"no prepared videomme at {tmp_path}")
  assert f"python tools/prepare_tfds.py benchmark videomme --download DIR --data_dir {tmp_path}" in message
  with pytest.raises(ValueError, match="mvbench is named by both --data_root and --tfds_dir"):
    sources.resolve(["mvbench"], [f"mvbench={downloads}"], [f"mvbench={tmp_path}"])
  with pytest.raises(ValueError, match="mvbench could read --data_root .* or --tfds_dir"):
    sources.resolve(["mvbench"], [str(downloads)], [str(tmp_path)])
  with pytest.raises(ValueError, match="no --data_root or --tfds_dir for lvbench"):
    sources.resolve(["mvbench", "lvbench"], [f"mvbench={downloads}"])
  assert prepare_tfds.main(["benchmark", "mlvu", "--download", str(downloads / "mlvu"), "--data_dir",
                            str(tmp_path), "--quiet"]) == 2


@pytest.fixture
def prepared_niah(niah_files, tmp_path, capsys):  # noqa: F811
  assert prepare_tfds.main(["niah", "--download", str(niah_files), "--data_dir", str(tmp_path / "tfds"),
                            "--haystack", "haystack.mp4", "--single_hop", "single.json", "--multi_hop", "multi.json",
                            "--quiet"]) == 0
  prepared = capsys.readouterr().out.strip()
  assert prepared == str(tmp_path / "tfds" / "niah_haystack" / "haystack" / "1.0.0")
  return prepared


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_niah_reads_the_same_needles_and_haystack_frames_from_a_prepared_haystack(niah_files, prepared_niah, kind):  # noqa: F811
  want = niah_tool.read_inputs(kind, haystack=str(niah_files / "haystack.mp4"), needles=str(niah_files / f"{kind}.json"),
                               image_root=str(niah_files))
  got = niah_tool.read_inputs(kind, tfds_dir=prepared_niah)
  assert got[0] == want[0] == json.loads((niah_files / f"{kind}.json").read_text())
  flat = (lambda images: images) if kind == "single" else (lambda chains: [i for chain in chains for i in chain])
  assert len(flat(got[1])) == len(flat(want[1])) == {"single": 1, "multi": 3}[kind]
  for a, b in zip(flat(got[1]), flat(want[1])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.concatenate(list(got[2])), np.concatenate(list(want[2])))


@pytest.mark.slow
def test_niah_through_a_prepared_haystack_writes_the_files_records(saved_model, niah_files, prepared_niah,  # noqa: F811
                                                                   tmp_path):
  """The whole tool both ways (about a minute on 2 cores: each run compiles its model); the fast sibling above
  checks what differs between the two, the inputs."""
  grid = ["--model", str(saved_model[0]), "--min_frame_num", "8", "--max_frame_num", "16", "--frame_interval", "8"]
  files = ["--haystack", str(niah_files / "haystack.mp4"), "--image_root", str(niah_files)]
  runs = {"single": ["--depth_interval", "0.5"], "multi": []}
  for kind, extra in runs.items():
    needles = str(niah_files / f"{kind}.json")
    want, got = tmp_path / f"{kind}_files.json", tmp_path / f"{kind}_tfds.json"
    assert niah_tool.main([kind, *grid, *files, "--needles", needles, *extra, "--out", str(want)]) == 0
    assert niah_tool.main([kind, *grid, "--tfds_dir", prepared_niah, *extra, "--out", str(got)]) == 0
    assert json.loads(got.read_text()) == json.loads(want.read_text())
    assert len(json.loads(got.read_text())) == {"single": 6, "multi": 2}[kind]


def test_niah_names_a_missing_prepared_haystack_and_a_mix_of_sources(niah_files, tmp_path, capsys):  # noqa: F811
  common = ["single", "--model", str(tmp_path), "--out", str(tmp_path / "o.json")]     # named before it loads
  assert niah_tool.main([*common, "--tfds_dir", str(tmp_path / "none")]) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "no prepared NIAH data" in error and "tools/prepare_tfds.py niah" in error
  assert niah_tool.main([*common, "--tfds_dir", str(tmp_path), "--haystack", str(niah_files / "haystack.mp4")]) == 2
  assert "--tfds_dir replaces --haystack, --needles and --image_root" in capsys.readouterr().err
  assert niah_tool.main(common) == 2
  assert "give --haystack and --needles" in capsys.readouterr().err
  assert not (tmp_path / "o.json").exists()
