"""DINOv2 backbone (official layout, pos-embed resampling, weights), heads, Segmenter and head checkpoints."""
import io
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offroad.atomic import save_torch
from offroad.errors import PipelineError
from offroad.heads import MultiScaleHead
from offroad.segmenter import Segmenter, build_model, head_checkpoint, load_segmenter
from offroad.vit import attention, build_backbone, preprocess
from offroad.weights import WeightsError, _few, load_backbone_weights, official_weights
from offroad.config import load_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def official_shapes(C: int, depth: int, registers: int = 0) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official dinov2_vit*14[_reg4]_pretrain.pth, as the modules of facebookresearch/dinov2
    (dinov2/models/vision_transformer.py, dinov2/layers/) name and size them."""
    shapes = {"cls_token": (1, 1, C), "pos_embed": (1, 1 + 37 * 37, C), "mask_token": (1, C),
              "patch_embed.proj.weight": (C, 3, 14, 14), "patch_embed.proj.bias": (C,),
              "norm.weight": (C,), "norm.bias": (C,)}
    if registers:
        shapes["register_tokens"] = (1, registers, C)
    for n in range(depth):
        b = f"blocks.{n}."
        shapes.update({b + "norm1.weight": (C,), b + "norm1.bias": (C,),
                       b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
                       b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,), b + "ls1.gamma": (C,),
                       b + "norm2.weight": (C,), b + "norm2.bias": (C,),
                       b + "mlp.fc1.weight": (4 * C, C), b + "mlp.fc1.bias": (4 * C,),
                       b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,), b + "ls2.gamma": (C,)})
    return shapes


def official_param_count(C: int, depth: int, registers: int = 0) -> int:
    embed = 3 * 14 * 14 * C + C + C + (1 + 37 * 37) * C + C + registers * C  # patch conv, cls, pos, mask, registers
    block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    return embed + depth * block + 2 * C


def random_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- independent bicubic resampling (numpy, float64) ---------------------------------------------------------

def cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return a * (((x - 5) * x + 8) * x - 4)
    return 0.0


def bicubic_axis(src: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Keys cubic convolution (A = -0.75) along axis 0: source = (dst + 0.5) / scale - 0.5, edges clamped."""
    n = src.shape[0]
    dst = np.zeros((out,) + src.shape[1:])
    for i in range(out):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        for j in range(x0 - 1, x0 + 3):
            dst[i] += cubic(x - j, -0.75) * src[min(max(j, 0), n - 1)]
    return dst


def antialiased_axis(src: np.ndarray, out: int) -> np.ndarray:
    """Pillow-style antialiased bicubic (A = -0.5, kernel stretched by the downscale factor)."""
    n = src.shape[0]
    scale = n / out
    support, inv = (2 * scale, 1 / scale) if scale >= 1 else (2.0, 1.0)
    dst = np.zeros((out,) + src.shape[1:])
    for i in range(out):
        center = scale * (i + 0.5)
        taps = range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n))
        w = np.array([cubic((j - center + 0.5) * inv, -0.5) for j in taps])
        dst[i] = np.tensordot(w / w.sum(), src[list(taps)], axes=1)
    return dst


def grid_of(pos: torch.Tensor) -> np.ndarray:
    return pos[0, 1:].double().numpy().reshape(37, 37, -1)


def test_vits14_state_dict_is_the_official_layout():
    sd = build_backbone("dinov2_vits14").state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(384, 12)
    assert len(sd) == 175
    assert sum(v.numel() for v in sd.values()) == official_param_count(384, 12) == 22_056_576


@pytest.mark.parametrize("name, C, depth, heads", [
    ("dinov2_vitb14", 768, 12, 12), ("dinov2_vitl14", 1024, 24, 16),
    ("dinov2_vits14_reg", 384, 12, 6), ("dinov2_vitb14_reg", 768, 12, 12), ("dinov2_vitl14_reg", 1024, 24, 16)])
def test_bigger_and_register_variants_have_official_shapes(name, C, depth, heads):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_backbone(name)
    registers = 4 if name.endswith("_reg") else 0
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(C, depth, registers)
    assert sum(v.numel() for v in sd.values()) == official_param_count(C, depth, registers)
    assert model.blocks[0].attn.heads == heads and C // heads == 64


