"""Independent PyTorch reference for VideoChat-Flash's clip-level visual path.

Written from /work/shared/reference/videochat_flash.md §0-§3, §8: UMT-L encoder (23 blocks run)
-> ToMe "tome16_mlp_hd64" merge to 64 tokens per 4-frame clip -> 2-layer GELU MLP projector.
Used as the parity reference for the JAX port (CPU, fp32, eager attention) and as the PyTorch peer
in the GPU benchmark (CUDA, bf16, ``attention="sdpa"``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODER_PREFIX = "model.vision_tower.vision_tower.encoder."
PROJECTOR_PREFIX = "model.mm_projector."
BASE_GRID = 14          # the pretrained table is for 224 px / patch 16 = 14x14 per frame
BASE_FRAMES = 4         # ... and 4 frames per clip (784 positions)


# ----------------------------------------------------------------------------- position tables
def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """1-D sinusoid table (n, dim): angle = p / 10000^(2*(j//2)/dim); sin on even j, cos on odd j
    (interleaved). Built in float64, returned as float32."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return torch.tensor(table, dtype=torch.float32)


def position_table(image_size: int, num_frames: int = 4, patch: int = 16, dim: int = 1024) -> torch.Tensor:
    """Fixed position table (num_frames * g * g, dim), g = image_size // patch, order (t, h, w).

    The base is the 1-D table over 4 x 14 x 14 positions (p = t*196 + h*14 + w). If g != 14 each frame
    is resized 14 -> g with torch bicubic (align_corners=False), in float32. num_frames == 1 is the
    image table, which equals frame 0 of the video table. Temporal interpolation (num_frames not in
    {1, 4}) is not used by any released model and is not implemented."""
    if num_frames not in (1, BASE_FRAMES):
        raise NotImplementedError(f"num_frames must be 1 or {BASE_FRAMES}, got {num_frames}")
    grid = image_size // patch
    table = sinusoid_table(num_frames * BASE_GRID * BASE_GRID, dim)
    if grid != BASE_GRID:
        t = table.reshape(num_frames, BASE_GRID, BASE_GRID, dim).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(grid, grid), mode="bicubic", align_corners=False)
        table = t.permute(0, 2, 3, 1).reshape(num_frames * grid * grid, dim)
    return table


# ----------------------------------------------------------------------------- encoder
class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(3, width, kernel_size=(1, patch, patch), stride=(1, patch, patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, 3, T, H, W) -> (B, T*h*w, width)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """BEiT-style qkv: one bias-free fused Linear (rows [q|k|v], heads-major) + q_bias, v_bias; k bias 0."""

    def __init__(self, width: int, heads: int, attention: str):
        super().__init__()
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
        self.heads, self.attention = heads, attention
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                         # each (B, heads, N, hd)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            out = logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, attention)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UMTEncoder(nn.Module):
    """UMT-L vision encoder as run by VideoChat-Flash: patch embed + fixed sinusoid table + `depth`
    pre-norm blocks + final `vision_layernorm` (eps 1e-12). No CLS token."""

    def __init__(self, image_size=224, width=1024, depth=23, heads=16, mlp_dim=4096, patch=16,
                 num_frames=4, attention="eager"):
        super().__init__()
        self.image_size, self.width, self.heads, self.patch, self.num_frames = image_size, width, heads, patch, num_frames
        self.patch_embed = PatchEmbed(width, patch)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim, attention) for _ in range(depth))
        self.vision_layernorm = nn.LayerNorm(width, eps=1e-12)
        # Non-persistent: not in the state_dict (as in the original), but follows .to(device).
        self.register_buffer("pos_embed", position_table(image_size, num_frames, patch, width), persistent=False)
        self.register_buffer("img_pos_embed", position_table(image_size, 1, patch, width), persistent=False)

    def set_attention(self, attention: str) -> None:
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
        for blk in self.blocks:
            blk.attn.attention = attention

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, H, W) -> (B, T*(H/patch)*(W/patch), width)."""
        b, t, _, h, w = frames.shape
        if t != 1 and t != self.num_frames:
            raise ValueError(f"expected T == 1 (image) or T == {self.num_frames} (clip), got T={t}")
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} frames, got {h}x{w}")
        x = self.patch_embed(frames.permute(0, 2, 1, 3, 4))
        pos = self.img_pos_embed if t == 1 else self.pos_embed
        x = x + pos.to(dtype=x.dtype, device=x.device)
        for blk in self.blocks:
            x = blk(x)
        return self.vision_layernorm(x)


# ----------------------------------------------------------------------------- ToMe merge
def merge_schedule(p: int, target: int) -> list[int]:
    """r per step: while p != target, r = p - target if that is <= p // 2 (last step), else p // 2."""
    if p <= target:
        raise ValueError(f"{p} tokens should be greater than target {target}")
    rs = []
    while p != target:
        if p - target <= p // 2:
            rs.append(p - target)
            break
        rs.append(p // 2)
        p -= p // 2
    return rs


def _bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int, heads: int):
    """One size-weighted bipartite merge step. x (b, p, c), size (b, p, 1) -> (b, p - r, c), sizes."""
    b, p, c = x.shape
    with torch.no_grad():
        metric = x.reshape(b, p, heads, c // heads).mean(dim=2)           # "hd64" metric
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)     # (b, |A|, |B|)
        node_max, node_idx = scores.max(dim=-1)                           # best B for each A
        edge_idx = torch.argsort(node_max, dim=-1, descending=True, stable=True)[..., None]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:                          # sum-merge A_src into B
        a, bb = t[:, 0::2], t[:, 1::2]
        n_a, ch = a.shape[1], t.shape[-1]
        unm = a.gather(1, unm_idx.expand(b, n_a - r, ch))
        src = a.gather(1, src_idx.expand(b, r, ch))
        return torch.cat([unm, bb.scatter_add(1, dst_idx.expand(b, r, ch), src)], dim=1)

    x = merge(x * size)
    size = merge(size)
    return x / size, size


