"""Benchmark cases (tools/benchmark.py is their command line; docs/benchmarks.md quotes its commands).

Each case is a function `case dict -> result dict` run in its own subprocess (isolated.py), so one framework's
memory never crowds the other and a crash or an out-of-memory is one row of the table, not the end of the run:
  llm.py         Qwen2 forward + backward, hico_jax against transformers
  clip.py        clip encoding (ViT + merge + projector), hico_jax against the PyTorch reference
  train_step.py  the trainer's full train step on one row of video
  mixed.py       the same step on one packed row of videos, with and without image samples
  ceilings.py    the device's bf16 matmul rate and copy bandwidth (jax, torch)
  data_decode.py decode + sample + resize frames/s per CPU core
cases.py maps a command line's sections to cases and cases to their functions; report.py turns results into
rates, MFU and markdown tables; timing.py is the one timer.
"""