def test_official_param_counts_are_the_published_sizes():
    # the formula above, checked against published totals (ViT-B/14 86.6M, ViT-L/14 304.4M)
    assert round(official_param_count(768, 12) / 1e6, 1) == 86.6
    assert round(official_param_count(1024, 24) / 1e6, 1) == 304.4


def test_official_layout_loads_strict(tmp_path):
    state = random_state_dict(official_shapes(384, 12))
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    backbone = build_backbone("dinov2_vits14")
    desc = load_backbone_weights(backbone, str(tmp_path / "dinov2_vits14_pretrain.pth"), "dinov2_vits14")
    assert "dinov2_vits14_pretrain.pth" in desc
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_random_init_is_deterministic_and_official():
    state = torch.random.get_rng_state()
    a, b, c = build_backbone("dinov2_vits14", 0), build_backbone("dinov2_vits14", 0), build_backbone("dinov2_vits14", 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    assert torch.equal(sa["blocks.3.ls1.gamma"], torch.ones(384))  # LayerScale init_values=1.0
    assert sa["blocks.0.mlp.fc1.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert not sa["blocks.0.mlp.fc1.bias"].any() and not sa["mask_token"].any()
    assert sa["cls_token"].abs().max() < 1e-4


def test_pos_embed_uses_scale_factor_bicubic_with_offset():
    model = build_backbone("dinov2_vits14")
    with torch.no_grad():
        model.pos_embed.normal_(generator=torch.Generator().manual_seed(0))
    pos = model.pos_embed.detach()
    h, w = 19, 34
    got = model.interpolate_pos_encoding(h, w).detach()
    assert got.shape == (1, 1 + h * w, 384)
    assert torch.equal(got[0, 0], pos[0, 0])  # cls row untouched
    grid = grid_of(pos)
    expected = bicubic_axis(bicubic_axis(grid, h, (h + 0.1) / 37).transpose(1, 0, 2), w, (w + 0.1) / 37)
    expected = expected.transpose(1, 0, 2).reshape(h * w, -1)
    np.testing.assert_allclose(got[0, 1:].double().numpy(), expected, atol=2e-5)
    # the same resampling with size= semantics (scale = out/in) is measurably different
    by_size = bicubic_axis(bicubic_axis(grid, h, h / 37).transpose(1, 0, 2), w, w / 37).transpose(1, 0, 2)
    assert np.abs(by_size.reshape(h * w, -1) - expected).max() > 1e-2
    assert model.interpolate_pos_encoding(37, 37) is model.pos_embed  # pretraining grid: used as is


def test_register_variant_pos_embed_is_antialiased_size_resampling():
    model = build_backbone("dinov2_vits14_reg")
    with torch.no_grad():
        model.pos_embed.normal_(generator=torch.Generator().manual_seed(1))
    h, w = 19, 34
    got = model.interpolate_pos_encoding(h, w).detach()[0, 1:].double().numpy()
    grid = grid_of(model.pos_embed.detach())
    expected = antialiased_axis(antialiased_axis(grid, h).transpose(1, 0, 2), w).transpose(1, 0, 2)
    np.testing.assert_allclose(got, expected.reshape(h * w, -1), atol=2e-5)


def test_register_tokens_sit_after_cls_without_pos_embed():
    model = build_backbone("dinov2_vits14_reg").eval()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        patches = model.patch_embed(x)
        pos = model.interpolate_pos_encoding(2, 3)
        assert tokens.shape == (2, 1 + 4 + 6, 384)
        assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
        torch.testing.assert_close(tokens[:, 0], (model.cls_token[:, 0] + pos[:, 0]).expand(2, -1))
        torch.testing.assert_close(tokens[:, 5:], patches + pos[:, 1:])
        assert model(x).shape == (2, 6, 384)


def reference_tokens(sd: dict, image: torch.Tensor, heads: int) -> torch.Tensor:
    """The ViT forward written out with plain float64 tensor maths and the numpy pos-embed resampling."""
    sd = {k: v.double() for k, v in sd.items()}
    _, H, W = image.shape
    h, w = H // 14, W // 14
    C = sd["cls_token"].shape[-1]
    patches = image.double().reshape(3, h, 14, w, 14).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
    x = patches @ sd["patch_embed.proj.weight"].reshape(C, -1).T + sd["patch_embed.proj.bias"]
    grid = grid_of(sd["pos_embed"])
    pos = bicubic_axis(bicubic_axis(grid, h, (h + 0.1) / 37).transpose(1, 0, 2), w, (w + 0.1) / 37)
    x = torch.cat([sd["cls_token"][0] + sd["pos_embed"][0, :1], x + torch.from_numpy(pos.transpose(1, 0, 2)
                                                                                        .reshape(h * w, C))])

    def norm(x, p):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * sd[p + ".weight"] + sd[p + ".bias"]

    def linear(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    n, D = x.shape[0], C // heads
    for i in range(sum(k.endswith("ls1.gamma") for k in sd)):
        b = f"blocks.{i}."
        q, k, v = linear(norm(x, b + "norm1"), b + "attn.qkv").reshape(n, 3, heads, D).permute(1, 2, 0, 3)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), dim=-1) @ v  # [heads, n, D]
        x = x + sd[b + "ls1.gamma"] * linear(attn.permute(1, 0, 2).reshape(n, C), b + "attn.proj")
        hidden = linear(norm(x, b + "norm2"), b + "mlp.fc1")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = x + sd[b + "ls2.gamma"] * linear(hidden, b + "mlp.fc2")
    return norm(x, "norm")[1:]


def test_forward_matches_plain_reference():
    model = build_backbone("dinov2_vits14", seed=3).eval()
    image = torch.randn(3, 28, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(image[None])[0]
    expected = reference_tokens(model.state_dict(), image, heads=6)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_cpu_bf16_attention_matches_fp32_sdpa():
    q, k, v = torch.randn(3, 3, 6, 40, 64, generator=torch.Generator().manual_seed(0))  # 3 images, 6 heads
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), expected, rtol=0, atol=0)  # fp32: SDPA itself
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # the explicit matmul-softmax-matmul path
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    diff = (got.float() - expected).abs()
    assert diff.max() < 0.03 and diff.mean() < 3e-3  # bf16 rounding of inputs and scores; a missing scale gives ~0.5


