"""Data: the TFDS LongVid builder and source, video decoding and sampling, chat text, Grain, synthetic data."""

import numpy as np

# ImageNet statistics the UMT processor normalises with; here (not in video.py) so that code on the device
# side can import them without OpenCV or Pillow.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(frames_uint8: np.ndarray) -> np.ndarray:
  """uint8 frames -> float32: x / 255 in float64 cast to float32, then (x - mean) / std in float32, the
  order transformers' rescale and normalize use, so the result matches the reference bit for bit.
  (Here for the same reason as the constants; `hico_jax.data.video.normalize` is this function.)"""
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  x = (np.asarray(frames_uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - mean) / std
