"""hico_jax: VideoChat-Flash (HiCo) long-video multimodal LLMs in JAX/Flax."""

# The reference's IMAGE_TOKEN_INDEX: marks, once per sample, where the video's visual tokens go.
VIDEO_TOKEN_ID = -200
# The reference's IGNORE_INDEX: the label of a token the loss does not supervise (prompt, visual, padding).
IGNORE_INDEX = -100


def from_pretrained(path: str, **kwargs):
  """A model directory (Hugging Face layout) as a callable model; see hico_jax.api."""
  from hico_jax import api  # imported here so that `import hico_jax` stays light
  return api.from_pretrained(path, **kwargs)
