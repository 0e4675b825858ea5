"""hico_jax: VideoChat-Flash (HiCo) long-video multimodal LLMs in JAX/Flax."""

from hico_jax.tokens import IGNORE_INDEX, VIDEO_TOKEN_ID  # noqa: F401  # the package's public names


def from_pretrained(path: str, **kwargs):
  """A model directory (Hugging Face layout) as a callable model; see hico_jax.api."""
  from hico_jax import api  # imported here so that `import hico_jax` stays light
  return api.from_pretrained(path, **kwargs)
