"""Token ids the reference gives a meaning to, shared by the data, the models and the loss: a leaf, so that no
module has to import the package root (whose from_pretrained reaches the whole model stack) for them."""

# The reference's IMAGE_TOKEN_INDEX: marks, once per sample, where the video's visual tokens go.
VIDEO_TOKEN_ID = -200
# The reference's IGNORE_INDEX: the label of a token the loss does not supervise (prompt, visual, padding).
IGNORE_INDEX = -100
