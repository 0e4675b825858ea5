"""Needle in a video haystack: the reference's needle placement, and its teacher-forced scoring recomputed with
the torch clip encoder and transformers' Qwen2 on the same checkpoint."""

import json

import cv2
import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from hico_jax import api, presets
from hico_jax.data import tokenizer as tk
from hico_jax.eval import niah
from hico_jax.models import hico
from hico_jax.cli import niah as niah_tool
from tests.hf_reference import make_hf_qwen2, videochat_flash_reference
from tests.random_params import random_hico_params



def _frame_ids(sequence, width):
  """Each 16-token frame of a placed sequence -> the value its tokens were filled with."""
  frames = sequence.reshape(-1, niah.TOKENS_PER_FRAME, width)
  return [int(f[0, 0]) for f in frames]


def _coded_haystack(frames, width=3):
  return np.repeat(np.arange(frames, dtype=np.float32), niah.TOKENS_PER_FRAME * width).reshape(
      frames, niah.TOKENS_PER_FRAME, width)


def _needle(value, width=3):
  return np.full((4 * niah.TOKENS_PER_FRAME, width), value, np.float32)


@pytest.mark.parametrize("num_frames,depth,expected", [
    (10, 0.2, [0, 1, -1, -1, -1, -1, 2, 3, 4, 5, 6, 7, 8, 9]),   # int(0.2·10) = 2 frames before the needle
    (10, 0.0, [-1] * 4 + list(range(10))),
    (10, 1.0, list(range(10)) + [-1] * 4),
    (7, 0.5, [0, 1, 2, -1, -1, -1, -1, 3, 4, 5, 6]),             # int(3.5) = 3; frames past 7 are not used
])
def test_single_hop_needle_goes_after_int_depth_times_n_frames(num_frames, depth, expected):
  placed = niah.single_hop_frames(_coded_haystack(12), _needle(-1), num_frames, depth)
  assert _frame_ids(placed, 3) == expected


def test_multi_hop_chain_starts_and_ends_with_a_needle_and_splits_the_haystack_by_int_i_n_over_k_minus_1():
  needles = [_needle(-(i + 1)) for i in range(4)]            # k = 4: N/(k-1) = 10/3
  placed = niah.multi_hop_frames(_coded_haystack(12), needles, 10)
  # [0, 3.33) -> 0..2, [3.33, 6.67) -> 3..5, [6.67, 10) -> 6..9
  expected = [-1] * 4 + [0, 1, 2] + [-2] * 4 + [3, 4, 5] + [-3] * 4 + [6, 7, 8, 9] + [-4] * 4
  assert _frame_ids(placed, 3) == expected


def test_a_haystack_shorter_than_asked_is_named():
  with pytest.raises(ValueError, match="asked for 13 haystack frames, the haystack has 12"):
    niah.single_hop_frames(_coded_haystack(12), _needle(-1), 13, 0.5)


