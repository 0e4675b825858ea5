"""Flax linen modules: the Qwen2 decoder, the UMT video ViT, the token merge, progressive visual dropout and
the HiCo model that joins them."""
