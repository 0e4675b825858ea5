"""Image records from annotation to packed batch: several media files per record, the builder, decoding and
tiling in the pipeline, bad images skipped and counted, and an image and a video packed in one row giving the
logits each gives alone."""

import json

import numpy as np
import pytest
import yaml
from absl import flags
from PIL import Image

from hico_jax import VIDEO_TOKEN_ID, api, presets
from hico_jax.data import pipeline, synthetic, tfds_longvid, video as video_io
from hico_jax.data import tokenizer as tk
from hico_jax.models import hico
from tests.random_params import random_hico_params
from tests.torch_reference.llava_anyres import (ref_get_anyres_image_grid_shape, ref_process_anyres_image_nopad,
                                                ref_spatial_nopad_layout)

flags.FLAGS.mark_as_parsed()

SIZE = 224
TURNS = [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A picture."}]
PAIR_TURNS = [{"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "No."}]


def _picture(width, height, seed):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """LLaVA-format annotations (an image dataset, a video dataset) with their files, the YAML list, the shards."""
  root = tmp_path_factory.mktemp("image_pipeline")
  media = root / "media"
  media.mkdir()
  _picture(2 * SIZE, SIZE, 1).save(media / "wide.png")                       # 2x1 grid: 3 tiles
  _picture(90, 250, 2).convert("RGB").save(media / "tall.jpg", quality=95)   # 1x3 grid: 4 tiles
  _picture(120, 60, 3).save(media / "pair_a.png")
  _picture(60, 80, 4).save(media / "pair_b.png")
  _picture(6 * SIZE, 6 * SIZE, 5).save(media / "huge.png")                   # 6x6 grid: 37 tiles
  (media / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(500))
  (media / "empty.jpg").write_bytes(b"")
  frames = np.stack([np.full((SIZE, SIZE, 3), 30 * k + 20, np.uint8) for k in range(8)])
  synthetic.write_video(media / "clip.mp4", frames, fps=4)
  image_records = [
      {"id": "wide", "image": "wide.png", "conversations": TURNS},
      {"id": "tall", "image": ["tall.jpg"], "conversations": TURNS},
      {"id": "pair", "image": ["pair_a.png", "pair_b.png"], "conversations": PAIR_TURNS},
      {"id": "huge", "image": "huge.png", "conversations": TURNS},
      {"id": "corrupt", "image": "corrupt.jpg", "conversations": TURNS},
      {"id": "empty", "image": "empty.jpg", "conversations": TURNS},
      {"id": "missing", "image": ["pair_a.png", "nowhere.png"], "conversations": PAIR_TURNS},
  ]
  (root / "images.json").write_text(json.dumps(image_records))
  video_records = [{"id": "clip", "video": "clip.mp4", "conversations": [
      {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "It brightens."}]}]
  (root / "videos.json").write_text(json.dumps(video_records))
  (root / "data.yaml").write_text(yaml.safe_dump({"datasets": [
      {"json_path": "images.json", "data_root": "media"}, {"json_path": "videos.json", "data_root": "media"}]}))
  report = tfds_longvid.build(str(root / "data.yaml"), str(root / "shards"), log=lambda _: None)
  tk.build_qwen2_tokenizer_json(root / "tokenizer")
  return {"root": root, "media": media, "report": report, "shards": str(root / "shards"),
          "tokenizer": str(root / "tokenizer")}


def _config(built, **overrides):
  fields = dict(shards=built["shards"], tokenizer_dir=built["tokenizer"], image_size=SIZE, token_budget=2048,
                frame_budget=8, tile_budget=8, max_samples_per_row=8, sampling="middle", num_frames=4, min_frames=4,
                max_frames=4, num_packing_bins=1, seed=0, num_epochs=1)
  fields.update(overrides)
  return pipeline.DataConfig.from_dict(fields)


# ---------------------------------------------------------------------------------------------------------------

def test_builder_stores_each_images_bytes_and_skips_a_missing_one(built):
  report = built["report"]
  assert [(name, rid) for name, rid, _ in report.skipped_ids] == [("images", "missing")]
  assert "nowhere.png" in report.skipped_ids[0][2]
  source = tfds_longvid.LongVidSource(built["shards"])
  by_id = {}
  for i in range(len(source)):
    header, parts = source[i]
    by_id[header["id"]] = (header, list(parts))
  assert by_id["pair"][1] == [(built["media"] / n).read_bytes() for n in ("pair_a.png", "pair_b.png")]
  assert by_id["wide"][1] == [(built["media"] / "wide.png").read_bytes()]
  assert by_id["empty"][1] == [b""] and by_id["clip"][0]["media_type"] == "video"


def test_decoded_samples_hold_the_reference_tiles_and_token_layout(built):
  decode = pipeline.DecodeSample(_config(built))
  source = tfds_longvid.LongVidSource(built["shards"])
  samples = {}
  for i in range(len(source)):
    header, _ = source[i]
    samples[header["id"]] = decode.map(source[i])
  for rid, name in (("wide", "wide.png"), ("tall", "tall.jpg")):
    picture = Image.open(built["media"] / name).convert("RGB")
    sample = samples[rid]
    assert not sample["skip"]
    np.testing.assert_array_equal(sample["tiles"], ref_process_anyres_image_nopad(picture, SIZE, "(1x1),...,(6x6)"))
    placeholders = sample["input_ids"] == VIDEO_TOKEN_ID
    features = np.arange(len(sample["tiles"]) * 64)[:, None].reshape(len(sample["tiles"]), 64, 1)
    expected = ref_spatial_nopad_layout(features, picture.size, "(1x1),...,(6x6)", SIZE)[:, 0]
    np.testing.assert_array_equal(sample["image_order"][placeholders], expected)
    assert (sample["image_order"][~placeholders] == -1).all()
    # preprocess_multimodal moved the lone tag to the front of the turn: "<image>\nWhat is shown?"
    first = np.flatnonzero(placeholders)[0]
    assert sample["input_ids"][first + len(expected)] == 198          # "\n" right after the visual tokens
  cols, rows = ref_get_anyres_image_grid_shape((90, 250), "(1x1),...,(6x6)", SIZE)
  assert len(samples["tall"]["tiles"]) == 1 + cols * rows
  pair = samples["pair"]
  assert pair["tiles"].shape == (2, SIZE, SIZE, 3)
  np.testing.assert_array_equal(pair["image_order"][pair["input_ids"] == VIDEO_TOKEN_ID], np.arange(128))
  assert samples["clip"]["tiles"].shape == (0, SIZE, SIZE, 3) and (samples["clip"]["image_order"] == -1).all()
  for rid in ("huge", "corrupt", "empty"):
    assert samples[rid]["skip"], rid


def test_bad_images_and_images_over_the_tile_budget_are_skipped_and_counted(built):
  batches = list(pipeline.make_dataset(_config(built), batch_size=1))
  assert sum(int(b["num_skipped"]) for b in batches) == 3                 # huge (37 tiles > 8), corrupt, empty
  assert all(b["tiles"].shape[1:] == (8, SIZE, SIZE, 3) for b in batches)
  # A stage without images (tile_budget 0, the default) skips every image record and counts it.
  batches = list(pipeline.make_dataset(_config(built, tile_budget=0), batch_size=1))
  assert sum(int(b["num_skipped"]) for b in batches) == 6 and "tiles" not in batches[0]


def test_an_image_and_a_video_packed_in_one_row_give_the_logits_each_gives_alone(built):
  config = hico.HiCoConfig.from_dict({
      "vit": dict(image_size=SIZE, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", tie_word_embeddings=False)), "encode_chunk": 2})
  params = random_hico_params(config, seed=3)
  model = api.CausalLM(config, params)
  data = _config(built, strategies={"images": "first:1"})                   # "wide", then the video
  rows = [b for b in pipeline.make_dataset(data, batch_size=1)]
  assert len(rows) == 1 and set(rows[0]["segment_ids"][0]) == {0, 1, 2}, "both samples in one row"
  batch = rows[0]
  logits, _ = hico.HiCo(config).apply(
      {"params": model.params}, batch["input_ids"], video_io.normalize(batch["frames"])[:, None],
      segment_ids=batch["segment_ids"], positions=batch["positions"],
      images=video_io.normalize(batch["tiles"]), visual_index=batch["visual_index"])
  logits = np.asarray(logits)[0]

  segments = batch["segment_ids"][0]
  picture = Image.open(built["media"] / "wide.png")
  for segment in (1, 2):
    ids = batch["input_ids"][0][segments == segment]
    first = np.flatnonzero(ids == VIDEO_TOKEN_ID)[0]
    count = int(np.sum(ids == VIDEO_TOKEN_ID))
    prompt = np.concatenate([ids[:first], [VIDEO_TOKEN_ID], ids[first + count:]])[None]
    if count == 3 * 64:                                                   # the image: 3 tiles
      alone = model(prompt, images=[picture])[0]
    else:
      assert count == 4 * 16
      alone = model(prompt, video=video_io.normalize(batch["frames"][0, :4])[None])[0]
    np.testing.assert_allclose(logits[segments == segment], alone, atol=1e-4, rtol=0)


def test_image_sample_tag_count_must_match_its_images(built):
  decode = pipeline.DecodeSample(_config(built))
  png = (built["media"] / "pair_a.png").read_bytes()
  data = ({"id": "one_tag_two_images", "dataset": "x", "media_type": "image", "conversations": TURNS}, [png, png])
  assert decode.map(data)["skip"]


@pytest.mark.parametrize("field, value, message", [("tile_budget", -1, r"data\.tile_budget=-1 must be >= 0"),
                                                   ("image_grid_pinpoints", "6x6", "name no '\\(AxB\\)'")])
def test_bad_image_settings_are_config_errors(built, field, value, message):
  with pytest.raises(ValueError, match=message):
    _config(built, **{field: value})


def test_image_prompts_are_the_references_text_around_each_images_placeholders(built):
  """preprocess_multimodal (msg=""): a lone tag moves to the front of its turn followed by a newline; several
  tags stay where they are; tokenizer_image_token pieces; plain (stage 1): the tag, the caption, a newline.
  Tokenized here by transformers, independently of hico_jax.data.text."""
  import transformers
  from hico_jax.data import text
  hf_tok = transformers.Qwen2TokenizerFast.from_pretrained(built["tokenizer"])
  ours_tok = tk.load_tokenizer(built["tokenizer"])
  system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

  def reference(prompt, counts):
    ids = []
    for j, chunk in enumerate(prompt.split("<image>")):
      ids += [VIDEO_TOKEN_ID] * counts[j - 1] if j else []
      ids += hf_tok(chunk, add_special_tokens=False).input_ids
    return ids

  one = text.encode_sample(TURNS, ours_tok, image_tokens=[192])
  expected = reference(system + "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
                       "A picture.<|im_end|>\n", [192])
  assert one["input_ids"].tolist() == expected
  two = text.encode_sample(PAIR_TURNS, ours_tok, image_tokens=[64, 64])
  assert two["input_ids"].tolist() == reference(system + "<|im_start|>user\n<image>\n<image>\nSame colour?<|im_end|>"
                                                "\n<|im_start|>assistant\nNo.<|im_end|>\n", [64, 64])
  plain = text.encode_sample(TURNS, ours_tok, image_tokens=[128], template="plain")
  assert plain["input_ids"].tolist() == reference("<image>A picture.\n", [128])
  assert (plain["labels"][:128] == -100).all() and (plain["labels"][128:] >= 0).all()
