"""Pure-functional Flax linen modules: the Qwen2 decoder now; the video ViT, merge and HiCo model later."""
