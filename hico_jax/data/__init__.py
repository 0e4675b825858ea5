"""Data: the TFDS LongVid builder and source, video decoding and sampling, chat text, Grain, synthetic data."""

# ImageNet statistics the UMT processor normalises with; here (not in video.py) so that code on the device
# side can import them without OpenCV or Pillow.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
