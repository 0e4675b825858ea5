"""Inference: prefill + decode generation with a preallocated KV cache."""
