"""The official tasks' answer parsers, one per family (lmms-eval_videochat/lmms_eval/tasks/*/utils.py)."""

from __future__ import annotations

import re

# mvbench / mlvu_mc / lvbench `mcq_acc`: the VQA punctuation clean-up, then the first standalone A-E.
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)


def _strip_punctuation(text: str) -> str:
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The official call passes re.UNICODE as sub()'s count (32): at most 32 periods go; kept for parity.
  return _PERIOD_STRIP.sub("", out, 32)


def mcq_letter(answer: str) -> str:
  """`mcq_acc`'s process(): an upper-case letter A-E, or the cleaned lower-case text when none is found."""
  match = _OPTION.match(answer.strip())
  if match:
    return match.group(1).upper()
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  answer = _strip_punctuation(answer)
  answer = answer.strip("'").strip('"').strip(")").strip("(").strip().lower()
  letter = re.search(r"\b([A-E])\b", answer, re.IGNORECASE)
  return letter.group(1).upper() if letter else answer


# videomme `extract_characters_regex`. The official list lacks two commas, so two entries are concatenations.
_VIDEOMME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option isThe correct option is", "Best answer:Best option:"]


def videomme_letter(s: str) -> str:
  s = s.strip()
  for prefix in _VIDEOMME_PREFIXES:
    s = s.replace(prefix, "")
  if len(s.split()) > 10 and not re.search("[ABCD]", s):
    return ""
  match = re.search(r"[ABCD]", s)
  return match[0] if match else ""


def perceptiontest_letter(pred: str) -> str:
  """perceptiontest_val_process_results_mc: the first standalone A-D (case-sensitive), else ""."""
  match = re.search(r"\b([A-D])\b", pred.strip())
  return match.group(1).upper() if match else ""
