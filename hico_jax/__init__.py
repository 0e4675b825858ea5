"""hico_jax: VideoChat-Flash (HiCo) long-video multimodal LLMs in JAX/Flax."""

# The reference's IMAGE_TOKEN_INDEX: marks, once per sample, where the video's visual tokens go.
VIDEO_TOKEN_ID = -200