def test_bf16_autocast_backbone_stays_close_to_fp32():
    model = build_backbone("dinov2_vits14", seed=1).eval()
    x = torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
    diff = (bf16.float() - fp32).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())  # tokens have std 1


def test_intermediate_layers():
    model = build_backbone("dinov2_vits14").eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, 3)
        raw = model.get_intermediate_layers(x, 3, norm=False)
        final = model(x)
    assert len(layers) == 3 and all(t.shape == (1, 6, 384) for t in layers)
    torch.testing.assert_close(layers[-1], final, rtol=0, atol=0)
    torch.testing.assert_close(layers[0], model.norm(raw[0]), rtol=0, atol=0)
    assert not torch.allclose(layers[0], layers[1])
    for n in (0, 13):
        with pytest.raises(ValueError, match="between 1 and the depth 12"):
            model.get_intermediate_layers(x, n)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_intermediate_layers_from_one_to_every_block_end_at_the_forward(name):
    model = build_backbone(name).eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        one, every, final = model.get_intermediate_layers(x, 1), model.get_intermediate_layers(x, 12), model(x)
    assert len(one) == 1 and len(every) == 12 and all(t.shape == (1, 6, 384) for t in every)
    torch.testing.assert_close(one[0], final, rtol=0, atol=0)
    torch.testing.assert_close(every[-1], final, rtol=0, atol=0)


def test_preprocess_normalises_channels_first():
    img = torch.zeros(1, 2, 3, 3, dtype=torch.uint8)
    img[0, 1, 2] = torch.tensor([255, 128, 0], dtype=torch.uint8)
    x = preprocess(img)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 1, 2].numpy(), (np.array([255, 128, 0]) / 255 - MEAN) / STD, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), -MEAN / STD, rtol=1e-6)


def test_image_sides_must_be_multiples_of_the_patch():
    model = build_backbone("dinov2_vits14")
    for h, w in ((28, 43), (29, 42)):
        with pytest.raises(ValueError, match=f"image size {h}x{w} is not a multiple of the patch size 14"):
            model(torch.randn(1, 3, h, w))


