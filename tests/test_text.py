"""Chat text and labels against hand-assembled references (shared/reference/videochat_flash.md §5).

The expected sequences are built here independently: the chat template is written out by hand piece by piece, each
piece is encoded on its own with the real Qwen2 tokenizer, and the label mask is assembled from the rule in prose
("system/user masked, assistant supervised, 198 / <|im_start|> / <|im_end|> unmasked everywhere").
"""

import numpy as np
import pytest

from hico_jax import VIDEO_TOKEN_ID
from hico_jax.data import text
from hico_jax.data import tokenizer as tk

IGNORE = -100
NL, IM_START, IM_END = 198, 151644, 151645
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="session")
def qwen2_text_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("qwen2_tokenizer_text")
  tk.build_qwen2_tokenizer_json(out)
  return out


@pytest.fixture(scope="session")
def tok(qwen2_text_dir):
  return tk.load_tokenizer(qwen2_text_dir)


def _expected(tok, pieces):
  """pieces: (text, rule) with rule "masked" (only 198/im_start/im_end kept), "supervised", "plain_masked" (all
  masked) or an int n (n video placeholders)."""
  ids, labels = [], []
  for piece, rule in pieces:
    if isinstance(rule, int):
      ids += [VIDEO_TOKEN_ID] * rule
      labels += [IGNORE] * rule
      continue
    enc = tok.encode(piece)
    ids += enc
    if rule == "supervised":
      labels += enc
    elif rule == "masked":
      labels += [t if t in (NL, IM_START, IM_END) else IGNORE for t in enc]
    else:
      labels += [IGNORE] * len(enc)
  return np.array(ids, np.int32), np.array(labels, np.int32)


VIDEO_CONV = [
  {"from": "human", "value": "What is the man doing?\n<image>"},   # tag at the end: moved to the front
  {"from": "gpt", "value": "He is juggling three red balls."},
  {"from": "human", "value": "How many balls?\nAnswer with a number."},
  {"from": "gpt", "value": "3"},
]


def test_multi_turn_video_labels_are_assistant_turns_plus_newline_and_chat_markers(tok):
  T = 8
  out = text.encode_sample(VIDEO_CONV, tok, num_frames=T, duration=37.5)
  ids, labels = out["input_ids"], out["labels"]
  assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape

  # Training text (§5): "<image>\nThe video lasts … from it. \n{question}" -- " \n" before the question.
  want_ids, want_labels = _expected(tok, [
    (SYSTEM, "masked"),
    ("<|im_start|>user\n", "masked"),
    (None, 16 * T),
    ("\nThe video lasts for 37.50 seconds, and 8 frames are uniformly sampled from it. \n"
     "What is the man doing?<|im_end|>\n", "masked"),
    ("<|im_start|>assistant\nHe is juggling three red balls.<|im_end|>\n", "supervised"),
    ("<|im_start|>user\nHow many balls?\nAnswer with a number.<|im_end|>\n", "masked"),
    ("<|im_start|>assistant\n3<|im_end|>\n", "supervised"),
  ])
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(labels, want_labels)

  assert (ids == VIDEO_TOKEN_ID).sum() == 16 * T
  span = np.flatnonzero(ids == VIDEO_TOKEN_ID)
  assert np.all(np.diff(span) == 1) and np.all(labels[span] == IGNORE)

  # The time message, decoded from the tokens between the visual span and the end of the user turn.
  after = ids[span[-1] + 1:]
  user_rest = after[:list(after).index(IM_END)]
  assert tok.decode(user_rest) == ("\nThe video lasts for 37.50 seconds, and 8 frames are uniformly sampled from "
                                   "it. \nWhat is the man doing?")

  # Supervised positions: both assistant turns whole, plus the scattered newline/marker tokens of the other turns.
  supervised = labels != IGNORE
  np.testing.assert_array_equal(labels[supervised], ids[supervised])
  asst = tok.decode(ids[supervised])
  assert "<|im_start|>assistant\nHe is juggling three red balls.<|im_end|>\n" in asst
  assert "<|im_start|>assistant\n3<|im_end|>\n" in asst
  # Before the first assistant turn (system + first user turn) only those three ids are ever supervised.
  first_asst = list(ids).index(tok.encode("assistant")[0]) - 1
  assert set(labels[:first_asst][labels[:first_asst] != IGNORE]) <= {NL, IM_START, IM_END}
  # " \n" before the question is its own token (not 198), so it stays masked: the rule is about ids, not text.
  sp_nl = tok.encode(" \n")
  assert sp_nl != [NL] and len(sp_nl) == 1 and sp_nl[0] in ids and sp_nl[0] not in labels


