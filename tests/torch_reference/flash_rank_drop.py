"""Independent PyTorch reference for VideoChat-Flash's progressive visual dropout (spec: videochat_flash.md §4).

A transcription of `Qwen2Model_Flash.forward` + `flash_rank_drop` for batch size 1, driving a transformers
Qwen2ForCausalLM (eager attention) layer by layer: after decoder layer idx, if idx + 1 is in `layers`, stage
k = its index drops the current visual span [img_pos, img_pos + cur) down to `keep` tokens (uniform: torch's
CPU integer linspace; attention: the next layer's q/k attention from the query rows), gathers the kept
tokens (and labels) and renumbers position_ids 0..L'-1. Nothing here is shared with hico_jax.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

IGNORE = -100


def stage_selection(compress_type: str, stage: int) -> str:
  """The reference's type names: 'uniform0_attention' is uniform at stage 0 and attention after, etc."""
  if compress_type == "uniform":
    return "uniform"
  if compress_type == "attention":
    return "attention"
  uniform_stages = {"uniform0_attention": 1, "uniform1_attention": 2}[compress_type]
  return "uniform" if stage < uniform_stages else "attention"


def causal_mask(length: int, dtype=torch.float32) -> torch.Tensor:
  """The eager 4-D additive causal mask (1, 1, L, L) of an all-ones 2-D mask."""
  mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
  return mask[None, None]


def query_rows(length: int, text_len: int, cur: int, labels: torch.Tensor | None) -> torch.Tensor:
  """Inference: the last prompt token text_len + cur - 1. Training: every i - 1 with labels[i] supervised
  and labels[i - 1] not, for i >= 1."""
  if labels is None:
    row = text_len + cur - 1
    assert row == length - 1, (row, length)
    return torch.tensor([row])
  i = torch.arange(1, length)
  starts = (labels[1:] != IGNORE) & (labels[:-1] == IGNORE)
  return i[starts] - 1


@dataclasses.dataclass
class Stage:
  selection: str
  cur: int
  keep: int
  kept: torch.Tensor                 # original indices of the visual tokens this stage keeps, ascending
  queries: torch.Tensor | None       # original indices of the query rows (attention stages)
  cut_margin: float | None           # score gap between the last kept and the first dropped token


@dataclasses.dataclass
class Result:
  logits: torch.Tensor               # (L', V) over the kept tokens in order
  kept: torch.Tensor                 # (L',) original index of each kept token
  labels: torch.Tensor | None        # (L',) labels gathered with the tokens
  stages: list[Stage]


def attention_scores(layer, hidden, position_ids, rotary_emb, rows, img_pos, cur):
  """The next layer's attention from `rows` to the visual span, averaged over heads then rows: (cur,)."""
  attn = layer.self_attn
  x = layer.input_layernorm(hidden.detach())
  length = x.shape[1]
  q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
  k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
  cos, sin = rotary_emb(x, position_ids)
  q, k = apply_rotary_pos_emb(q, k, cos, sin)
  k = repeat_kv(k, attn.num_key_value_groups)
  weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(attn.head_dim) + causal_mask(length, q.dtype)
  weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)        # (1, H, L, L)
  per_head = weights[0].mean(0)                                                # (L, L)
  return per_head[:, img_pos:img_pos + cur][rows].mean(0)


@torch.no_grad()
def flash_forward(hf_model, input_ids, *, img_pos: int, num_visual: int, compress_type: str, layers, ratios,
                  labels=None) -> Result:
  """input_ids (L,) with the visual tokens at [img_pos, img_pos + num_visual); labels (L,) unshifted or
  None (inference: the query is the last prompt token)."""
  model = hf_model.model
  ids = torch.as_tensor(input_ids)
  length = ids.shape[0]
  text_len = length - num_visual
  hidden = model.embed_tokens(ids[None])
  position_ids = torch.arange(length)[None]
  kept = torch.arange(length)
  labels = None if labels is None else torch.as_tensor(labels)
  stages = []
  for idx, layer in enumerate(model.layers):
    cos, sin = model.rotary_emb(hidden, position_ids)
    hidden = layer(hidden, attention_mask=causal_mask(hidden.shape[1]), position_ids=position_ids,
                   position_embeddings=(cos, sin))
    if idx + 1 not in layers:
      continue
    k = list(layers).index(idx + 1)
    cur, keep = int(num_visual * ratios[k]), int(num_visual * ratios[k + 1])
    selection = stage_selection(compress_type, k)
    rows, margin = None, None
    if selection == "uniform":
      chosen = torch.linspace(0, cur - 1, keep, dtype=torch.long, device="cpu")
    else:
      rows = query_rows(hidden.shape[1], text_len, cur, labels)
      scores = attention_scores(model.layers[idx + 1], hidden, position_ids, model.rotary_emb, rows, img_pos,
                                cur)
      chosen = scores.topk(keep).indices.sort().values
      ranked = scores.sort(descending=True).values
      margin = float(ranked[keep - 1] - ranked[keep]) if keep < cur else math.inf
    order = torch.cat([torch.arange(img_pos), img_pos + chosen, torch.arange(img_pos + cur, hidden.shape[1])])
    stages.append(Stage(selection, cur, keep, kept[img_pos + chosen],
                        None if rows is None else kept[rows], margin))
    hidden, kept = hidden[:, order], kept[order]
    if labels is not None:
      labels = labels[order]
    position_ids = torch.arange(hidden.shape[1])[None]
  logits = hf_model.lm_head(model.norm(hidden))[0].float()
  return Result(logits, kept, labels, stages)


def shifted_cross_entropy(logits, labels) -> tuple[float, int]:
  """(Σ CE, supervised count) of the reference loss: logits[:-1] predict labels[1:], -100 ignored."""
  targets = labels[1:]
  total = F.cross_entropy(logits[:-1].double(), targets, ignore_index=IGNORE, reduction="sum")
  return float(total), int((targets != IGNORE).sum())
