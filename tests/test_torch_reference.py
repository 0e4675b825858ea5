"""Guards the independent PyTorch reference (tests/torch_reference) with facts from the spec
(/work/shared/reference/videochat_flash.md §1-§3, §8). Fast, CPU only."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.torch_reference.videochat_flash import (
    ClipEncoder, Projector, UMTEncoder, load_official, merge_schedule, merge_tokens,
    merge_tokens_with_sizes, official_state_dict, position_table, sinusoid_table)

TINY = dict(width=128, depth=2, heads=2, mlp_dim=256)


def test_full_size_structure_on_meta():
    with torch.device("meta"):
        enc = UMTEncoder()                                  # UMT-L, 23 blocks run
        proj = Projector(1024, 3584)
    sd = enc.state_dict()
    assert len(sd) == 303
    assert sum(v.numel() for v in sd.values()) == 290_479_104
    assert "blocks.22.attn.q_bias" in sd and "blocks.23.norm1.weight" not in sd
    assert "blocks.0.attn.k_bias" not in sd and "blocks.0.attn.qkv.bias" not in sd
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1024, 3, 1, 16, 16)
    assert tuple(sd["blocks.0.attn.qkv.weight"].shape) == (3072, 1024)
    assert "pos_embed" not in sd and "img_pos_embed" not in sd
    assert enc.blocks[0].norm1.eps == 1e-6 and enc.vision_layernorm.eps == 1e-12
    keys = official_state_dict(enc, proj)
    assert len(keys) == 307
    assert all(k.startswith(("model.vision_tower.vision_tower.encoder.", "model.mm_projector.mlp.")) for k in keys)
    assert sum(v.numel() for k, v in keys.items() if "mm_projector" in k) == 16_522_240


@pytest.mark.parametrize("p,target,expected", [
    (784, 64, [392, 196, 98, 34]),
    (3136, 64, [1568, 784, 392, 196, 98, 34]),
    (196, 64, [98, 34]),
    (1024, 64, [512, 256, 128, 64]),
    (256, 64, [128, 64]),
])
def test_merge_schedule(p, target, expected):
    assert merge_schedule(p, target) == expected
    assert p - sum(expected) == target


def test_sinusoid_table_literal():
    n, d = 50, 32
    ref = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    ref[:, 0::2], ref[:, 1::2] = np.sin(ref[:, 0::2]), np.cos(ref[:, 1::2])
    got = sinusoid_table(n, d)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor(ref, dtype=torch.float32))
    assert torch.equal(got[0], torch.tensor([0.0, 1.0] * (d // 2)))


def test_position_tables():
    v224, i224 = position_table(224, 4), position_table(224, 1)
    assert v224.shape == (784, 1024) and i224.shape == (196, 1024)
    assert torch.equal(v224, sinusoid_table(784, 1024))          # plain 1-D index t*196 + h*14 + w
    assert torch.equal(i224, v224[:196])
    v448, i448 = position_table(448, 4), position_table(448, 1)
    assert v448.shape == (3136, 1024) and i448.shape == (784, 1024)
    assert torch.equal(i448, v448[:784])
    # frame 2 of the 448 table = bicubic 14 -> 28 of frame 2 of the 224 table
    f2 = v224[2 * 196:3 * 196].reshape(14, 14, 1024).permute(2, 0, 1)[None]
    f2 = F.interpolate(f2, size=(28, 28), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    assert torch.equal(v448[2 * 784:3 * 784], f2.reshape(784, 1024))
    # generalised: any target grid is the base 224 table resized
    assert position_table(32, 4, dim=128).shape == (16, 128)
    with pytest.raises(NotImplementedError):
        position_table(224, 8)


def test_merge_count_and_size_conservation():
    torch.manual_seed(0)
    x = torch.randn(2, 784, 1024, dtype=torch.float64)
    out, size = merge_tokens_with_sizes(x, 64)
    assert out.shape == (2, 64, 1024) and size.shape == (2, 64, 1)
    assert torch.all(size.sum(1) == 784)
    torch.testing.assert_close((out * size).sum(1), x.sum(1), rtol=1e-10, atol=1e-9)
    assert merge_tokens(x[:, :196], 64).shape == (2, 64, 1024)


def test_planted_duplicate_is_merged_and_order():
    torch.manual_seed(1)
    p, c = 40, 128
    x = torch.randn(1, p, c, dtype=torch.float64)
    x[0, 13] = x[0, 6]                                      # A token 3 (pos 6) duplicates B token 6 (pos 13)
    out, size = merge_tokens_with_sizes(x, p - 1, heads=2)
    n_unm = p // 2 - 1
    b_out = out[0, n_unm:]
    assert torch.allclose(b_out[6], x[0, 13]) and size[0, n_unm + 6, 0] == 2
    assert torch.allclose(b_out, x[0, 1::2])                 # B keeps original order
    # unmerged A: all A but the duplicate, in descending best-score order (naive recomputation)
    m = x[0].reshape(p, 2, 64).mean(1)
    m = m / m.norm(dim=-1, keepdim=True)
    best = (m[0::2] @ m[1::2].T).max(-1).values
    order = [i for i in sorted(range(p // 2), key=lambda i: -best[i].item()) if i != 3]
    assert torch.allclose(out[0, :n_unm], x[0, 0::2][order])


def test_tie_rule_stable_lower_index_first():
    # every token's metric is exactly e_0 -> all scores exactly 1: node_idx -> B0, stable argsort -> A0..A(r-1)
    p, c, r = 16, 128, 3
    scale = torch.arange(1, p + 1, dtype=torch.float32)
    x = torch.zeros(1, p, c)
    x[0, :, 0] = scale
    x[0, :, 64] = scale
    out, size = merge_tokens_with_sizes(x, p - r, heads=2)
    a_idx = torch.arange(0, p, 2)
    assert torch.equal(out[0, : p // 2 - r, 0], scale[a_idx[r:]])            # unmerged A in index order
    assert size[0, p // 2 - r, 0] == r + 1                                    # B0 absorbed A0..A(r-1)
    assert torch.isclose(out[0, p // 2 - r, 0], scale[[0, 2, 4, 1]].mean())


def _tiny_frames(b, t, s, seed=0):
    return torch.randn(b, t, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [4, 1])
def test_tiny_encoder_eager_vs_sdpa(t):
    torch.manual_seed(0)
    enc = UMTEncoder(image_size=32, **TINY)
    for prm in enc.parameters():                            # non-zero biases, incl. q_bias / v_bias
        prm.data.normal_(0, 0.05)
    frames = _tiny_frames(2, t, 32)
    out_e = enc(frames)
    enc.set_attention("sdpa")
    out_s = enc(frames)
    assert out_e.shape == (2, t * 4, 128)
    torch.testing.assert_close(out_e, out_s, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        enc(_tiny_frames(1, 2, 32))


def test_tiny_encoder_image_uses_frame0_table():
    enc = UMTEncoder(image_size=32, **TINY)
    assert torch.equal(enc.img_pos_embed, enc.pos_embed[:4])
    frames = _tiny_frames(1, 4, 32)
    # with no blocks, the output is LN(patch + pos): frame 0 of a clip == the same frame as an image
    enc.blocks = torch.nn.ModuleList()
    torch.testing.assert_close(enc(frames)[:, :4], enc(frames[:, :1]))


def test_clip_encoder_and_official_roundtrip():
    torch.manual_seed(0)
    model = ClipEncoder(image_size=96, hidden=64, **TINY)   # 4 x 6 x 6 = 144 tokens/clip -> 64
    frames = _tiny_frames(2, 8, 96)
    out = model(frames)
    assert out.shape == (2, 2 * 64, 64)
    # clips are independent and in time order
    torch.testing.assert_close(out[:, 64:], model(frames[:, 4:]), rtol=1e-5, atol=1e-6)
    sd = {k: v.numpy() for k, v in official_state_dict(model.encoder, model.projector).items()}
    other = ClipEncoder(image_size=96, hidden=64, **TINY)
    load_official(other.encoder, other.projector, sd)
    torch.testing.assert_close(other(frames), out, rtol=0, atol=0)
    bad = dict(sd)
    bad.pop("model.mm_projector.mlp.2.bias")
    with pytest.raises(KeyError):
        load_official(other.encoder, other.projector, bad)
    with pytest.raises(KeyError):
        load_official(other.encoder, other.projector, {**sd, "model.vision_tower.vision_tower.encoder.blocks.2.norm1.weight": sd["model.vision_tower.vision_tower.encoder.blocks.1.norm1.weight"]})
    with pytest.raises(ValueError):
        model(_tiny_frames(1, 6, 96))


def test_clip_encoder_image_path():
    model = ClipEncoder(image_size=144, hidden=64, **TINY)  # 9 x 9 = 81 tokens -> 64
    assert model(_tiny_frames(3, 1, 144)).shape == (3, 64, 64)
