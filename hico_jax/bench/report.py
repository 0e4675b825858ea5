"""Results -> rates, TFLOP/s and MFU (FLOPs from hico_jax/flops.py, against the 989 TFLOP/s bf16 peak), and the
markdown table of a section, each case beside its peer."""

from __future__ import annotations

import statistics

from hico_jax import flops, presets
from hico_jax.models.hico import HiCoConfig
from hico_jax.models.qwen2 import Qwen2Config


def _rates(result: dict, median: float, work_flops: float, **per_second) -> dict:
  """The result with its median step time, TFLOP/s and MFU, and `per_second` (name: count a step) as rates."""
  return {**result, "median_s": median, **{name: count / median for name, count in per_second.items()},
          "tflops_per_s": work_flops / median / 1e12, "mfu": flops.mfu(work_flops, median)}


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
    return _rates(result, median, train_flops, tokens_per_s=result["tokens"])
  if result["section"] == "mixed":
    fields = presets.hico(result["preset"])
    fields.vit.image_size = result["image_size"]
    config = HiCoConfig.from_dict(dict(fields))
    tiles = result["images"] * result["tiles"]
    train_flops = flops.hico_train_flops(config, result["tokens"], result["videos"] * result["frames"],
                                         result.get("supervised"), tiles=tiles)
    return _rates(result, median, train_flops, samples_per_s=result["videos"] + result["images"])
  if result["section"] == "clip":
    config = HiCoConfig.from_dict(dict(presets.hico(result["preset"])))
    clip_flops = flops.umt_clip_forward_flops(config.vit, config.llm.hidden_size) * result["frames"] / 4
    return _rates(result, median, clip_flops, frames_per_s=result["frames"])
  config = Qwen2Config.from_dict(dict(presets.llm(result["preset"])))
  train_flops = flops.qwen2_train_flops(config, result["seq_len"])
  return _rates(result, median, train_flops, tokens_per_s=result["seq_len"])


def _markdown(header: list[str], results: list[dict], label, cells) -> str:
  """A table of `header`'s columns: per result its `label(r)` cells, then `cells(r)` (or, for a failed case,
  its error in the first of them)."""
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    values = label(r)
    rest = len(header) - len(values)
    values += [r["error"]] + [""] * (rest - 1) if "error" in r else cells(r)
    rows.append("| " + " | ".join(str(v) for v in values) + " |")
  return "\n".join(rows)


def _timing_cells(r: dict, rate: str, rate_format: str) -> list[str]:
  """step s, the rate, TFLOP/s, MFU and peak GiB of a summarised result."""
  return [f"{r['median_s']:.3f}", format(r[rate], rate_format), f"{r['tflops_per_s']:.0f}",
          f"{100 * r['mfu']:.1f}%", f"{r['peak_gib']:.1f}"]


def _versus_torch(results: list[dict], key, rate: str):
  """r -> its rate over the torch case's with the same key, for the jax cases ("" otherwise)."""
  torch_rates = {key(r): r.get(rate) for r in results if r["framework"] == "torch"}

  def ratio(r):
    ref = torch_rates.get(key(r))
    return f"{r[rate] / ref:.2f}x" if ref and r["framework"] == "jax" else ""
  return ratio


def _clip_table(results: list[dict]) -> str:
  versus = _versus_torch(results, lambda r: (r["preset"], r["frames"]), "frames_per_s")

  def label(r):
    loop = f" (ViT {r['vit_block_loop']})" if r.get("vit_block_loop", "auto") != "auto" else ""
    return [r["preset"], presets.HICO_PRESETS[r["preset"]][1], r["frames"], r["framework"] + loop]
  return _markdown(["preset", "px", "frames", "framework", "step s", "frames/s", "TFLOP/s", "MFU", "peak GiB",
                    "vs torch"], results, label,
                   lambda r: _timing_cells(r, "frames_per_s", ",.0f") + [versus(r)])


def _train_table(results: list[dict]) -> str:
  def label(r):
    remat = (f"vit {r.get('vit_remat')}, llm {r['remat']}"
             f"{', Pallas LayerNorm' if r.get('vit_norm') == 'pallas' else ''}"
             f"{', ViT ' + r['vit_block_loop'] if r.get('vit_block_loop', 'auto') != 'auto' else ''}"
             f"{'' if r.get('options', True) else ', default XLA'}")
    return [r["preset"], r["frames"], r.get("tokens", ""), remat]
  return _markdown(["preset", "frames", "tokens", "remat", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"],
                   results, label, lambda r: _timing_cells(r, "tokens_per_s", ",.0f"))


def _mixed_table(results: list[dict]) -> str:
  def label(r):
    images = f" + {r['images']} images x {r['tiles']} tiles" if r["images"] else ""
    return [r["preset"], f"{r['videos']} x {r['frames']}-frame videos{images}"]
  return _markdown(["preset", "row", "tokens", "step s", "samples/s", "TFLOP/s", "MFU", "peak GiB"], results, label,
                   lambda r: [r["tokens"]] + _timing_cells(r, "samples_per_s", ".2f"))


def _ceilings_table(results: list[dict]) -> str:
  return _markdown(["framework", "device", "bf16 8192^3 matmul TFLOP/s", "of 989", "copy TB/s"], results,
                   lambda r: [r["framework"]],
                   lambda r: [r["device"], f"{r['matmul_tflops']:.0f}", f"{100 * r['matmul_tflops'] / 989:.0f}%",
                              f"{r['copy_tb_s']:.2f}"])


def _llm_table(results: list[dict]) -> str:
  versus = _versus_torch(results, lambda r: (r["preset"], r["seq_len"]), "tokens_per_s")
  return _markdown(["preset", "tokens", "framework", "remat", "params", "step s", "tokens/s", "TFLOP/s", "MFU",
                    "peak GiB", "vs torch"], results,
                   lambda r: [r["preset"], r["seq_len"], r["framework"], r.get("remat", "layer ckpt"),
                              r.get("param_dtype", "bf16")],
                   lambda r: _timing_cells(r, "tokens_per_s", ",.0f") + [versus(r)])


TABLES = {"ceilings": _ceilings_table, "train": _train_table, "mixed": _mixed_table, "clip": _clip_table,
          "llm": _llm_table}


def table(results: list[dict]) -> str:
  """The markdown table of one section's summarised results (the first result's section)."""
  return TABLES.get(results[0]["section"] if results else "llm", _llm_table)(results)
