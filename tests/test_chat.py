"""tools/chat.py end to end: a real mp4, a tiny random VideoChat-Flash checkpoint in the official layout with the
real Qwen2 tokenizer, and the tool's main(argv) run in-process.

The expectations are built independently of hico_jax: the prompts are written out literally from the reference's
chat() (shared/reference/videochat_flash.md §5; `conv_qwen` + `tokenizer_image_token`) and tokenized with
transformers' tokenizer; the frames are decoded here with OpenCV at the indices dynamic_fps1 gives (worked out by
hand below) and normalised with the ImageNet constants; the answer is transformers' greedy Qwen2ForCausalLM.generate
on the torch ClipEncoder's visual tokens spliced into the prompt embeddings (as in test_hico).
"""

import io
import json
import os
import re
import shutil
import sys

import cv2
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hico_jax
from hico_jax import api, presets
from hico_jax.data import tokenizer as tk
from hico_jax.data import video as video_io
from hico_jax.infer import chat
from hico_jax.infer import generate as generation
from hico_jax.infer import visual
from hico_jax.models import hico, vit
from hico_jax.cli import chat as chat_tool
from tests.hf_reference import make_hf_qwen2
from tests.random_params import random_hico_params
from tests.test_video import faststart
from tests.torch_reference.videochat_flash import ClipEncoder, load_official


IMAGE = -200                    # the reference's IMAGE_TOKEN_INDEX
IM_END, ENDOFTEXT = 151645, 151643
SIZE, FPS, VLEN = 224, 4.0, 6   # 1.5 s of video, at the vision tower's own size (resizing is then a copy)
# dynamic_fps1 (§5) for vlen=6, fps=4, min_num_frames=64, max_num_frames=512: the floor 64 > vlen becomes
# 4*floor(6/4) = 4; n = 4*floor(1.5/4) = 0 -> 4; clip to [4, 512] -> 4; 4 segments with edges
# int(linspace(0, 6, 5)) = [0, 1, 3, 4, 6], middles (s_i + s_{i+1} - 1)//2 = [0, 1, 3, 4].
SAMPLED = [0, 1, 3, 4]
TIME_MSG = "The video lasts for 1.50 seconds, and 4 frames are uniformly sampled from it."
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
Q1, Q2 = "What colour is the square?", "And after that?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("qwen2_tokenizer_chat")
  tk.build_qwen2_tokenizer_json(out)
  return out


