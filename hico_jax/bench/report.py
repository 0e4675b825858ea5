"""Results -> rates, TFLOP/s and MFU (FLOPs from hico_jax/flops.py, against the 989 TFLOP/s bf16 peak), and the
markdown table of a section, each case beside its peer."""

from __future__ import annotations

import statistics

from hico_jax import flops, presets
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.qwen2 import Qwen2Config


def summarise(result: dict) -> dict:
  """A case's result with its median step time and what follows from it; an error passes through."""
  if "error" in result:
    return result
  median = statistics.median(result["times"])
  if result["section"] == "ceilings":
    return {**result, "median_s": median}
  if result["section"] == "train":
    config = HiCoConfig.from_dict(dict(presets.hico(result["preset"])))
    train_flops = flops.hico_train_flops(config, result["tokens"], result["frames"], result.get("supervised"))
    return {**result, "median_s": median, "tokens_per_s": result["tokens"] / median,
            "tflops_per_s": train_flops / median / 1e12, "mfu": flops.mfu(train_flops, median)}
  if result["section"] == "mixed":
    fields = presets.hico(result["preset"])
    fields.vit.image_size = result["image_size"]
    config = HiCoConfig.from_dict(dict(fields))
    tiles = result["images"] * result["tiles"]
    train_flops = flops.hico_train_flops(config, result["tokens"], result["videos"] * result["frames"],
                                         result.get("supervised"), tiles=tiles)
    samples = result["videos"] + result["images"]
    return {**result, "median_s": median, "samples_per_s": samples / median,
            "tflops_per_s": train_flops / median / 1e12, "mfu": flops.mfu(train_flops, median)}
  if result["section"] == "clip":
    config = HiCoConfig.from_dict(dict(presets.hico(result["preset"])))
    clip_flops = flops.umt_clip_forward_flops(config.vit, config.llm.hidden_size) * result["frames"] / 4
    return {**result, "median_s": median, "frames_per_s": result["frames"] / median,
            "tflops_per_s": clip_flops / median / 1e12, "mfu": flops.mfu(clip_flops, median)}
  config = Qwen2Config.from_dict(dict(presets.llm(result["preset"])))
  train_flops = flops.qwen2_train_flops(config, result["seq_len"])
  return {**result, "median_s": median, "tokens_per_s": result["seq_len"] / median,
          "tflops_per_s": train_flops / median / 1e12, "mfu": flops.mfu(train_flops, median)}


def _clip_table(results: list[dict]) -> str:
  rows = ["| preset | px | frames | framework | step s | frames/s | TFLOP/s | MFU | peak GiB | vs torch |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  torch_fps = {(r["preset"], r["frames"]): r.get("frames_per_s") for r in results if r["framework"] == "torch"}
  for r in results:
    size = presets.HICO_PRESETS[r["preset"]][1]
    loop = f" (ViT {r['vit_block_loop']})" if r.get("vit_block_loop", "auto") != "auto" else ""
    label = f"| {r['preset']} | {size} | {r['frames']} | {r['framework']}{loop} | "
    if "error" in r:
      rows.append(label + f"{r['error']} | | | | | |")
      continue
    ref = torch_fps.get((r["preset"], r["frames"]))
    ratio = f"{r['frames_per_s'] / ref:.2f}x" if ref and r["framework"] == "jax" else ""
    rows.append(label + f"{r['median_s']:.3f} | {r['frames_per_s']:,.0f} | {r['tflops_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
  return "\n".join(rows)


def _train_table(results: list[dict]) -> str:
  rows = ["| preset | frames | tokens | remat | step s | tokens/s | TFLOP/s | MFU | peak GiB |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    label = (f"| {r['preset']} | {r['frames']} | {r.get('tokens', '')} | vit {r.get('vit_remat')}, llm {r['remat']}"
             f"{', Pallas LayerNorm' if r.get('vit_norm') == 'pallas' else ''}"
             f"{', ViT ' + r['vit_block_loop'] if r.get('vit_block_loop', 'auto') != 'auto' else ''}"
             f"{'' if r.get('options', True) else ', default XLA'} | ")
    if "error" in r:
      rows.append(label + f"{r['error']} | | | | |")
      continue
    rows.append(label + f"{r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
  return "\n".join(rows)


def _mixed_table(results: list[dict]) -> str:
  rows = ["| preset | row | tokens | step s | samples/s | TFLOP/s | MFU | peak GiB |",
          "|---|---|---|---|---|---|---|---|"]
  for r in results:
    images = f" + {r['images']} images x {r['tiles']} tiles" if r["images"] else ""
    label = f"| {r['preset']} | {r['videos']} x {r['frames']}-frame videos{images} | "
    if "error" in r:
      rows.append(label + f"| {r['error']} | | | | |")
      continue
    rows.append(label + f"{r['tokens']} | {r['median_s']:.3f} | {r['samples_per_s']:.2f} | {r['tflops_per_s']:.0f} | "
                f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
  return "\n".join(rows)


def _ceilings_table(results: list[dict]) -> str:
  rows = ["| framework | device | bf16 8192^3 matmul TFLOP/s | of 989 | copy TB/s |", "|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      rows.append(f"| {r['framework']} | {r['error']} | | | |")
      continue
    rows.append(f"| {r['framework']} | {r['device']} | {r['matmul_tflops']:.0f} | "
                f"{100 * r['matmul_tflops'] / 989:.0f}% | {r['copy_tb_s']:.2f} |")
  return "\n".join(rows)


def _llm_table(results: list[dict]) -> str:
  rows = ["| preset | tokens | framework | remat | params | step s | tokens/s | TFLOP/s | MFU | peak GiB | vs torch |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  torch_tps = {(r["preset"], r["seq_len"]): r.get("tokens_per_s") for r in results if r["framework"] == "torch"}
  for r in results:
    label = (r["preset"], r["seq_len"], r["framework"], r.get("remat", "layer ckpt"), r.get("param_dtype", "bf16"))
    if "error" in r:
      rows.append("| %s | %d | %s | %s | %s | " % label + f"{r['error']} | | | | | |")
      continue
    ref = torch_tps.get((r["preset"], r["seq_len"]))
    ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref and r["framework"] == "jax" else ""
    rows.append("| %s | %d | %s | %s | %s | " % label + f"{r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['tflops_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
  return "\n".join(rows)


TABLES = {"ceilings": _ceilings_table, "train": _train_table, "mixed": _mixed_table, "clip": _clip_table,
          "llm": _llm_table}


def table(results: list[dict]) -> str:
  """The markdown table of one section's summarised results (the first result's section)."""
  return TABLES.get(results[0]["section"] if results else "llm", _llm_table)(results)
