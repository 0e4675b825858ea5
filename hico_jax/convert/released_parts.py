"""Stage 1's starting point from the parts the official project releases: the UMT-L vision encoder
(`UMT-L_f4_vision.pt` of OpenGVLab/Video_Encoders_for_Training_VideoChat-Flash, a torch state dict), a plain
Qwen2 / Qwen2.5 Instruct directory, and a fresh projector, as HiCo params.

The encoder is loaded as the official `umt_encoder.py` build_vit loads it: the `encoder.*` tensors only,
`encoder.norm` renamed to `encoder.vision_layernorm`, and of the 24 stored blocks the 23 that run
(mm_vision_select_layer -2) kept: `encoder.blocks.23` is dropped (build_vit's load_state_dict(strict=False)).
Where the official loader would silently leave a tensor at its random init (a missing key) or fail on a shape,
this one refuses the file with one line naming the tensor and what UMT-L has.
"""

from __future__ import annotations

import re

import numpy as np

from hico_jax.convert import qwen2_hf, table, videochat_flash
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.vit import ViTConfig

ENCODER = "encoder."
# The checkpoint stores one block more than runs: UMT-L has 24, mm_vision_select_layer -2 runs 23.
UNUSED_BLOCKS = 1
_BLOCK = re.compile(r"encoder\.blocks\.(\d+)\.")


def umt_l(image_size: int) -> ViTConfig:
  return ViTConfig.from_dict({**videochat_flash.UMT_L, "image_size": image_size})


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state dict file as float32 numpy arrays, without running pickled code.

  torch.load(weights_only=True) is torch's own restricted unpickler: it rebuilds tensors and plain containers
  and refuses any other global, so a malicious file cannot execute code. Writing our own unpickler over the
  zip would re-implement torch's storage formats (legacy and zip, every dtype) for one file. torch is imported
  here, lazily, because the library's training and inference paths never need it; only this converter does."""
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path!r} (a PyTorch checkpoint) needs torch: pip install torch "
                      "(the CPU build is enough)") from None
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      state = torch.load(path, map_location="cpu", weights_only=True)   # a legacy (non-zip) file cannot mmap
  except FileNotFoundError:
    raise FileNotFoundError(f"vision checkpoint {path!r} does not exist") from None
  except Exception as e:  # noqa: BLE001  torch raises many kinds for a file it cannot read
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: not a PyTorch checkpoint torch.load(weights_only=True) can read ({reason})") from None
  if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items()):
    raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of named tensors (expected the "
                     "UMT-L encoder's, e.g. UMT-L_f4_vision.pt)")
  for name, tensor in state.items():
    if name.startswith(ENCODER) and not tensor.is_floating_point():
      raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, expected floating point")
  return {name: t.detach().to(torch.float32).numpy() for name, t in state.items() if name.startswith(ENCODER)}


