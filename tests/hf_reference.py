"""Builds independent references with transformers: random tiny Qwen2 checkpoints on disk."""

import os

import torch
import transformers


def make_hf_qwen2(out_dir, *, vocab=320, hidden=64, inter=112, layers=2, heads=4, kv_heads=2,
                  theta=10000.0, tied=False, eps=1e-6, seed=0, bias_std=0.1):
  """A random transformers Qwen2ForCausalLM saved to `out_dir`; returns the torch model (eval, fp32).

  Biases and norm scales are randomised too (transformers initialises them to 0 and 1), so a converter that
  dropped or transposed one of them would fail parity.
  """
  config = transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
      rope_theta=theta, rms_norm_eps=eps, tie_word_embeddings=tied)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0.0, bias_std)
      elif "norm" in name:
        p.uniform_(0.5, 1.5)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return model
