"""Model presets with the real sizes (videochat_flash.md §4), as ml_collections ConfigDicts.

Configs pick one by name and override fields on the command line (`--config.model.remat_policy=dots`).
`tiny` keeps the real Qwen2 vocabulary so the real tokenizer works with it; everything else is small.
"""

import ml_collections

_COMPUTE_DEFAULTS = dict(dtype="bfloat16", param_dtype="float32", remat_policy="full", attention_impl="xla")

LLM_PRESETS = {
    # Qwen2.5-1.5B-Instruct: the LLM of VideoChat-Flash-Qwen2_5-2B_res448.
    "qwen2_5_1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    # Qwen2-7B-Instruct: the LLM of VideoChat-Flash-Qwen2-7B_res224 / _res448.
    "qwen2_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, max_position_embeddings=32768),
    # Qwen2.5-7B-Instruct-1M: the 1M-context variant (theta 1e7, eps 1e-5). The released config says
    # max_position_embeddings 1,010,000; RoPE here is computed from positions, so no table to outgrow.
    "qwen2_5_7b_1m": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                          num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e7, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, max_position_embeddings=1010000),
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 max_position_embeddings=32768),
}


def llm(name: str, **overrides) -> ml_collections.ConfigDict:
  """The Qwen2 decoder preset `name` with compute defaults (bf16 compute, fp32 weights, full remat)."""
  if name not in LLM_PRESETS:
    raise ValueError(f"unknown LLM preset {name!r}; known presets: {sorted(LLM_PRESETS)}")
  return ml_collections.ConfigDict({**LLM_PRESETS[name], **_COMPUTE_DEFAULTS, **overrides})
