"""Backbone + head as one model, built from params, and the head checkpoints train writes and evaluate reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offroad.artifacts import read_torch
from offroad.config import PATCH, Model, Params
from offroad.errors import PipelineError
from offroad.heads import ConvNeXtHead, MultiScaleHead
from offroad.runtime import Run, choose_attention
from offroad.upsample import upsample_bilinear
from offroad.vit import DinoVisionTransformer, build_backbone, preprocess
from offroad.weights import load_backbone_weights


class CheckpointError(PipelineError):
    pass


def predicted_labels(logits: Tensor) -> Tensor:
    """Class per pixel: argmax over dim 1. max(1) gives the same indices (the first maximum) and, unlike
    argmax(1) on CPU, costs the same whatever the logits: 1 ms against up to 20 ms at 2x10x266x476."""
    return logits.max(1).indices


class Segmenter(nn.Module):
    """Frozen backbone + trainable head. `features` is what training caches; `decode` is the trainable part."""

    def __init__(self, backbone: DinoVisionTransformer, head: nn.Module, layers: int = 1):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head
        self.layers = layers  # backbone blocks fed to the head
        self.attention = "auto"  # model.attention, for place() to choose by the device

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
        """fp32 logits at out_size (bilinear); `head` overrides self.head with a wrapper of it (DDP, torch.compile)."""
        return upsample_bilinear((self.head if head is None else head)(features), tuple(out_size))

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
    backbone.set_attention(choose_attention(model.attention)[0])
    # channels-last convolutions: a bf16 train step of either head at batch 2 is ~10 % faster on the CPU
    # (inference ~27 %), and it is the layout bf16 convolutions want on GPUs
    segmenter = Segmenter(backbone, head.to(memory_format=torch.channels_last), layers)
    segmenter.attention = model.attention
    return segmenter


def place(segmenter: Segmenter, run: Run) -> Segmenter:
    """The model on the run's device; under amp with its backbone's matmul weights kept in the autocast dtype
    (DinoVisionTransformer.keep_weights_in: the same features; backbone +15 % at batch 2 on an Intel Xeon)."""
    segmenter = segmenter.to(run.device)
    segmenter.backbone.set_attention(choose_attention(segmenter.attention, device_type=run.device.type)[0])
    if run.amp:
        segmenter.backbone.keep_weights_in(run.amp_dtype)
    return segmenter


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
    ckpt = read_torch(path)
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
