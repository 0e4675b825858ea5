"""Builds independent references with transformers and torch: random tiny Qwen2 checkpoints on disk, the
torch + transformers pair for a saved VideoChat-Flash checkpoint, and its LLM as a plain Qwen2 directory."""

import glob
import json
import os

import torch
import transformers
from safetensors.torch import load_file, save_file


def make_hf_qwen2(out_dir, *, vocab=320, hidden=64, inter=112, layers=2, heads=4, kv_heads=2,
                  theta=10000.0, tied=False, eps=1e-6, seed=0, bias_std=0.1, max_positions=4096,
                  rope_parameters=None, init_std=0.02):
  """A random transformers Qwen2ForCausalLM saved to `out_dir`; returns the torch model (eval, fp32).

  Biases and norm scales are randomised too (transformers initialises them to 0 and 1), so a converter that
  dropped or transposed one of them would fail parity. `rope_parameters` (transformers 5's field, theta
  included) replaces `theta` when given.
  """
  rope = {"rope_parameters": rope_parameters} if rope_parameters else {"rope_theta": theta}
  config = transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
      rms_norm_eps=eps, tie_word_embeddings=tied, initializer_range=init_std, **rope)
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


def rewrite_config(model_dir, edit):
  """config.json of `model_dir` passed through `edit` (a function that changes the dict in place)."""
  path = os.path.join(model_dir, "config.json")
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, "w") as f:
    json.dump(config, f)


VISION_KEY_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def videochat_flash_reference(path, config):
  """The independent pair for a VideoChat-Flash checkpoint our save wrote to `path` (official layout, one
  model.safetensors): the torch clip encoder and a transformers Qwen2ForCausalLM, each loaded from the saved
  tensors by key name. `config`: the hico.HiCoConfig it was saved from (sizes only)."""
  from safetensors.numpy import load_file as load_numpy_file
  from tests.torch_reference.videochat_flash import ClipEncoder, load_official

  tensors = load_numpy_file(os.path.join(path, "model.safetensors"))
  vit, lm = config.vit, config.llm
  encoder = ClipEncoder(image_size=vit.image_size, width=vit.width, depth=vit.depth, heads=vit.num_heads,
                        mlp_dim=vit.mlp_dim, hidden=lm.hidden_size).eval()
  load_official(encoder.encoder, encoder.projector, tensors, allow_other_keys=True)
  hf_config = transformers.Qwen2Config(
      vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
      num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
      head_dim=lm.head_dim, rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_norm_eps,
      tie_word_embeddings=lm.tie_word_embeddings, max_position_embeddings=lm.max_position_embeddings)
  hf_config._attn_implementation = "eager"
  llm = transformers.Qwen2ForCausalLM(hf_config).eval()
  llm.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith(VISION_KEY_PREFIXES)},
                      strict=not lm.tie_word_embeddings)
  return encoder, llm


def qwen2_dir_from_videochat_flash(export, out):
  """The export's LLM tensors and Qwen2 fields as a plain transformers Qwen2 directory."""
  tensors = {}
  for path in glob.glob(str(export / "*.safetensors")):
    tensors.update(load_file(path))
  llm = {k: v for k, v in tensors.items() if not k.startswith(VISION_KEY_PREFIXES)}
  assert llm and len(llm) < len(tensors)
  hf = json.loads((export / "config.json").read_text())
  hf = {k: v for k, v in hf.items() if not k.startswith(("mm_", "hico_"))}
  hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
  out.mkdir()
  save_file(llm, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(hf))