def umt_encoder_params(state: dict[str, np.ndarray], path: str, vit: ViTConfig) -> dict:
  """The vision tower's params from the encoder tensors of a UMT checkpoint (`vit`: the tower that runs; the
  file stores one block more). Refuses, in one line, a file whose tensors are not that encoder's."""
  what = (f"the UMT encoder: width {vit.width}, MLP {vit.mlp_dim}, patch {vit.patch_size}, "
          f"{vit.depth + UNUSED_BLOCKS} blocks stored of which {vit.depth} run")
  if not state:
    raise ValueError(f"{path}: holds no '{ENCODER}*' tensors; expected {what} (UMT-L_f4_vision.pt)")
  state = dict(state)
  norms = [n for n in ("norm", "vision_layernorm") if f"{ENCODER}{n}.weight" in state]
  if len(norms) == 2:
    raise ValueError(f"{path}: holds both encoder.norm and encoder.vision_layernorm; expected one final norm")
  in_file = lambda name: name.replace(f"{ENCODER}vision_layernorm.", f"{ENCODER}{(norms or ['norm'])[0]}.")
  for suffix in ("weight", "bias"):                   # build_vit's rename of the pretrained final norm
    if f"{ENCODER}norm.{suffix}" in state:
      state[f"{ENCODER}vision_layernorm.{suffix}"] = state.pop(f"{ENCODER}norm.{suffix}")
  blocks = sorted({int(m.group(1)) for name in state if (m := _BLOCK.match(name))})
  stored = vit.depth + UNUSED_BLOCKS
  if blocks != list(range(stored)):
    raise ValueError(f"{path}: holds encoder blocks {_spans(blocks)}; expected blocks 0-{stored - 1} ({what})")
  expected = {ENCODER + name: s for name, s in videochat_flash.umt_encoder_shapes(vit, stored).items()}
  for name, shape in expected.items():
    if name not in state:
      raise ValueError(f"{path}: tensor {in_file(name)!r} is missing (expected shape {shape}: {what})")
    if tuple(state[name].shape) != shape:
      raise ValueError(f"{path}: tensor {in_file(name)!r} has shape {tuple(state[name].shape)}, expected "
                       f"{shape} ({what})")
  extra = sorted(set(state) - set(expected))
  if extra:
    raise ValueError(f"{path}: unexpected tensor(s) {[in_file(n) for n in extra[:5]]} (not part of {what})")
  # The blocks that run, under the released model's names, through the same table the HF import uses.
  kept = {videochat_flash.VISION_PREFIX + name: state[ENCODER + name]
          for name in videochat_flash.umt_encoder_shapes(vit)}
  return table.to_params(kept, videochat_flash.vision_rules(vit, path_prefix=()))


def init_projector(width: int, hidden: int, seed: int) -> dict:
  """A fresh projector, drawn as the reference draws it. The official stage 1 builds ToMe16_mlp_hd64 in
  initialize_vision_modules, after the LLM's from_pretrained, so no HF _init_weights touches it: its two
  nn.Linear layers keep torch's default init, kaiming_uniform_(a=sqrt(5)) weights and uniform biases, which
  are both U(-1/sqrt(fan_in), 1/sqrt(fan_in)). mm_close_init (stage 2's scripts pass True) is only written to
  the config; no code reads it."""
  rng = np.random.default_rng(seed)

  def linear(fan_in, fan_out):
    bound = 1.0 / np.sqrt(fan_in)
    return {"kernel": rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
            "bias": rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)}
  return {"fc1": linear(width, hidden), "fc2": linear(hidden, hidden)}


def load(vision_path: str, llm_dir: str, *, image_size: int = 224, seed: int = 0,
         vit: ViTConfig | None = None) -> tuple[HiCoConfig, dict, dict]:
  """(config, float32 numpy params, the LLM's token ids) of a HiCo model made of the released parts.

  `vit` defaults to UMT-L at `image_size` (224: umt-large, the 7B's stages 1-3; 448: umt-hd-large, the 2B);
  a file of any other encoder is refused."""
  vit = vit or umt_l(image_size)
  if videochat_flash.is_videochat_flash(qwen2_hf.read_config(llm_dir)):
    raise ValueError(f"{llm_dir!r} is a VideoChat-Flash checkpoint, not a plain Qwen2 LLM directory: import it "
                     "whole with hf-to-orbax")
  tower = umt_encoder_params(read_torch_state_dict(vision_path), vision_path, vit)
  llm_config, llm, _ = qwen2_hf.load(llm_dir, params_dtype=np.float32)
  config = HiCoConfig(vit=vit, llm=llm_config)
  params = {"visual": {"vision_tower": tower, "projector": init_projector(vit.width, llm_config.hidden_size, seed)},
            "llm": llm}
  return config, params, qwen2_hf.read_token_ids(llm_dir)


def _spans(indices: list[int]) -> str:
  if not indices:
    return "none"
  spans, start = [], indices[0]
  for prev, cur in zip(indices, indices[1:] + [None]):
    if cur != prev + 1:
      spans.append(f"{start}" if start == prev else f"{start}-{prev}")
      start = cur
  return ", ".join(spans)
