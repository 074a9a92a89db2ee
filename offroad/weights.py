"""The backbone's weights: where the official DINOv2 checkpoints live (downloaded once into the torch hub
cache), and loading a checkpoint into the backbone after checking its keys and shapes."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from offroad.artifacts import load_error_reason
from offroad.errors import PipelineError
from offroad.vit import REGISTERS, DinoVisionTransformer

URL = "https://dl.fbaipublicfiles.com/dinov2"


class WeightsError(PipelineError):
    pass


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
        raise WeightsError(f"{path}: not a weights-only torch checkpoint ({load_error_reason(e)})") from None
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
