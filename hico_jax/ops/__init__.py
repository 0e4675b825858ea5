"""Numerical kernels shared by the models: attention, rotary embeddings, losses."""