def test_build_model_uses_the_seed_the_weights_and_up_to_every_block(tmp_path):
    params = load_params(REPO_PARAMS)
    small = params.model.model_copy(update={"head_channels": 8})
    seeded = build_model(small.model_copy(update={"init_seed": 7}), 5).backbone.state_dict()
    assert all(torch.equal(v, build_backbone("dinov2_vits14", 7).state_dict()[k]) for k, v in seeded.items())
    assert not torch.equal(seeded["blocks.0.attn.qkv.weight"],
                           build_model(small, 5).backbone.state_dict()["blocks.0.attn.qkv.weight"])
    state = random_state_dict(official_shapes(384, 12), seed=3)
    torch.save(state, tmp_path / "w.pth")
    loaded = build_model(small.model_copy(update={"weights": str(tmp_path / "w.pth")}), 5).backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    every = build_model(small.model_copy(update={"head": "multiscale", "layers": 12}), 5)
    assert every.layers == 12


def test_segmenter_shapes_at_pipeline_size():
    params = load_params(REPO_PARAMS)
    seg = build_model(params.model, params.data.num_classes)
    img = images(1, 266, 476)
    feats = seg.features(img)
    with torch.no_grad():
        tokens = seg.backbone(preprocess(img))
    assert tokens.shape == (1, 646, 384) and feats.shape == (1, 384, 19, 34)
    torch.testing.assert_close(feats[0, :, 5, 7], tokens[0, 5 * 34 + 7])  # row-major patch grid
    logits = seg.decode(feats, (266, 476))
    assert logits.shape == (1, 10, 266, 476)
    expected = F.interpolate(seg.head(feats), size=(266, 476), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)


def test_only_the_head_trains():
    params = load_params(REPO_PARAMS)
    seg = build_model(params.model, params.data.num_classes).train()
    assert seg.training and seg.head.training and not seg.backbone.training
    assert not any(m.training for m in seg.backbone.modules())
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert trainable == {"head." + n for n, _ in seg.head.named_parameters()}
    feats = seg.features(images(2, 28, 42))  # cached by training; must feed the head's autograd graph
    assert not feats.requires_grad and not feats.is_inference()
    seg.decode(feats, (28, 42)).logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.head.parameters())
    assert all(p.grad is None for p in seg.backbone.parameters())


def test_multiscale_head_fuses_last_layers():
    params = load_params(REPO_PARAMS)
    model = params.model.model_copy(update={"head": "multiscale", "layers": 4, "head_channels": 32})
    seg = build_model(model, 5)
    assert isinstance(seg.head, MultiScaleHead)
    img = images(2, 56, 84)
    feats = seg.features(img)
    assert feats.shape == (2, 4 * 384, 4, 6)
    with torch.no_grad():
        layers = seg.backbone.get_intermediate_layers(preprocess(img), 4)
    torch.testing.assert_close(feats[:, 384:768].flatten(2).transpose(1, 2), layers[1])
    assert seg(img).shape == (2, 5, 56, 84)
    with pytest.raises(PipelineError, match="model.layers 13 exceeds the 12 blocks"):
        build_model(model.model_copy(update={"layers": 13}), 5)


def test_saved_backbone_reloads_to_identical_outputs(tmp_path):
    a, b = build_backbone("dinov2_vits14", 1).eval(), build_backbone("dinov2_vits14", 2).eval()
    x = torch.randn(1, 3, 28, 42)
    save_torch(tmp_path / "a.pth", a.state_dict())
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
        load_backbone_weights(b, str(tmp_path / "a.pth"), "dinov2_vits14")
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("head", ["convnext", "multiscale"])
def test_head_checkpoint_round_trip(tmp_path, head):
    params = load_params(REPO_PARAMS)
    params = params.model_copy(update={"model": params.model.model_copy(update={"head": head, "head_channels": 16})})
    seg = build_model(params.model, params.data.num_classes)
    with torch.no_grad():
        for p in seg.head.parameters():
            p.normal_()  # unlike a fresh head
    ckpt = head_checkpoint(seg, params, epoch=3, val_iou=0.25)
    assert set(ckpt) == {"head", "params", "class_names", "backbone", "weights", "epoch", "val_iou"}
    save_torch(tmp_path / "best.pt", ckpt)
    loaded, meta = load_segmenter(tmp_path / "best.pt", params.model, params.data.class_names, "cpu")
    assert (meta["epoch"], meta["val_iou"], meta["backbone"]) == (3, 0.25, "dinov2_vits14")
    assert meta["params"]["model"]["head"] == head
    img = images(1, 28, 42)
    with torch.no_grad():
        assert torch.equal(loaded(img), seg.eval()(img))


