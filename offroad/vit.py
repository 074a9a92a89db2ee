"""The frozen backbone: DINOv2 ViT/14, state-dict compatible with facebookresearch/dinov2; the architecture only
(its pretrained weights: offroad.weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offroad.config import BACKBONES, PATCH, VIT_ARCHS

GRID = 37  # pos_embed grid: pretrained at 518 = 37 * 14
REGISTERS = 4  # register tokens of the _reg variants
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ATTENTION_KERNELS = ("sdpa", "matmul")


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "matmul") -> Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, N, d] tensors.

    kernel "matmul" applies to bf16 on the CPU only: matmul -> softmax -> matmul, one image at a time (the
    [heads, N, N] scores stay small). On an AMD EPYC with AVX-512 bf16 it ran at 380 GFLOP/s where SDPA's CPU
    flash kernel ran at 145; on an Intel Xeon with AMX, SDPA is the faster one (offroad.runtime picks).
    """
    if kernel == "matmul" and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        scale = q.shape[-1] ** -0.5
        return torch.stack([((qi * scale) @ ki.transpose(-2, -1)).softmax(-1) @ vi for qi, ki, vi in zip(q, k, v)])
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.kernel = "sdpa"  # see `attention`; DinoVisionTransformer.set_attention

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v, self.kernel).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C], row-major


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT/14 as in the official hub models (img 518, LayerScale 1.0, MLP ratio 4, no dropout)."""

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, num_registers: int = 0):
        super().__init__()
        self.embed_dim, self.num_registers, self.patch_size = embed_dim, num_registers, PATCH
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used only in pretraining; kept for the state dict
        self._init_weights()

    def _init_weights(self) -> None:
        # official: trunc_normal_(std=0.02) with bounds +-2, i.e. +-100 std: the same distribution, 6x slower
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def keep_weights_in(self, dtype: torch.dtype) -> None:
        """Store the Linear and patch-embedding weights in `dtype`, for a frozen backbone run under autocast to
        that dtype. Autocast casts weights that need no grad anew on every call (its cast cache keeps only
        weights that need grad); stored copies give bitwise the same result without those casts. Norms,
        LayerScale and the embeddings stay fp32, as autocast runs them."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.to(dtype)

    def set_attention(self, kernel: str) -> None:
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r} is not one of {ATTENTION_KERNELS}")
        for block in self.blocks:
            block.attn.kernel = kernel

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """pos_embed for an h x w patch grid, resampled exactly as the official code does."""
        pos = self.pos_embed
        if h == w == GRID:
            return pos
        grid = pos[:, 1:].float().reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
        if self.num_registers:
            resize = dict(size=(h, w), antialias=True)
        else:  # the 0.1 offset and scale-factor sampling of the original release
            resize = dict(scale_factor=((h + 0.1) / GRID, (w + 0.1) / GRID), antialias=False)
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, **resize)
        return torch.cat((pos[:, :1], grid.flatten(2).transpose(1, 2).to(pos.dtype)), dim=1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        if H % PATCH or W % PATCH:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {PATCH}")
        x = torch.cat((self.cls_token.expand(B, -1, -1), self.patch_embed(x)), dim=1)
        x = x + self.interpolate_pos_encoding(H // PATCH, W // PATCH)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> final-normed patch tokens [B, H/14 * W/14, C]."""
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 1 + self.num_registers:])

    def get_intermediate_layers(self, x: Tensor, n: int, norm: bool = True) -> tuple[Tensor, ...]:
        """Patch tokens after each of the last n blocks."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n={n} must be between 1 and the depth {len(self.blocks)}")
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(x[:, 1 + self.num_registers:])
        return tuple(self.norm(out) if norm else out for out in outputs)


def build_backbone(name: str, seed: int = 0) -> DinoVisionTransformer:
    """Randomly initialised `dinov2_vit{s,b,l}14[_reg]`, deterministic from seed (global RNG untouched)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    arch = name.removeprefix("dinov2_").removesuffix("_reg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DinoVisionTransformer(*VIT_ARCHS[arch], num_registers=REGISTERS if name.endswith("_reg") else 0)


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] RGB -> float [B, 3, H, W], /255 then ImageNet mean/std."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
