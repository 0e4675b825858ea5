"""Checkpoint layouts (Hugging Face / PyTorch) <-> hico_jax params. Numpy and safetensors only, no torch."""
