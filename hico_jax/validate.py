"""`validate(config, mesh)`: every disagreement between config numbers and the mesh, before any compile.

A run that would fail deep inside XLA with an opaque sharding error, or silently replicate a 7B embedding,
stops here with one message listing each offending pair of numbers.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from hico_jax import sharding
from hico_jax.data.order import zigzag_problem
from hico_jax.models.qwen2 import Qwen2Config
from hico_jax.train import optimizer


class ConfigError(ValueError):
  """The config cannot run on this mesh; the message lists every reason."""


def validate(config, mesh: Mesh) -> Qwen2Config:
  """Checks `config.model` (Qwen2 fields) and, when present, `config.batch_size` and `config.seq_len`
  against the mesh. Returns the parsed model config."""
  problems = []
  try:
    model = Qwen2Config.from_dict(dict(config.model))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None
  size = dict(mesh.shape)
  tensor, embed_shards = sharding.axis_size(mesh, "heads"), sharding.axis_size(mesh, "embed")
  batch_shards, seq = sharding.axis_size(mesh, "act_batch"), sharding.axis_size(mesh, "act_len")

  def divides(count, what, axis_value, axis_desc):
    if count % axis_value:
      problems.append(f"{what}={count} is not divisible by {axis_desc}={axis_value}")

  divides(model.num_heads, "model.num_heads", tensor, "mesh tensor")
  divides(model.num_kv_heads, "model.num_kv_heads", tensor, "mesh tensor")
  divides(model.intermediate_size, "model.intermediate_size", tensor, "mesh tensor")
  divides(model.vocab_size, "model.vocab_size", tensor, "mesh tensor")
  divides(model.hidden_size, "model.hidden_size", embed_shards, "mesh fsdp*seq (embed sharding)")
  if "batch_size" in config:
    divides(config.batch_size, "batch_size", batch_shards, "mesh data*fsdp")
  if "seq_len" in config:
    divides(config.seq_len, "seq_len", seq, "mesh seq")
    if config.seq_len > model.max_position_embeddings:
      problems.append(f"seq_len={config.seq_len} exceeds model.max_position_embeddings="
                      f"{model.max_position_embeddings}")
  if model.attention_impl == "cudnn":
    if model.dtype not in ("bfloat16", "float16"):
      problems.append(f"attention_impl='cudnn' needs model.dtype bfloat16 or float16, got {model.dtype!r}")
    if model.head_dim % 8 or model.head_dim > 256:
      problems.append(f"attention_impl='cudnn' needs head_dim a multiple of 8 and <= 256, got {model.head_dim}")
    platforms = {d.platform for d in mesh.devices.flat}
    if platforms != {"gpu"}:
      problems.append(f"attention_impl='cudnn' runs on GPUs only; this mesh has {sorted(platforms)} devices")
  if problems:
    raise ConfigError("config does not fit the mesh " + str(dict(size)) + ":\n  " + "\n  ".join(problems))
  return model


def validate_training(config, model_config, mesh: Mesh, data_config=None) -> None:
  """The numbers of a HiCo training config against the mesh (and the process count), and the data pipeline's
  (`data_config`, a DataConfig, when given) against the model, all reported together before anything
  compiles."""
  problems = []
  size = dict(mesh.shape)
  tensor, seq = sharding.axis_size(mesh, "heads"), sharding.axis_size(mesh, "act_len")
  rows, clip_devices = sharding.axis_size(mesh, "act_batch"), sharding.axis_size(mesh, "act_clips")
  llm, vit = model_config.llm, model_config.vit
  try:
    validate(type(config)({"model": dict(llm.__dict__)}), mesh)
  except ConfigError as e:   # its reasons, without the header line; a single-line error is its own reason
    lines = str(e).splitlines()
    problems += [line.strip() for line in (lines[1:] or lines)]
  if vit.num_heads % tensor:
    problems.append(f"model.vit.num_heads={vit.num_heads} is not divisible by mesh tensor={tensor}")
  platforms = sorted({d.platform for d in mesh.devices.flat})
  for field, gpu_kernel in (("attention_impl", "cudnn"), ("norm_impl", "pallas")):
    if getattr(vit, field) == gpu_kernel and platforms != ["gpu"]:
      problems.append(f"model.vit.{field}={gpu_kernel!r} runs on GPUs only; this mesh has {platforms} devices")
  if llm.attention_impl == "chunked":
    problems.append("model.llm.attention_impl='chunked' runs forward only (the prefill of generation); train "
                    "with 'xla', 'cudnn' (GPU), 'splash' (TPU), 'ring' or 'all_gather'")
  if llm.attention_impl == "splash" and platforms != ["tpu"]:
    problems.append(f"model.llm.attention_impl='splash' is a TPU kernel; this mesh has {platforms} devices")
  if vit.width % (embed_shards := sharding.axis_size(mesh, "embed")):
    problems.append(f"model.vit.width={vit.width} is not divisible by mesh fsdp*seq={embed_shards}")
  # The tower's steps take min(encode_chunk, the micro-batch's clips) clips: rows carry data.frame_budget
  # frames each, so a micro-batch smaller than one chunk is one step of all its clips.
  micro_batch_clips = (config.batch_size // config.accumulation_steps * config.data.frame_budget
                       // model_config.clip_frames)
  step_clips = min(model_config.encode_chunk, micro_batch_clips) or model_config.encode_chunk
  if step_clips % clip_devices:
    what = (f"model.encode_chunk={step_clips}" if step_clips == model_config.encode_chunk else
            f"a vision-tower step of {step_clips} clips (a micro-batch's clips, fewer than model.encode_chunk="
            f"{model_config.encode_chunk})")
    problems.append(f"{what} is not divisible by mesh data*fsdp*seq={clip_devices} (each device encodes whole "
                    f"clips)")
  batch = config.batch_size
  if batch % rows:
    problems.append(f"batch_size={batch} is not divisible by mesh data*fsdp={rows}")
  if batch % (config.accumulation_steps * rows) and batch % rows == 0:
    problems.append(f"batch_size={batch} does not split into accumulation_steps={config.accumulation_steps} "
                    f"micro-batches of a multiple of data*fsdp={rows} rows")
  if batch % jax.process_count():
    problems.append(f"batch_size={batch} is not divisible by the {jax.process_count()} processes")
  budget = config.data.token_budget
  if zigzag := zigzag_problem(budget, seq):
    problems.append(zigzag)
  if budget > llm.max_position_embeddings:
    problems.append(f"data.token_budget={budget} exceeds model.llm.max_position_embeddings="
                    f"{llm.max_position_embeddings}")
  if config.data.image_size != vit.image_size:
    problems.append(f"data.image_size={config.data.image_size} differs from model.vit.image_size={vit.image_size}")
  # The pipeline writes a sample's placeholders frame by frame and tile by tile; the model splices its merged
  # tokens into them, so the counts must agree (JAX would clamp an index past the end silently, not fail).
  if model_config.tokens_per_clip % vit.clip_frames:
    problems.append(f"model.tokens_per_clip={model_config.tokens_per_clip} is not a multiple of "
                    f"model.vit.clip_frames={vit.clip_frames}: the data pipeline writes a video's placeholders "
                    "frame by frame, the same count each")
  elif data_config is not None:
    per_frame, per_tile = model_config.tokens_per_clip // vit.clip_frames, model_config.tokens_per_tile
    if (data_config.clip_frames, data_config.visual_tokens_per_frame) != (vit.clip_frames, per_frame):
      problems.append(f"the data pipeline writes {data_config.visual_tokens_per_frame} placeholders a frame in "
                      f"clips of {data_config.clip_frames}, but the model merges a {vit.clip_frames}-frame clip to "
                      f"{model_config.tokens_per_clip} tokens ({per_frame} a frame): build the DataConfig with "
                      "**model_config.pipeline_counts()")
    if data_config.tile_budget and data_config.tokens_per_tile != per_tile:
      problems.append(f"the data pipeline writes {data_config.tokens_per_tile} placeholders an image tile, but "
                      f"the model gives a tile {per_tile} tokens: build the DataConfig with "
                      "**model_config.pipeline_counts()")
  if config.total_steps < 1:
    problems.append(f"total_steps={config.total_steps} must be >= 1")
  problems += optimizer.config_problems(config.get("optim") or {})
  if problems:
    raise ConfigError("config does not fit the mesh " + str(size) + ":\n  " + "\n  ".join(problems))