def test_tag_already_in_front_gives_the_same_sample_and_no_duration_drops_the_time_message(tok):
  front = [{"from": "human", "value": "<image>\nWhat is the man doing?"}] + VIDEO_CONV[1:]
  a = text.encode_sample(VIDEO_CONV, tok, num_frames=4, duration=37.5)
  b = text.encode_sample(front, tok, num_frames=4, duration=37.5)
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  c = text.encode_sample(front, tok, num_frames=4)
  want_ids, want_labels = _expected(tok, [
    (SYSTEM, "masked"), ("<|im_start|>user\n", "masked"), (None, 64),
    ("\nWhat is the man doing?<|im_end|>\n", "masked"),
    ("<|im_start|>assistant\nHe is juggling three red balls.<|im_end|>\n", "supervised"),
    ("<|im_start|>user\nHow many balls?\nAnswer with a number.<|im_end|>\n", "masked"),
    ("<|im_start|>assistant\n3<|im_end|>\n", "supervised"),
  ])
  np.testing.assert_array_equal(c["input_ids"], want_ids)
  np.testing.assert_array_equal(c["labels"], want_labels)


def test_time_message_keeps_the_reference_leading_newline_and_trailing_space():
  assert text.time_message(37.5, 8) == ("\nThe video lasts for 37.50 seconds, and 8 frames are uniformly sampled "
                                        "from it. ")
  assert text.time_message(1234.5678, 512).startswith("\nThe video lasts for 1234.57 seconds, and 512 frames")


def test_plain_template_supervises_caption_and_its_newline_only(tok):
  conv = [{"from": "human", "value": "<image>\nDescribe the video briefly."},
          {"from": "gpt", "value": "A dog runs on a beach."}]
  out = text.encode_sample(conv, tok, num_frames=4, duration=12.0, template="plain")
  want_ids, want_labels = _expected(tok, [(None, 64), ("A dog runs on a beach.\n", "supervised")])
  np.testing.assert_array_equal(out["input_ids"], want_ids)
  np.testing.assert_array_equal(out["labels"], want_labels)
  assert tok.decode(out["labels"][out["labels"] != IGNORE]) == "A dog runs on a beach.\n"
  assert "video lasts" not in tok.decode(out["input_ids"][out["input_ids"] >= 0])  # no time message, no question


def test_text_only_sample_has_no_placeholder_and_follows_the_same_mask_rule(tok):
  conv = [{"from": "human", "value": "Name a prime.\n\nJust one."}, {"from": "gpt", "value": "Seven.\nOr 7."}]
  out = text.encode_sample(conv, tok, system_prompt="Be terse.")
  want_ids, want_labels = _expected(tok, [
    ("<|im_start|>system\nBe terse.<|im_end|>\n", "masked"),
    ("<|im_start|>user\nName a prime.\n\nJust one.<|im_end|>\n", "masked"),
    ("<|im_start|>assistant\nSeven.\nOr 7.<|im_end|>\n", "supervised"),
  ])
  assert not (out["input_ids"] == VIDEO_TOKEN_ID).any()
  np.testing.assert_array_equal(out["input_ids"], want_ids)
  np.testing.assert_array_equal(out["labels"], want_labels)


def test_leading_gpt_turn_is_dropped_like_preprocess_qwen(tok):
  conv = [{"from": "gpt", "value": "Hello!"}] + VIDEO_CONV
  a = text.encode_sample(conv, tok, num_frames=4, duration=5.0)
  b = text.encode_sample(VIDEO_CONV, tok, num_frames=4, duration=5.0)
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_inference_prompt_matches_hf_chat_with_one_placeholder(tok):
  ids = text.inference_prompt("What is the man doing?", tok, num_frames=8, duration=37.5)
  assert ids.dtype == np.int32 and (ids == VIDEO_TOKEN_ID).sum() == 1
  k = int(np.flatnonzero(ids == VIDEO_TOKEN_ID)[0])
  # §5: single space after the stripped time message (training has " \n").
  assert tok.decode(ids[:k]) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
  assert tok.decode(ids[k + 1:]) == (
    "\nThe video lasts for 37.50 seconds, and 8 frames are uniformly sampled from it. What is the man doing?"
    "<|im_end|>\n<|im_start|>assistant\n")
  full = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
  np.testing.assert_array_equal(ids[:k], tok.encode(full))
  text_only = text.inference_prompt("Hi", tok)
  assert tok.decode(text_only) == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n")