def test_load_segmenter_refuses_other_models(tmp_path):
    params = load_params(REPO_PARAMS)
    names = params.data.class_names
    with pytest.raises(PipelineError, match=r"models/best.pt: checkpoint not found"):
        load_segmenter(tmp_path / "models/best.pt", params.model, names, "cpu")
    seg = build_model(params.model.model_copy(update={"head_channels": 8}), len(names))
    small = params.model_copy(update={"model": params.model.model_copy(update={"head_channels": 8})})
    save_torch(tmp_path / "best.pt", head_checkpoint(seg, small, 1, None))
    with pytest.raises(PipelineError, match=r"model.head_channels: checkpoint 8, params.yaml 128"):
        load_segmenter(tmp_path / "best.pt", params.model, names, "cpu")
    for update, expected in [({"head": "multiscale", "head_channels": 8}, "model.head: checkpoint 'convnext', "
                                                                          "params.yaml 'multiscale'"),
                             ({"backbone": "dinov2_vits14_reg", "head_channels": 8}, "model.backbone"),
                             ({"init_seed": 7, "head_channels": 8}, "model.init_seed: checkpoint 0, params.yaml 7")]:
        with pytest.raises(PipelineError, match=expected):
            load_segmenter(tmp_path / "best.pt", params.model.model_copy(update=update), names, "cpu")
    with pytest.raises(PipelineError, match=r"trained for classes \['Background'.*params.yaml has \['Sky'"):
        load_segmenter(tmp_path / "best.pt", small.model, ["Sky"] + names[1:], "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="junk.pt: not a readable checkpoint"):
        load_segmenter(tmp_path / "junk.pt", small.model, names, "cpu")


def test_load_segmenter_names_what_is_wrong_with_a_checkpoint(tmp_path):
    params = load_params(REPO_PARAMS)
    names = params.data.class_names
    small = params.model.model_copy(update={"head_channels": 8})
    ckpt = head_checkpoint(build_model(small, len(names)), params.model_copy(update={"model": small}), 1, None)
    minimal = {k: ckpt[k] for k in ("head", "params", "class_names", "epoch")}  # the keys a checkpoint needs
    save_torch(tmp_path / "minimal.pt", minimal)
    assert load_segmenter(tmp_path / "minimal.pt", small, names, "cpu")[1]["epoch"] == 1
    for broken in ({k: v for k, v in minimal.items() if k != "epoch"}, [minimal]):
        save_torch(tmp_path / "broken.pt", broken)
        with pytest.raises(PipelineError, match=r"broken.pt: not a head checkpoint \(needs 'head', 'params'"):
            load_segmenter(tmp_path / "broken.pt", small, names, "cpu")
    for bad_params in ({}, "junk"):  # no model section, or no params mapping: every architecture key differs
        save_torch(tmp_path / "other.pt", {**minimal, "params": bad_params})
        with pytest.raises(PipelineError, match=r"other.pt was trained with a different model \(model.backbone: "
                                                r"checkpoint None, params.yaml 'dinov2_vits14'; model.weights"):
            load_segmenter(tmp_path / "other.pt", small, names, "cpu")
    wider = build_model(params.model, len(names))  # the checkpoint claims head_channels 8, holds 128
    save_torch(tmp_path / "lying.pt", {**minimal, "head": wider.head.state_dict()})
    with pytest.raises(PipelineError, match=r"lying.pt: head weights do not fit \(Error\(s\) in loading"):
        load_segmenter(tmp_path / "lying.pt", small, names, "cpu")


def test_a_multiscale_checkpoint_needs_the_same_layers(tmp_path):
    params = load_params(REPO_PARAMS)
    multi = params.model.model_copy(update={"head": "multiscale", "layers": 4, "head_channels": 8})
    names = params.data.class_names
    ckpt = head_checkpoint(build_model(multi, len(names)), params.model_copy(update={"model": multi}), 1, None)
    save_torch(tmp_path / "multi.pt", ckpt)
    with pytest.raises(PipelineError, match=r"model.layers: checkpoint 4, params.yaml 2"):
        load_segmenter(tmp_path / "multi.pt", multi.model_copy(update={"layers": 2}), names, "cpu")
    # a ConvNeXt head reads the last block only: model.layers does not matter to it
    convnext = params.model.model_copy(update={"head_channels": 8})
    save_torch(tmp_path / "convnext.pt", head_checkpoint(build_model(convnext, len(names)),
                                                         params.model_copy(update={"model": convnext}), 1, None))
    load_segmenter(tmp_path / "convnext.pt", convnext.model_copy(update={"layers": 2}), names, "cpu")


# --- bad weights -----------------------------------------------------------------------------------------------

def test_missing_weights_path():
    with pytest.raises(WeightsError, match="no/such/file.pth does not exist"):
        load_backbone_weights(build_backbone("dinov2_vits14"), "no/such/file.pth", "dinov2_vits14")


def test_mismatched_keys_are_listed(tmp_path):
    state = random_state_dict(official_shapes(384, 12))
    del state["blocks.11.ls2.gamma"], state["norm.bias"]
    state["head.weight"] = torch.zeros(3)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(1152, 385)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(build_backbone("dinov2_vits14"), str(tmp_path / "bad.pth"), "dinov2_vits14")
    msg = str(err.value)
    assert "bad.pth does not fit dinov2_vits14" in msg
    assert "missing keys: blocks.11.ls2.gamma, norm.bias" in msg
    assert "unexpected keys: head.weight" in msg
    assert "wrong shapes: blocks.0.attn.qkv.weight [1152, 385] != [1152, 384]" in msg


def test_vitb_file_into_vits_names_the_shapes(tmp_path):
    vitb = {k: s for k, s in official_shapes(768, 12).items()
            if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    torch.save(random_state_dict(vitb), tmp_path / "vitb.pth")  # a ViT-B/14 file cut to its first block
    with pytest.raises(WeightsError, match=r"wrong shapes: cls_token \[1, 1, 768\] != \[1, 1, 384\].*\(\+\d+ more\)"):
        load_backbone_weights(build_backbone("dinov2_vits14"), str(tmp_path / "vitb.pth"), "dinov2_vits14")


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")  # creates a file when unpickled


def test_malicious_pickle_is_refused(tmp_path):
    torch.save({"cls_token": Payload(tmp_path / "pwned")}, tmp_path / "evil.pth")
    pickle.loads(pickle.dumps(Payload(tmp_path / "live")))  # the payload does run when unpickled freely
    assert (tmp_path / "live").exists()
    with pytest.raises(WeightsError, match=r"evil.pth: not a weights-only torch checkpoint \(Unsupported global"):
        load_backbone_weights(build_backbone("dinov2_vits14"), str(tmp_path / "evil.pth"), "dinov2_vits14")
    assert not (tmp_path / "pwned").exists()


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content, expected", [
    (b"\x00garbage", r"not a weights-only torch checkpoint \(Unsupported operand"),
    (saved_bytes({"cls_token": torch.zeros(1000)})[:900], r"not a weights-only torch checkpoint \(.*failed reading zip archive"),
    ([torch.zeros(3)], "expected a flat state dict of tensors"),
    ({"model": {"cls_token": torch.zeros(1, 1, 384)}}, "expected a flat state dict of tensors"),
])
def test_unreadable_weights(tmp_path, content, expected):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=expected):
        load_backbone_weights(build_backbone("dinov2_vits14"), str(path), "dinov2_vits14")


