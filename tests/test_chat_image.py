"""tools/chat.py --image: the prompt training gives an image turn, the reference's anyres tiles and layout, and
transformers' greedy answer on those embeddings (torch tower + merge + projector), for one image and for two."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file

from hico_jax import api, presets
from hico_jax.data import tokenizer as tk
from hico_jax.models import hico
from hico_jax.cli import chat as chat_tool
from tests.random_params import random_hico_params
from tests.torch_reference.llava_anyres import (ref_expand2square, ref_process_anyres_image_nopad,
                                                ref_processor_pixels, ref_spatial_nopad_layout)
from tests.torch_reference.videochat_flash import ClipEncoder, load_official


IMAGE, IM_END, ENDOFTEXT = -200, 151645, 151643
SIZE, NEW_TOKENS = 224, 5
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QUESTION = "What shape is in the picture?"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  config = hico.HiCoConfig.from_dict({
      "vit": dict(image_size=SIZE, width=128, depth=2, num_heads=2, mlp_dim=256, dtype="float32"),
      "llm": dict(presets.llm("tiny", dtype="float32", tie_word_embeddings=False))})
  path = tmp_path_factory.mktemp("videochat_flash_tiny_image")
  model = api.CausalLM(config, random_hico_params(config, seed=9), eos_ids=[IM_END], pad_id=ENDOFTEXT)
  model.save_pretrained(str(path))
  tokenizer_dir = tmp_path_factory.mktemp("qwen2_tokenizer_image")
  tk.build_qwen2_tokenizer_json(tokenizer_dir)
  for name in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, name), path)
  return str(path)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
  rng = np.random.default_rng(2)
  out = []
  for k, (width, height) in enumerate([(400, 230), (120, 260)]):   # the first alone: a 2x2 grid of 224
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("images") / f"picture{k}.png")
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(path)
    out.append(path)
  return out


@pytest.fixture(scope="module")
def reference(checkpoint):
  tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
  encoder = ClipEncoder(image_size=SIZE, width=128, depth=2, heads=2, mlp_dim=256, hidden=64).eval()
  load_official(encoder.encoder, encoder.projector, tensors, allow_other_keys=True)
  with open(os.path.join(checkpoint, "config.json")) as f:
    llm_config = transformers.Qwen2Config(**json.load(f))
  llm_config._attn_implementation = "eager"
  llm = transformers.Qwen2ForCausalLM(llm_config).eval()
  llm.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()
                       if not k.startswith(("model.vision_tower.", "model.mm_projector."))}, strict=True)
  return transformers.Qwen2TokenizerFast.from_pretrained(checkpoint), encoder, llm


def _tiles_tokens(encoder, pixels_uint8):
  x = ((pixels_uint8.astype(np.float64) / 255 - MEAN) / STD).astype(np.float32)
  with torch.no_grad():
    return encoder(torch.from_numpy(x).permute(0, 3, 1, 2)[:, None]).numpy()      # (tiles, 64, H)


def _expected(reference, paths):
  hf_tok, encoder, llm = reference
  images = [Image.open(p).convert("RGB") for p in paths]
  if len(images) == 1:
    tokens = _tiles_tokens(encoder, ref_process_anyres_image_nopad(images[0], SIZE, "(1x1),...,(6x6)"))
    visual = [ref_spatial_nopad_layout(tokens, images[0].size, "(1x1),...,(6x6)", SIZE)]
  else:
    mean = tuple(int(v * 255) for v in MEAN)
    visual = [_tiles_tokens(encoder, ref_processor_pixels(ref_expand2square(im, mean), SIZE)[None])[0]
              for im in images]
  prompt = SYSTEM + "<|im_start|>user\n" + "<image>\n" * len(images) + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
  ids = []
  for j, chunk in enumerate(prompt.split("<image>")):
    if j:
      ids.append(IMAGE)
    ids += hf_tok(chunk, add_special_tokens=False).input_ids
  with torch.no_grad():
    text = llm.model.embed_tokens(torch.tensor([max(i, 0) for i in ids]))
    pieces, start = [], 0
    for at, v in zip([k for k, i in enumerate(ids) if i == IMAGE], visual):
      pieces += [text[start:at], torch.from_numpy(v)]
      start = at + 1
    pieces.append(text[start:])
    out = llm.generate(inputs_embeds=torch.cat(pieces)[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                       eos_token_id=[IM_END], pad_token_id=ENDOFTEXT)[0].tolist()
  return ids, (out[:out.index(IM_END)] if IM_END in out else out), hf_tok.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("count", [1, 2])
def test_image_question_is_the_training_image_turn_and_transformers_greedy_answer(checkpoint, image_files,
                                                                                  reference, count, capsys):
  argv = ["--model", checkpoint, "--question", QUESTION, "--max_new_tokens", str(NEW_TOKENS), "--json"]
  for path in image_files[:count]:
    argv += ["--image", path]
  rc = chat_tool.main(argv)
  out, err = capsys.readouterr()
  assert rc == 0, err
  turn = json.loads(out)
  ids, answer_ids, answer = _expected(reference, image_files[:count])
  assert turn["prompt_ids"] == ids
  assert turn["answer_ids"] == answer_ids and turn["answer"] == answer


def test_a_broken_image_is_named_in_one_line_before_the_model_loads(tmp_path, capsys):
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not really a jpeg")
  rc = chat_tool.main(["--model", str(tmp_path), "--image", str(broken), "--question", "?"])
  _, err = capsys.readouterr()
  assert rc == 2 and "broken.jpg" in err and len(err.strip().splitlines()) == 1