def test_truncation_cuts_text_after_the_video_but_never_the_video(tok):
  full = text.encode_sample(VIDEO_CONV, tok, num_frames=4, duration=5.0)
  n = len(full["input_ids"])
  span_end = int(np.flatnonzero(full["input_ids"] == VIDEO_TOKEN_ID)[-1]) + 1
  cut = text.encode_sample(VIDEO_CONV, tok, num_frames=4, duration=5.0, max_length=span_end + 3)
  np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:span_end + 3])
  np.testing.assert_array_equal(cut["labels"], full["labels"][:span_end + 3])
  same = text.encode_sample(VIDEO_CONV, tok, num_frames=4, duration=5.0, max_length=n)
  np.testing.assert_array_equal(same["input_ids"], full["input_ids"])
  with pytest.raises(text.SampleTooLongError, match=rf"{n} tokens.*64-token visual span.*max_length={span_end - 1}"):
    text.encode_sample(VIDEO_CONV, tok, num_frames=4, duration=5.0, max_length=span_end - 1)
  assert issubclass(text.SampleTooLongError, ValueError)


@pytest.mark.parametrize("conv, kwargs, match", [
  ([], {}, "non-empty"),
  ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], {}, "does not alternate.*turn 1"),
  ([{"from": "human", "value": "a"}, {"from": "user", "value": "b"}], {}, "turn 1 must be"),
  ([{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}], {"num_frames": 4}, "exactly one <image>"),
  ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "x"}], {}, "no video was given"),
  ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "<image>"}], {"num_frames": 4},
   "exactly one <image>.*1 elsewhere"),
  ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], {"duration": 3.0}, "without num_frames"),
  ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], {"num_frames": 0}, "positive integer"),
  ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], {"template": "plain"}, "plain template"),
  ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], {"template": "chatml"}, "unknown template"),
])
def test_bad_input_raises_value_error_naming_the_problem(tok, conv, kwargs, match):
  with pytest.raises(ValueError, match=match):
    text.encode_sample(conv, tok, **kwargs)


def test_matches_preprocess_qwen_run_on_a_transformers_tokenizer(tok, qwen2_text_dir):
  """The reference's mechanism, step by step on the HF tokenizer: <image> as an added special token, one
  apply_chat_template call per turn, the unmask pass, -200 for the tag, then the visual expansion."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(qwen2_text_dir), local_files_only=True)
  hf.add_tokens(["<image>"], special_tokens=True)
  image_id = hf.convert_tokens_to_ids("<image>")
  hf.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
                      " + '<|im_end|>' + '\\n'}}{% endfor %}")

  def turn_ids(role, content):
    enc = hf.apply_chat_template([{"role": role, "content": content}])
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)  # a BatchEncoding in transformers 5

  T = 4
  # The first human turn after preprocess_multimodal (hand-written, §5 "Training text").
  turns = [("user", "<image>\nThe video lasts for 5.00 seconds, and 4 frames are uniformly sampled from it. \n"
                    "What is the man doing?"),
           ("assistant", VIDEO_CONV[1]["value"]), ("user", VIDEO_CONV[2]["value"]),
           ("assistant", VIDEO_CONV[3]["value"])]
  ids = turn_ids("system", "You are a helpful assistant.")
  labels = [IGNORE] * len(ids)
  for role, content in turns:
    enc = turn_ids(role, content)
    ids += enc
    labels += enc if role == "assistant" else [IGNORE] * len(enc)
  labels = [t if t in (NL, IM_START, IM_END) else lab for t, lab in zip(ids, labels)]
  k = ids.index(image_id)
  ids = ids[:k] + [VIDEO_TOKEN_ID] * (16 * T) + ids[k + 1:]
  labels = labels[:k] + [IGNORE] * (16 * T) + labels[k + 1:]

  out = text.encode_sample(VIDEO_CONV, tok, num_frames=T, duration=5.0)
  np.testing.assert_array_equal(out["input_ids"], ids)
  np.testing.assert_array_equal(out["labels"], labels)
