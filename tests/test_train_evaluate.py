"""The trainer's held-out evaluation (hico_jax/train/evaluate.py) scores as a full-logits recount does."""

import jax
import numpy as np
import pytest

from hico_jax.data import pipeline, tfds_longvid, tokenizer, video as video_lib
from hico_jax.models.hico import HiCo, HiCoConfig
from hico_jax.train import step as step_lib
from tests.random_params import random_hico_params
from tests.train_setup import trainer_config


# qwen_2 takes ~64 s on 2 cores: slow; plain (the stage-1 template, whose "." and "\n" merge into one token)
# runs the same scoring in the default suite.

@pytest.mark.parametrize("template", [pytest.param("qwen_2", marks=pytest.mark.slow), "plain"])
def test_held_out_scores_equal_a_full_logits_recount(synthetic_data, template):
  """evaluate_qa forms the head only at answer positions; recount its choice and exact scores from the
  model's full logits, candidates drawn as it draws them, on a randomly initialised model (scores near chance,
  so both outcomes occur). With stage 1's plain template the sample ends in the caption and a newline, one
  piece of text, and training supervises both: the recount scores the tokens of caption + newline."""
  from hico_jax.data import text
  from hico_jax.train import evaluate
  config = trainer_config(synthetic_data)
  config.data.template = template
  config.eval.shards, config.eval.max_per_task = str(synthetic_data / "shards"), 1
  data_config = pipeline.DataConfig.from_dict(dict(config.data))
  model_config = HiCoConfig.from_dict(dict(config.model))
  model = HiCo(model_config)
  params = random_hico_params(model_config, seed=3)
  ours = evaluate.evaluate_qa(model, params, config.eval, data_config)

  tok = tokenizer.load_tokenizer(data_config.tokenizer_dir)
  source = tfds_longvid.LongVidSource(config.eval.shards)
  headers = [source[i] for i in range(len(source))]
  distinct = {}
  for header, _ in headers:
    distinct.setdefault(header["dataset"], set()).add(header["conversations"][1]["value"].strip())
  # Zero padding after a prompt changes none of its causal logits; one padded length, one compile.
  padded_logits = jax.jit(lambda ids, frames: model.apply(
      {"params": params}, ids[None], step_lib.normalize_frames(frames[None])[:, None])[0])
  full_logits = lambda ids, frames: padded_logits(np.pad(ids, (0, 256 - len(ids))), frames)
  rng, counts = np.random.default_rng(0), {}
  for header, media in headers:
    task = header["dataset"]
    if counts.get(task, (0, 0, 0))[2] >= 1:
      continue
    question, answer = header["conversations"][:2]
    raw, info = video_lib.decode_frames(media[0], mode=data_config.sampling, num_frames=data_config.num_frames,
                                        min_frames=data_config.min_frames, max_frames=data_config.max_frames)
    frames = video_lib.resize_frames(raw, data_config.image_size)
    others = [a for a in sorted(distinct[task]) if a != answer["value"].strip()]
    candidates = [answer["value"].strip()] + list(rng.choice(others, min(4, len(others)), replace=False))
    totals, exact = [], False
    for row, candidate in enumerate(candidates):
      ids = np.asarray(text.encode_sample([question, {"from": "gpt", "value": candidate}], tok,
                                          num_frames=len(frames), duration=info["duration"],
                                          template=data_config.template)["input_ids"])
      log_p = np.asarray(jax.nn.log_softmax(np.asarray(full_logits(ids, frames)[0], np.float64), axis=-1))
      if template == "plain":                         # ... caption \n
        n, end = len(tok.encode(candidate + "\n")), len(ids)
      else:                                           # ... answer <|im_end|> \n
        n, end = len(tok.encode(candidate)), len(ids) - 2
      predicted_by = np.arange(end - n - 1, end - 1)
      totals.append(log_p[predicted_by, ids[end - n:end]].sum())
      exact = exact or (row == 0 and bool(np.all(log_p[predicted_by].argmax(-1) == ids[end - n:end])))
    c, e, s = counts.get(task, (0, 0, 0))
    counts[task] = (c + int(np.argmax(totals) == 0), e + int(exact), s + 1)
  assert set(ours) == set(counts)
  for task, (c, e, s) in counts.items():
    assert (ours[task]["choice"], ours[task]["exact"], ours[task]["count"]) == (c / s, e / s, s), task
    assert ours[task]["skipped"] == 0, task


