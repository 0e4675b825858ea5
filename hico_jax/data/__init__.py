"""Input pipeline: tokenizer, video decoding, packing and batching."""