def _with_tokenizer(model_dir, tokenizer_dir):
  for name in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, name), model_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
  """A tiny untied HiCo at 224 px with the real 151,936-token vocabulary, saved in the official layout with
  Qwen2-Instruct's eos and pad, plus the tokenizer files."""
  config = hico.HiCoConfig.from_dict({
      "vit": dict(image_size=SIZE, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", tie_word_embeddings=False))})
  path = tmp_path_factory.mktemp("videochat_flash_tiny")
  api.CausalLM(config, random_hico_params(config, seed=7), eos_ids=[IM_END], pad_id=ENDOFTEXT).save_pretrained(str(path))
  _with_tokenizer(path, tokenizer_dir)
  return str(path)


def _write_video(path, frames, seed=3):
  """Smooth random colour fields, each frame its own, so taking a wrong frame changes the answer."""
  rng = np.random.default_rng(seed)
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
  assert writer.isOpened()
  for _ in range(frames):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    writer.write(cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
  writer.release()
  return str(path)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
  return _write_video(tmp_path_factory.mktemp("chat_video") / "clip.mp4", VLEN)


@pytest.fixture(scope="module")
def reference(checkpoint, video_file):
  """Everything the expectations need, none of it from hico_jax: tokenizer, visual tokens, LLM."""
  hf_tok = transformers.Qwen2TokenizerFast.from_pretrained(checkpoint)
  cap = cv2.VideoCapture(video_file)
  decoded = []
  while True:
    ok, bgr = cap.read()
    if not ok:
      break
    decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
  cap.release()
  assert len(decoded) == VLEN
  frames = np.stack([decoded[i] for i in SAMPLED]).astype(np.float32) / 255.0
  frames = (frames - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])

  tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
  encoder = ClipEncoder(image_size=SIZE, width=128, depth=2, heads=2, mlp_dim=256, hidden=64).eval()
  load_official(encoder.encoder, encoder.projector, tensors, allow_other_keys=True)
  with open(os.path.join(checkpoint, "config.json")) as f:
    llm_config = transformers.Qwen2Config(**json.load(f))   # the reference's config class is a Qwen2Config
  llm_config._attn_implementation = "eager"
  llm = transformers.Qwen2ForCausalLM(llm_config).eval()
  llm.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("model.vision_tower.")
                       and not k.startswith("model.mm_projector.")}, strict=True)
  with torch.no_grad():
    visual = encoder(torch.from_numpy(frames)[None].permute(0, 1, 4, 2, 3))[0]     # (64, 64)
  return hf_tok, visual, llm


def _tokenize(hf_tok, prompt):
  """tokenizer_image_token, written from the reference: pieces around <image> tokenized alone."""
  ids = []
  for j, chunk in enumerate(prompt.split("<image>")):
    if j:
      ids.append(IMAGE)
    ids += hf_tok(chunk, add_special_tokens=False).input_ids
  return ids


def _greedy(reference, prompt_ids):
  """(answer ids before <|im_end|>, answer text) from transformers, as chat() gets them."""
  hf_tok, visual, llm = reference
  at = prompt_ids.index(IMAGE)
  with torch.no_grad():
    text = llm.model.embed_tokens(torch.tensor([i for i in prompt_ids if i != IMAGE]))
    embeds = torch.cat([text[:at], visual, text[at:]])[None]
    out = llm.generate(inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[IM_END],
                       pad_token_id=ENDOFTEXT)[0].tolist()
  answer = hf_tok.decode(out, skip_special_tokens=True).strip()
  return out[:out.index(IM_END)] if IM_END in out else out, answer


def _run(argv, capsys):
  rc = chat_tool.main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def test_two_questions_are_the_reference_chat_prompts_and_transformers_greedy_answers(checkpoint, video_file,
                                                                                      reference, capsys):
  rc, out, err = _run(["--model", checkpoint, "--video", video_file, "--question", Q1, "--question", Q2,
                       "--max_new_tokens", str(NEW_TOKENS), "--json"], capsys)
  assert rc == 0, err
  turns = [json.loads(line) for line in out.splitlines()]
  assert len(turns) == 2

  hf_tok = reference[0]
  first = (SYSTEM + f"<|im_start|>user\n<image>\n{TIME_MSG} {Q1}<|im_end|>\n<|im_start|>assistant\n")
  assert turns[0]["prompt_ids"] == _tokenize(hf_tok, first)
  assert turns[0]["prompt_ids"].count(IMAGE) == 1
  ids1, answer1 = _greedy(reference, turns[0]["prompt_ids"])
  assert turns[0]["answer_ids"] == ids1
  assert turns[0]["answer"] == answer1

  # The follow-up carries the first turn verbatim and the first answer as text, re-tokenized.
  second = (SYSTEM + f"<|im_start|>user\n<image>\n{TIME_MSG} {Q1}<|im_end|>\n<|im_start|>assistant\n{answer1}"
            f"<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n")
  assert turns[1]["prompt_ids"] == _tokenize(hf_tok, second)
  ids2, answer2 = _greedy(reference, turns[1]["prompt_ids"])
  assert turns[1]["answer_ids"] == ids2
  assert turns[1]["answer"] == answer2
  assert "4 frames of a 1.50 s video" in err
  assert "decoding" not in err and "encoding video" not in err    # one clip, fast: no progress bar


def test_stdin_questions_without_history_each_get_the_single_question_answer(checkpoint, video_file, reference,
                                                                             capsys, monkeypatch):
  monkeypatch.setattr(sys, "stdin", io.StringIO(f"{Q1}\n\n  {Q1}  \n"))
  rc, out, err = _run(["--model", checkpoint, "--video", video_file, "--no_history",
                       "--max_new_tokens", str(NEW_TOKENS)], capsys)
  assert rc == 0, err
  prompt = _tokenize(reference[0], SYSTEM + f"<|im_start|>user\n<image>\n{TIME_MSG} {Q1}<|im_end|>\n"
                                            f"<|im_start|>assistant\n")
  _, answer = _greedy(reference, prompt)
  assert out == f"{answer}\n{answer}\n"


def test_follow_up_questions_run_only_their_new_tokens_and_compile_once(checkpoint, video_file):
  """A follow-up's prompt starts with the last prompt: only the last answer and the new question go through the
  decoder, against the cached prompt; the turns after it share its compiled program (bucketed lengths, a cache
  grown in steps). Each answer equals a fresh conversation's given the same history (a full prefill)."""
  model, tokenizer = hico_jax.from_pretrained(checkpoint), tk.load_tokenizer(checkpoint)
  video = chat.read_video(video_file)
  compiled = lambda: generation._generate._cache_size()
  runs = []
  original = generation._generate
  counting = lambda *args, **kwargs: runs.append(args[2].shape) or original(*args, **kwargs)

  conversation = chat.VideoChat(model, tokenizer, video)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(generation, "_generate", counting)
    turns = [conversation.ask(q, max_new_tokens=NEW_TOKENS) for q in (Q1, Q2, Q1 + " Again?")]
  assert [t.cached_ids for t in turns] == [0, len(turns[0].prompt_ids), len(turns[1].prompt_ids)]
  # The first turn runs its whole bucketed prompt with the video's 64 tokens; the others their new tokens only.
  assert runs[0][1] >= 64 and all(shape[1] == chat.CONTINUATION_BUCKET for shape in runs[1:])
  before = compiled()
  conversation.ask(Q2 + " Once more?", max_new_tokens=NEW_TOKENS)
  assert compiled() == before

  for i, turn in enumerate(turns[1:], start=1):
    fresh = chat.VideoChat(model, tokenizer, video)
    fresh.history = conversation.history[:2 * i]
    again = fresh.ask(turn.question, max_new_tokens=NEW_TOKENS)
    assert again.cached_ids == 0
    np.testing.assert_array_equal(again.prompt_ids, turn.prompt_ids)
    assert again.answer_ids.tolist() == turn.answer_ids.tolist()


@pytest.fixture
def vision_tower_runs(monkeypatch):
  """A list that grows each time a compiled program runs the vision tower (a debug callback inside it), for
  models built after this fixture."""
  runs = []

  class CountingViT(vit.UMTViT):
    def __call__(self, frames):
      jax.debug.callback(lambda: runs.append(1))
      return super().__call__(frames)
  monkeypatch.setattr(hico, "UMTViT", CountingViT)
  return runs


def test_a_follow_up_question_reuses_the_visual_tokens_and_answers_as_a_fresh_conversation_would(
    checkpoint, video_file, vision_tower_runs):
  model, tokenizer = hico_jax.from_pretrained(checkpoint), tk.load_tokenizer(checkpoint)
  video = chat.read_video(video_file, size=model.config.vit.image_size)
  conversation = chat.VideoChat(model, tokenizer, video)
  encoded = len(vision_tower_runs)
  assert encoded > 0                                          # the counter sees the tower
  first = conversation.ask(Q1, max_new_tokens=NEW_TOKENS)
  second = conversation.ask(Q2, max_new_tokens=NEW_TOKENS)
  assert len(vision_tower_runs) == encoded                    # neither question ran it again

  # A fresh conversation handed the same history asks the same prompt and gets the same answer.
  fresh = chat.VideoChat(model, tokenizer, video)
  fresh.history = conversation.history[:2]
  again = fresh.ask(Q2, max_new_tokens=NEW_TOKENS)
  np.testing.assert_array_equal(again.prompt_ids, second.prompt_ids)
  assert again.answer == second.answer and again.answer_ids.tolist() == second.answer_ids.tolist()
  # And both are what generation from the frames gives, re-encoding them (which the counter sees).
  before = len(vision_tower_runs)
  pixels = video_io.preprocess(video.frames, model.config.vit.image_size)[None]
  for turn in (first, second):
    ids = model.generate(turn.prompt_ids[None], video=pixels, max_new_tokens=NEW_TOKENS,
                         eos_ids=conversation.stop_ids)
    assert chat.decode_answer(ids[0], tokenizer, conversation.stop_ids)[1] == turn.answer
  assert len(vision_tower_runs) > before


def test_answer_stops_at_the_first_stop_id_and_decodes_without_special_tokens(tokenizer_dir):
  tok = tk.load_tokenizer(tokenizer_dir)
  hf_tok = transformers.Qwen2TokenizerFast.from_pretrained(tokenizer_dir)
  words = hf_tok(" Red square", add_special_tokens=False).input_ids
  new = words + [151644] + words + [IM_END, 17, ENDOFTEXT, ENDOFTEXT]
  ids, answer = chat.decode_answer(new, tok, stop_ids=(IM_END, ENDOFTEXT))
  assert ids.tolist() == words + [151644] + words
  assert answer == "Red square Red square"            # <|im_start|> skipped, outer spaces stripped
  ids, answer = chat.decode_answer(words, tok, stop_ids=(IM_END,))   # no stop: everything is the answer
  assert ids.tolist() == words and answer == "Red square"


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming what is wrong, non-zero exit, before anything heavy where possible.

@pytest.fixture(scope="module")
def plain_qwen2(tmp_path_factory, tokenizer_dir):
  path = tmp_path_factory.mktemp("plain_qwen2")
  make_hf_qwen2(str(path), vocab=320)
  _with_tokenizer(path, tokenizer_dir)
  return str(path)


@pytest.fixture(scope="module")
def garbage_mp4(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad_video") / "broken.mp4"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  return str(path)


@pytest.fixture(scope="module")
def truncated_mp4(tmp_path_factory, video_file):
  """The chat video with its index first and its second half cut off: it opens and its first frame decodes,
  so only decoding every frame, after the model has loaded, finds it broken."""
  path = tmp_path_factory.mktemp("truncated_video") / "cut.mp4"
  with open(video_file, "rb") as f:
    whole = faststart(f.read())
  path.write_bytes(whole[:len(whole) * 2 // 3])
  return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing_video", "no such file"),
    ("garbage_video", "broken.mp4"),
    ("truncated_video", "cut.mp4'.*truncated"),
    ("plain_qwen2", "plain Qwen2"),
    ("missing_model", "does not exist"),
    ("frames_off_clips", "multiple of 4"),
    ("negative_temperature", "--temperature"),
])
def test_bad_input_exits_nonzero_with_a_one_line_reason(case, expected, checkpoint, video_file, plain_qwen2,
                                                        garbage_mp4, truncated_mp4, tmp_path, capsys):
  args = {"--model": checkpoint, "--video": video_file, "--question": Q1}
  extra = []
  if case == "missing_video":
    args["--video"] = str(tmp_path / "nope.mp4")
  elif case == "garbage_video":
    args["--video"] = garbage_mp4
  elif case == "truncated_video":
    args["--video"] = truncated_mp4
  elif case == "plain_qwen2":
    args["--model"] = plain_qwen2
  elif case == "missing_model":
    args["--model"] = str(tmp_path / "no_model")
  elif case == "frames_off_clips":
    extra = ["--max_num_frames", "10"]
  elif case == "negative_temperature":
    extra = ["--temperature", "-1"]
  rc, out, err = _run([x for kv in args.items() for x in kv] + extra, capsys)
  assert rc != 0
  assert out == ""
  # Progress lines may come first; the reason is one line, the last, and it says what is wrong.
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and re.search(expected, errors[0]), err


def test_a_long_video_shows_decoding_and_encoding_progress_bars(checkpoint, tmp_path, capsys, monkeypatch):
  # 12 frames (3 s at 4 fps: all of them, 3 clips), encoded a clip at a time: 3 steps. "Long" is whatever
  # takes longer than the bars' delay: with none, this video is long. (A short one shows none: the tests
  # above run the tool with the delay.)
  path = _write_video(tmp_path / "three_clips.mp4", 12)
  argv = ["--model", checkpoint, "--video", path, "--question", Q1, "--max_new_tokens", "2", "--chunk_clips", "1"]
  monkeypatch.setattr(chat, "PROGRESS_DELAY_S", 0.0)
  monkeypatch.setattr(visual, "PROGRESS_DELAY_S", 0.0)
  rc, _, err = _run(argv, capsys)
  # The bars clear themselves when done (leave=False); their first frames stay in the captured text.
  assert rc == 0 and "decoding three_clips.mp4" in err and "encoding video:   0%" in err and "0/12" in err, err


def test_help_exits_zero_and_names_the_options(capsys):
  with pytest.raises(SystemExit) as e:
    chat_tool.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for option in ("--model", "--video", "--question", "--max_num_frames", "--max_new_tokens", "--temperature",
                 "--top_p", "--seed"):
    assert option in out