def merge_tokens_with_sizes(x: torch.Tensor, target: int = 64, heads: int | None = None):
    """ToMe16_mlp_hd64.merge_tokens, also returning the final token sizes (b, target, 1).

    The metric averages the channels over `heads` blocks of width // heads (official:
    ``x.reshape(b, p, num_attention_heads, c // num_attention_heads).mean(2)``); heads=None means
    width // 64 blocks of 64, which is the same thing for UMT-L (1024 / 16 heads)."""
    b, p, c = x.shape
    heads = c // 64 if heads is None else heads
    size = torch.ones_like(x[..., :1])
    for r in merge_schedule(p, target):
        x, size = _bipartite_merge(x, size, r, heads)
    return x, size


def merge_tokens(x: torch.Tensor, target: int = 64, heads: int | None = None) -> torch.Tensor:
    """(b, p, c) -> (b, target, c): unmerged A tokens (descending best-score order), then B tokens."""
    return merge_tokens_with_sizes(x, target, heads)[0]


# ----------------------------------------------------------------------------- projector, clip path
class Projector(nn.Module):
    def __init__(self, in_dim: int = 1024, hidden: int = 3584):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ClipEncoder(nn.Module):
    """frames (B, T, 3, H, W) -> (B, (T/4)*64, hidden); T == 1 is the image path (64 tokens)."""

    def __init__(self, image_size=224, width=1024, depth=23, heads=16, mlp_dim=4096, hidden=3584,
                 patch=16, num_frames=4, attention="eager", target=64):
        super().__init__()
        self.encoder = UMTEncoder(image_size, width, depth, heads, mlp_dim, patch, num_frames, attention)
        self.projector = Projector(width, hidden)
        self.target = target

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        nf = self.encoder.num_frames
        if t != 1 and t % nf:
            raise ValueError(f"T={t} must be 1 or a multiple of {nf}")
        clips = frames if t == 1 else frames.reshape(b * t // nf, nf, *frames.shape[2:])
        x = self.encoder(clips)                                        # (clips, nf*L, width), time order
        x = merge_tokens(x, self.target, heads=self.encoder.heads)
        return self.projector(x).reshape(b, -1, self.projector.mlp[2].out_features)


# ----------------------------------------------------------------------------- official key names
def official_state_dict(encoder: UMTEncoder, projector: Projector) -> dict[str, torch.Tensor]:
    out = {ENCODER_PREFIX + k: v.detach().clone() for k, v in encoder.state_dict().items()}
    out.update({PROJECTOR_PREFIX + k: v.detach().clone() for k, v in projector.state_dict().items()})
    return out


def load_official(encoder: UMTEncoder, projector: Projector, tensors, allow_other_keys: bool = False) -> None:
    """Load from official full key names; strict on missing/unexpected keys under both prefixes
    (keys outside them, e.g. the LLM's, are an error too unless allow_other_keys)."""
    parts: dict[str, dict[str, torch.Tensor]] = {ENCODER_PREFIX: {}, PROJECTOR_PREFIX: {}}
    other = []
    for key, value in tensors.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is None:
            other.append(key)
            continue
        parts[prefix][key[len(prefix):]] = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if other and not allow_other_keys:
        raise KeyError(f"unexpected keys outside the vision tower / projector: {other[:5]}")
    for module, prefix in ((encoder, ENCODER_PREFIX), (projector, PROJECTOR_PREFIX)):
        expected = module.state_dict()
        missing = sorted(set(expected) - set(parts[prefix]))
        unexpected = sorted(set(parts[prefix]) - set(expected))
        if missing or unexpected:
            raise KeyError(f"{prefix}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in parts[prefix].items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{prefix}{k}: shape {tuple(v.shape)} != {tuple(expected[k].shape)}")
        module.load_state_dict(parts[prefix], strict=True)


__all__ = ["sinusoid_table", "position_table", "UMTEncoder", "merge_schedule", "merge_tokens",
           "merge_tokens_with_sizes", "Projector", "ClipEncoder", "official_state_dict", "load_official"]