def test_official_file_names():
    url, path = official_weights("dinov2_vits14")
    assert url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert path == Path(torch.hub.get_dir()) / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert official_weights("dinov2_vitl14_reg")[0] == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"


def test_dinov2_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(build_backbone("dinov2_vits14"), "dinov2", "dinov2_vits14")
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in str(err.value)
    assert f"place it at {target}" in str(err.value)
    assert "name resolution" in str(err.value)


def test_dinov2_downloads_each_file_once_into_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    fetched = []

    def download(url, dst, *args, **kwargs):
        fetched.append((url, dst))
        registers = 4 if "_reg4" in url else 0
        torch.save(random_state_dict(official_shapes(384, 12, registers=registers), seed=len(fetched)), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for name in ("dinov2_vits14_reg", "dinov2_vits14", "dinov2_vits14"):  # the second finds the folder made
        load_backbone_weights(build_backbone(name), "dinov2", name)
    cache = tmp_path / "hub" / "checkpoints"
    assert fetched == [(f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/{f}", str(cache / f))
                       for f in ("dinov2_vits14_reg4_pretrain.pth", "dinov2_vits14_pretrain.pth")]


def test_a_long_list_of_mismatched_keys_is_cut_after_five(tmp_path):
    state = random_state_dict(official_shapes(384, 12))
    missing = sorted(k for k in state if k.startswith("blocks.11."))[:7]
    for k in missing:
        del state[k]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(build_backbone("dinov2_vits14"), str(tmp_path / "bad.pth"), "dinov2_vits14")
    msg = str(err.value)
    listed = re.search(r"missing keys: (.*?) \(\+2 more\)", msg)[1].split(", ")
    assert len(listed) == 5 and set(listed) < set(missing)
    assert "unexpected keys: head.weight" in msg and "head.weight (" not in msg


def test_dinov2_uses_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    state = random_state_dict(official_shapes(384, 12, registers=4), seed=5)
    target = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth"
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    backbone = build_backbone("dinov2_vits14_reg")
    assert str(target) in load_backbone_weights(backbone, "dinov2", "dinov2_vits14_reg")
    assert torch.equal(backbone.register_tokens, state["register_tokens"])


def test_layer_scale_multiplies_by_a_trained_gamma():
    # random init has gamma = 1, so only a gamma != 1 (as in the official weights) shows what forward does
    from offroad.vit import LayerScale
    g = torch.Generator().manual_seed(0)
    ls = LayerScale(8)
    with torch.no_grad():
        ls.gamma.copy_(torch.rand(8, generator=g) * 2 - 0.5)
    x = torch.randn(2, 5, 8, generator=g)
    expected = x.double().numpy() * ls.gamma.detach().double().numpy()
    np.testing.assert_allclose(ls(x).detach().double().numpy(), expected, rtol=1e-6)


def test_forward_with_trained_layer_scales_matches_plain_reference():
    model = build_backbone("dinov2_vits14", seed=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    image = torch.randn(3, 28, 42, generator=g)
    with torch.no_grad():
        got = model(image[None])[0]
    expected = reference_tokens(model.state_dict(), image, heads=6)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def convnext_block_reference(x, sd, p, groups):
    return gelu(conv(gelu(conv(x, sd, p + ".0", padding=3, groups=groups)), sd, p + ".2"))


def test_convnext_head_matches_a_float64_reference():
    from offroad.heads import ConvNeXtHead
    torch.manual_seed(0)
    head = ConvNeXtHead(12, 8, 5).eval()
    x = torch.randn(2, 12, 4, 6)
    sd = {k: v.double() for k, v in head.state_dict().items()}
    y = gelu(conv(x.double(), sd, "stem.0", padding=3))
    expected = conv(convnext_block_reference(y, sd, "block", 8), sd, "classifier")
    assert expected.shape == (2, 5, 4, 6) and head.stem[0].weight.shape == (8, 12, 7, 7)  # the token grid kept
    with torch.no_grad():
        torch.testing.assert_close(head(x).double(), expected, rtol=1e-4, atol=1e-5)


def test_multiscale_head_matches_a_float64_reference():
    torch.manual_seed(0)
    head = MultiScaleHead(6, 3, 8, 5).eval()
    x = torch.randn(2, 18, 5, 7)  # odd sizes: the pooled maps are ceil-rounded, then resized back
    sd = {k: v.double() for k, v in head.state_dict().items()}
    y = gelu(conv(gelu(conv(x.double(), sd, "project.0", groups=3)), sd, "fuse.0", padding=1))
    context = 0
    for i, s in enumerate((2, 4)):
        pooled = F.avg_pool2d(y, s, ceil_mode=True)
        c = convnext_block_reference(pooled, sd, f"context.{i}.1", 8)
        context = context + F.interpolate(c, size=(5, 7), mode="bilinear", align_corners=False)
    expected = conv(y + convnext_block_reference(y, sd, "local", 8) + context, sd, "classifier")
    assert expected.shape == (2, 5, 5, 7) and head.classifier.weight.shape == (5, 8, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(head(x).double(), expected, rtol=1e-4, atol=1e-5)


def test_key_lists_are_cut_only_when_longer_than_the_limit():
    assert _few(["a", "b", "c"], 3) == "a, b, c"
    assert _few(list("abcd"), 3) == "a, b, c (+1 more)"