# ----------------------------------------------------------------------------------------------------------
# Scoring against torch + transformers


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  """A tiny untied VideoChat-Flash at 224 px with the real Qwen2 vocabulary and tokenizer, saved through the
  public API (noisy params: a dropped bias or norm scale would change the answers)."""
  config = hico.HiCoConfig.from_dict({
      "vit": dict(image_size=224, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", num_layers=2, tie_word_embeddings=False)),
      "encode_chunk": 4})
  params = random_hico_params(config, seed=3)
  path = tmp_path_factory.mktemp("niah_model")
  api.CausalLM(config, params).save_pretrained(str(path))
  tokenizer = tk.load_tokenizer(tk.build_qwen2_tokenizer_json(path).parent)
  return path, config, params, tokenizer


# The reference's prompt pieces ("qwen2" template of its vision_niah scripts), written out here.
PRE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
POST = "<|im_end|>\n<|im_start|>assistant\n"


def _reference_pixels(frames, size):
  """process_images with image_aspect_ratio "pad": expand2square with the mean colour int(mean * 255), then
  UMTImageProcessor's bicubic resize, rescale and ImageNet normalisation."""
  out = []
  for frame in frames:
    image = Image.fromarray(frame)
    width, height = image.size
    if width != height:
      side = max(width, height)
      canvas = Image.new("RGB", (side, side), (123, 116, 103))
      canvas.paste(image, ((side - width) // 2, (side - height) // 2))
      image = canvas
    x = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    out.append((x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225]))
  return np.stack(out).astype(np.float32)


def _reference_answer_ids(encoder, llm, hf_tok, size, haystack_frames, images, placement, question, answer):
  """The reference's eval_forward on the reference's inputs: the haystack torch-encoded clip by clip and read
  as 16 tokens a frame, needles (an image repeated 4x, one clip), text embedded piece by piece, and the
  argmax over the answer span. placement: ("haystack", first, end) frame ranges and ("needle", i) images."""
  with torch.no_grad():
    def visual(frames):
      return encoder(torch.from_numpy(_reference_pixels(frames, size)).permute(0, 3, 1, 2)[None])[0]
    embed = lambda text: llm.model.embed_tokens(torch.tensor([hf_tok.encode(text, add_special_tokens=False)]))[0]
    haystack = visual(haystack_frames)
    pieces = [embed(PRE)]
    for kind, *where in placement:
      if kind == "haystack":
        pieces.append(haystack[where[0] * 16:where[1] * 16])
      else:
        pieces.append(visual(np.repeat(images[where[0]][None], 4, axis=0)))
    answer_ids = hf_tok.encode(answer, add_special_tokens=False)
    pieces += [embed(question), embed(POST), embed(answer)]
    sequence = torch.cat(pieces)[None]
    prompt = sequence.shape[1] - len(answer_ids)
    return llm(inputs_embeds=sequence).logits[0, prompt - 1:prompt - 1 + len(answer_ids)].argmax(-1).tolist()


def test_single_and_multi_hop_answers_are_the_references_argmax_over_the_answer_span(saved_model):
  path, config, params, tokenizer = saved_model
  encoder, llm = videochat_flash_reference(path, config)
  hf_tok = transformers.Qwen2TokenizerFast.from_pretrained(str(path))
  evaluator = niah.Evaluator(config, jax.tree.map(np.asarray, params), tokenizer, length_multiple=256)
  rng = np.random.default_rng(0)
  haystack_frames = rng.integers(0, 256, (12, 64, 80, 3), dtype=np.uint8)    # not square: padded, then resized
  images = rng.integers(0, 256, (3, 50, 40, 3), dtype=np.uint8)
  haystack = evaluator.encode_haystack([haystack_frames[:8], haystack_frames[8:]], max_frames=12)
  needles = [evaluator.encode_needle(image) for image in images]
  question = "Find the frame of a red square. What colour is it?\nOptions: (A) red\n(B) blue\nBest option: ("
  reference = lambda placement, answer: _reference_answer_ids(
      encoder, llm, hf_tok, config.vit.image_size, haystack_frames, images, placement, question, answer)
  # The reference's rule: the decoded argmax, lowercased, without ( and ), against the decoded answer.
  rule = lambda predicted, answer: (hf_tok.decode(predicted).lower().replace("(", "").replace(")", "")
                                    == hf_tok.decode(hf_tok.encode(answer, add_special_tokens=False)).lower())

  # Single hop, 12 frames, depth 0.5: the needle after frame 6, in the middle of the second clip's tokens.
  single = niah.single_hop_frames(haystack, needles[0], 12, 0.5)
  at_6 = [("haystack", 0, 6), ("needle", 0), ("haystack", 6, 12)]
  expected = reference(at_6, "A")
  assert evaluator.answer_correct(single, question, "A") == (rule(expected, "A"), hf_tok.decode(expected).lower())

  # A correct answer, so the rule's other outcome is reached too: the reference's own one-token prediction,
  # as the answer (the position that predicts a one-token answer sees none of it).
  answer = hf_tok.decode(expected[:1])
  assert hf_tok.encode(answer, add_special_tokens=False) == expected[:1] and rule(reference(at_6, answer), answer)
  assert evaluator.answer_correct(single, question, answer)[0]

  # Multi hop, a chain of 3 over 8 frames: needle 0, frames [0, 4), needle 1, frames [4, 8), needle 2.
  chain = niah.multi_hop_frames(haystack, needles, 8)
  expected = reference([("needle", 0), ("haystack", 0, 4), ("needle", 1), ("haystack", 4, 8), ("needle", 2)], "B")
  assert evaluator.answer_correct(chain, question, "B") == (rule(expected, "B"), hf_tok.decode(expected).lower())


# ----------------------------------------------------------------------------------------------------------
# The tool: real files in, the reference's records out


def _write_video(path, frames, fps):
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
  for frame in frames:
    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
  writer.release()


@pytest.fixture(scope="module")
def niah_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("niah_files")
  rng = np.random.default_rng(1)
  _write_video(root / "haystack.mp4", rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8), fps=2)   # 12 s
  for name in ("a.png", "b.png", "c.png"):
    cv2.imwrite(str(root / name), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  question = "Find the frame of a red square. What colour is it?\nOptions: (A) red\n(B) blue\nBest option: ("
  (root / "single.json").write_text(json.dumps([{"question": question, "answer": "A", "image": "a.png", "id": 0}]))
  (root / "multi.json").write_text(json.dumps([{"images": ["a.png", "b.png", "c.png"], "question1": question,
                                                "answer1": "A", "question2": question, "answer2": "B"}]))
  return root


def test_tool_writes_the_references_records_over_its_frame_and_depth_grid(saved_model, niah_files, capsys):
  path = saved_model[0]
  common = ["--model", str(path), "--haystack", str(niah_files / "haystack.mp4"), "--image_root", str(niah_files),
            "--min_frame_num", "8", "--max_frame_num", "16", "--frame_interval", "8"]
  out = niah_files / "single_out.json"
  assert niah_tool.main(["single", *common, "--needles", str(niah_files / "single.json"), "--depth_interval", "0.5",
                         "--out", str(out)]) == 0
  assert "the haystack video gives 12 frames at 1 fps; repeating them to 16" in capsys.readouterr().out
  records = json.loads(out.read_text())
  assert [(r["Num. Frame"], r["Frame Depth"]) for r in records] == [
      (8, 0.0), (8, 50.0), (8, 100.0), (16, 0.0), (16, 50.0), (16, 100.0)]
  assert all(r["Score"] in (0.0, 1.0) for r in records)              # one question: right or wrong
  assert cv2.imread(str(niah_files / "single_out.png")) is not None   # the heat map beside the records

  out = niah_files / "multi_out.json"
  # With the reference's YaRN (here over an original context of 64 positions, which the prompts pass).
  assert niah_tool.main(["multi", *common, "--needles", str(niah_files / "multi.json"), "--out", str(out),
                         "--yarn_factor", "4", "--yarn_original_max_positions", "64"]) == 0
  records = json.loads(out.read_text())
  assert [r["Num. Frame"] for r in records] == [8, 16]
  for r in records:
    assert r["Total question pair"] == 1
    assert r["Both correct"] + r["Only cap correct"] + r["Only qa correct"] + r["Both wrong"] == 1
    assert r["Score"] == (r["Caption Score"] + r["QA Score"]) / 2
  assert cv2.imread(str(niah_files / "multi_out.png")) is not None


def test_tool_names_a_missing_needle_image_a_bad_record_a_bad_yarn_factor_and_a_text_only_model(
    saved_model, niah_files, capsys, tmp_path):
  path = saved_model[0]
  common = ["--model", str(path), "--haystack", str(niah_files / "haystack.mp4"), "--out", str(tmp_path / "o.json"),
            "--min_frame_num", "4", "--max_frame_num", "4"]
  assert niah_tool.main(["single", *common, "--needles", str(niah_files / "single.json"),
                         "--image_root", str(tmp_path)]) == 2
  assert "a.png does not decode" in capsys.readouterr().err
  assert niah_tool.main(["multi", *common, "--needles", str(niah_files / "single.json")]) == 2
  assert "record 0 has no ['images', 'question1'" in capsys.readouterr().err
  assert niah_tool.main(["single", *common, "--needles", str(niah_files / "single.json"),
                         "--image_root", str(niah_files), "--yarn_factor", "0.5"]) == 2
  assert "YaRN factor must be >= 1, got 0.5" in capsys.readouterr().err
  qwen_dir = tmp_path / "qwen"
  make_hf_qwen2(qwen_dir)
  assert niah_tool.main(["single", *common, "--model", str(qwen_dir), "--needles",      # needles read, then the model
                         str(niah_files / "single.json"), "--image_root", str(niah_files)]) == 2
  assert "plain Qwen2 language model" in capsys.readouterr().err
  assert not (tmp_path / "o.json").exists()


def test_haystack_takes_every_round_fps_th_frame_in_chunks(tmp_path):
  """Frame i is flat grey 8·i, so each decoded frame says which it was despite the codec. At 2.5 fps the
  reference's step is round(2.5) = 2 (Python rounds half to even)."""
  frames = np.repeat((8 * np.arange(30, dtype=np.uint8))[:, None, None, None], 32 * 32 * 3).reshape(30, 32, 32, 3)
  _write_video(tmp_path / "coded.mp4", frames, fps=2.5)
  chunks = list(niah.haystack_chunks(str(tmp_path / "coded.mp4"), chunk_frames=8))
  assert [len(c) for c in chunks] == [8, 7]
  decoded = [int(round(frame.mean() / 8)) for frame in np.concatenate(chunks)]
  assert decoded == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]


def test_frames_are_padded_to_a_square_of_the_mean_colour_before_the_resize():
  frames = np.full((1, 2, 4, 3), 7, np.uint8)
  square = niah.expand_to_square(frames)
  assert square.shape == (1, 4, 4, 3)
  assert (square[0, 1:3] == 7).all() and (square[0, [0, 3]] == [123, 116, 103]).all()