def test_held_out_picture_scores_equal_a_full_logits_recount(synthetic_data, tmp_path):
  """evaluate_qa on picture records (the default's 64 px model: 16 tokens a tile) against a recount that builds
  each prompt's visual tokens itself: the reference's anyres tiles and spatial_nopad layout (numpy transcriptions
  in tests/torch_reference) for one picture, expand2square + resize for two, each tile through the tower alone,
  spliced into the text embeddings by hand and run through the decoder for full logits."""
  import jax.numpy as jnp
  from PIL import Image
  from hico_jax import VIDEO_TOKEN_ID
  from hico_jax.data import synthetic_images, text
  from hico_jax.train import evaluate
  from tests.torch_reference.llava_anyres import (ref_expand2square, ref_process_anyres_image_nopad,
                                                  ref_processor_pixels, ref_spatial_nopad_layout)
  pictures = synthetic_images.make_image_dataset(tmp_path / "pictures", num_images=8, seed=1, size=64)
  tfds_longvid.build(str(pictures), str(tmp_path / "shards"), log=lambda _: None)
  config = trainer_config(synthetic_data)
  config.data.tile_budget = 5
  config.eval.shards, config.eval.max_per_task = str(tmp_path / "shards"), 2
  model_config = HiCoConfig.from_dict(dict(config.model))
  data_config = pipeline.DataConfig.from_dict(dict(config.data), **model_config.pipeline_counts())
  assert data_config.tokens_per_tile == 16
  model = HiCo(model_config)
  params = random_hico_params(model_config, seed=4)
  ours = evaluate.evaluate_qa(model, params, config.eval, data_config)

  tok = tokenizer.load_tokenizer(data_config.tokenizer_dir)
  pinpoints, mean = "(1x1),...,(6x6)", tuple(int(x * 255) for x in (0.485, 0.456, 0.406))
  encode = jax.jit(lambda tiles: model.apply({"params": params}, step_lib.normalize_frames(tiles)[None],
                                             method=HiCo.encode_images)[0])
  embed = jax.jit(lambda ids: model.apply({"params": params}, ids, method=lambda m, i: m.llm.embed(i)))
  logits_of = jax.jit(lambda e: model.apply({"params": params}, e, method=lambda m, x: m.llm(embeddings=x))[0])
  source = tfds_longvid.LongVidSource(config.eval.shards)
  headers = [source[i] for i in range(len(source))]
  distinct = {}
  for header, _ in headers:
    distinct.setdefault(header["dataset"], set()).add(header["conversations"][1]["value"].strip())
  rng, counts = np.random.default_rng(0), {}
  for header, _ in headers:
    task = header["dataset"]
    if counts.get(task, (0, 0, 0))[2] >= 2:
      continue
    files = header["source"] if isinstance(header["source"], list) else [header["source"]]
    images = [Image.open(tmp_path / "pictures" / "images" / f).convert("RGB") for f in files]
    if len(images) == 1:
      tiles = ref_process_anyres_image_nopad(images[0], 64, pinpoints)
      tokens = np.asarray(encode(tiles)).reshape(len(tiles), 16, -1)
      visual = [ref_spatial_nopad_layout(tokens, images[0].size, pinpoints, 64, per_side=4)]
    else:
      visual = [np.asarray(encode(ref_processor_pixels(ref_expand2square(im, mean), 64)[None])) for im in images]
    question, answer = header["conversations"][:2]
    others = [a for a in sorted(distinct[task]) if a != answer["value"].strip()]
    candidates = [answer["value"].strip()] + list(rng.choice(others, min(4, len(others)), replace=False))
    totals, exact = [], False
    for row, candidate in enumerate(candidates):
      ids = np.asarray(text.encode_sample([question, {"from": "gpt", "value": candidate}], tok,
                                          image_tokens=[len(v) for v in visual])["input_ids"])
      embeddings = np.array(embed(jnp.asarray(np.where(ids == VIDEO_TOKEN_ID, 0, ids))[None])[0])
      embeddings[ids == VIDEO_TOKEN_ID] = np.concatenate(visual)       # the pictures' tokens in order
      padded = np.pad(embeddings, ((0, 128 - len(ids)), (0, 0)))     # zeros after a prompt change none of its logits
      log_p = np.asarray(jax.nn.log_softmax(np.asarray(logits_of(jnp.asarray(padded)[None])[0], np.float64)))
      n, end = len(tok.encode(candidate)), len(ids) - 2                # ... answer <|im_end|> \n
      predicted_by = np.arange(end - n - 1, end - 1)
      totals.append(log_p[predicted_by, ids[end - n:end]].sum())
      exact = exact or (row == 0 and bool(np.all(log_p[predicted_by].argmax(-1) == ids[end - n:end])))
    c, e, s = counts.get(task, (0, 0, 0))
    counts[task] = (c + int(np.argmax(totals) == 0), e + int(exact), s + 1)
  assert set(ours) == set(counts) == set(synthetic_images.IMAGE_TASKS)
  for task, (c, e, s) in counts.items():
    assert (ours[task]["choice"], ours[task]["exact"], ours[task]["count"]) == (c / s, e / s, s), task
    assert ours[task]["media"] == "image" and ours[task]["skipped"] == 0, task
