"""Frozen DINOv2 ViT backbone (state-dict compatible with facebookresearch/dinov2), segmentation heads,
and the head checkpoints that train writes and evaluate reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.errors import PipelineError
from stages.params import Model, Params

ARCHS = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16)}  # embed dim, depth, heads
PATCH = 14
GRID = 37  # pos_embed grid: pretrained at 518 = 37 * 14
REGISTERS = 4  # register tokens of the _reg variants
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
URL = "https://dl.fbaipublicfiles.com/dinov2"


class WeightsError(PipelineError):
    pass


class CheckpointError(PipelineError):
    pass


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, N, d] tensors."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # SDPA's CPU flash kernel runs at ~1/5 of the bf16 matmul speed; plain matmuls + softmax are 2.5x
        # faster. One image at a time keeps the [heads, N, N] scores small (cache, allocator).
        scale = q.shape[-1] ** -0.5
        return torch.stack([((qi * scale) @ ki.transpose(-2, -1)).softmax(-1) @ vi for qi, ki, vi in zip(q, k, v)])
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, C))


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
    arch = name.removeprefix("dinov2_").removesuffix("_reg")
    if not name.startswith("dinov2_") or arch not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; expected dinov2_vit{{s,b,l}}14 with optional _reg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DinoVisionTransformer(*ARCHS[arch], num_registers=REGISTERS if name.endswith("_reg") else 0)


def official_weights(name: str) -> tuple[str, Path]:
    """URL of the official pretrained file and where it lives in the torch hub cache."""
    base = name.removesuffix("_reg")
    file = f"{base}_reg{REGISTERS}_pretrain.pth" if name.endswith("_reg") else f"{base}_pretrain.pth"
    return f"{URL}/{base}/{file}", Path(torch.hub.get_dir()) / "checkpoints" / file


def _fetch_official(name: str) -> Path:
    url, path = official_weights(name)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path))  # writes a temp file, renames when complete
        except Exception as e:
            raise WeightsError(f"could not download the official {name} weights from {url} ({e}); "
                               f"download that file and place it at {path}") from None
    return path


def _load_error(e: Exception) -> str:
    """The informative line of a torch.load failure (its messages run to paragraphs)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return line.split(". ")[0]


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_backbone_weights(backbone: DinoVisionTransformer, weights: str, name: str) -> str:
    """Load `weights` ("random" | "dinov2" | a path) into the backbone; returns what was loaded."""
    if weights == "random":
        return "random initialisation"
    path = _fetch_official(name) if weights == "dinov2" else Path(weights)
    if not path.is_file():
        raise WeightsError(f"model.weights: {path} does not exist (use 'random', 'dinov2' or a checkpoint path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a weights-only torch checkpoint ({_load_error(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a flat state dict of tensors (like the official {name} file)")
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} != {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{what}: {_few(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
    if problems:
        raise WeightsError(f"{path} does not fit {name}: " + "; ".join(problems))
    backbone.load_state_dict(state, strict=True)
    return f"{name} weights from {path}"


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] RGB -> float [B, 3, H, W], /255 then ImageNet mean/std."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def convnext_block(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 7, padding=3, groups=channels), nn.GELU(),
                         nn.Conv2d(channels, channels, 1), nn.GELU())


class ConvNeXtHead(nn.Module):
    """The report's head: 7x7 stem, one depthwise-separable block, 1x1 classifier, on the last layer's tokens."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 7, padding=3), nn.GELU())
        self.block = convnext_block(channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.block(self.stem(x)))


class MultiScaleHead(nn.Module):
    """Fuses the last `layers` blocks (per-layer 1x1 projection, 3x3 fusion), then adds blocks run at token,
    1/2 and 1/4 resolution so both fine detail and wide context reach the classifier."""

    def __init__(self, embed_dim: int, layers: int, channels: int, num_classes: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(layers * embed_dim, layers * channels, 1, groups=layers), nn.GELU())
        self.fuse = nn.Sequential(nn.Conv2d(layers * channels, channels, 3, padding=1), nn.GELU())
        self.local = convnext_block(channels)
        self.context = nn.ModuleList(nn.Sequential(nn.AvgPool2d(s, ceil_mode=True), convnext_block(channels))
                                     for s in (2, 4))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fuse(self.project(x))
        size = x.shape[-2:]
        context = [F.interpolate(c(x), size=size, mode="bilinear", align_corners=False) for c in self.context]
        return self.classifier(x + self.local(x) + sum(context))


class Segmenter(nn.Module):
    """Frozen backbone + trainable head. `features` is what training caches; `decode` is the trainable part."""

    def __init__(self, backbone: DinoVisionTransformer, head: nn.Module, layers: int = 1):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head
        self.layers = layers  # backbone blocks fed to the head

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """uint8 [B, H, W, 3] -> [B, layers * C, H/14, W/14]."""
        x = preprocess(images.to(self.backbone.pos_embed.device))
        B, _, H, W = x.shape
        if self.layers == 1:
            tokens = (self.backbone(x),)
        else:
            tokens = self.backbone.get_intermediate_layers(x, self.layers)
        maps = [t.transpose(1, 2).reshape(B, -1, H // PATCH, W // PATCH) for t in tokens]
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)

    def decode(self, features: Tensor, out_size: tuple[int, int], head: nn.Module | None = None) -> Tensor:
        """Logits at out_size; `head` overrides self.head with a wrapper of it (DDP, torch.compile)."""
        logits = (self.head if head is None else head)(features)
        return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.features(images), images.shape[1:3])


def build_model(model: Model, num_classes: int) -> Segmenter:
    backbone = build_backbone(model.backbone, model.init_seed)
    load_backbone_weights(backbone, model.weights, model.backbone)
    if model.head == "convnext":
        head, layers = ConvNeXtHead(backbone.embed_dim, model.head_channels, num_classes), 1
    elif model.layers > (depth := len(backbone.blocks)):
        raise PipelineError(f"model.layers {model.layers} exceeds the {depth} blocks of {model.backbone}")
    else:
        head, layers = MultiScaleHead(backbone.embed_dim, model.layers, model.head_channels, num_classes), model.layers
    # channels-last convolutions: a bf16 train step of either head at batch 2 is ~10 % faster on the CPU
    # (inference ~27 %), and it is the layout bf16 convolutions want on GPUs
    return Segmenter(backbone, head.to(memory_format=torch.channels_last), layers)


def head_checkpoint(segmenter: Segmenter, params: Params, epoch: int, val_iou: float | None) -> dict[str, Any]:
    head = getattr(segmenter.head, "_orig_mod", segmenter.head)  # unwrap torch.compile
    return {"head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
            "params": params.model_dump(mode="json"), "class_names": params.data.class_names,
            "backbone": params.model.backbone, "weights": params.model.weights,
            "epoch": int(epoch), "val_iou": None if val_iou is None else float(val_iou)}


def _architecture(model: Model) -> dict[str, Any]:
    """The model params that decide which features a head was trained on."""
    keys = ["backbone", "weights", "head", "head_channels"]
    keys += ["layers"] * (model.head == "multiscale") + ["init_seed"] * (model.weights == "random")
    return {k: getattr(model, k) for k in keys}


def load_segmenter(path: str | Path, model: Model, class_names: list[str],
                   device: torch.device | str) -> tuple[Segmenter, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run `dvc repro train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_load_error(e)})") from None
    if not isinstance(ckpt, dict) or not {"head", "params", "class_names", "epoch"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a head checkpoint (needs 'head', 'params', 'class_names' and 'epoch')")
    if ckpt["class_names"] != list(class_names):
        raise CheckpointError(f"{path}: trained for classes {ckpt['class_names']}, params.yaml has {list(class_names)}")
    saved = ckpt["params"].get("model", {}) if isinstance(ckpt["params"], dict) else {}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, params.yaml {v!r}"
             for k, v in _architecture(model).items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with a different model ({'; '.join(diffs)}); retrain it")
    segmenter = build_model(model, len(class_names))
    try:
        segmenter.head.load_state_dict(ckpt["head"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: head weights do not fit ({str(e).splitlines()[0]})") from None
    return segmenter.to(device).eval(), ckpt
