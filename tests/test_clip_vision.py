"""CLIP ViT-H/14 vision tower as Wan I2V uses it: parity with upstream Wan's clip.py (fixture made by running its
VisionTransformer and CLIPModel.visual preprocessing), with transformers' CLIPVisionModel, and the checkpoint layout."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnisync_core.errors import InputError
from omnisync_core.model.clip_vision import (
    CLIP_VISION_PRESETS, CLIPVision, clip_vision_config_from_shapes, clip_vision_label, clip_vision_shapes,
    encode_image, is_clip_vision, load_clip_vision, preprocess,
)
from omnisync_core.model.loading import CheckpointMismatchError

FIXTURE = Path(__file__).parent / "fixtures" / "infinitetalk" / "clip_vision_tiny.safetensors"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURE)


@pytest.fixture(scope="module")
def model(fx):
    return load_clip_vision({k[5:]: v for k, v in fx.items() if k.startswith("clip.")})


def test_matches_upstream_wan_clip(fx, model):
    """clip.visual(cond_image): bicubic 90x120 -> 224x224 on [-1, 1], CLIP normalisation, 31 of 32 blocks (here 2 of
    3). fp32 on both sides (upstream ran on torch 2.9.1, its fused qkv split into q/k/v here): measured max |diff|
    3.3e-6 at magnitude ~4.8."""
    assert model.config == CLIP_VISION_PRESETS["tiny"]
    feats = encode_image(model, fx["in.image"])
    assert feats.shape == fx["out.penultimate"].shape == (1, 257, 32)
    torch.testing.assert_close(feats, fx["out.penultimate"], atol=2e-5, rtol=0)
    with torch.no_grad():
        last = model(preprocess(fx["in.image"]), layer=-1)
    torch.testing.assert_close(last, fx["out.last"], atol=2e-5, rtol=0)


def test_value_ranges_agree(fx, model):
    """Frames in [0, 1] give Wan's result for the same frames in [-1, 1] (only float rounding of the affine map)."""
    img = fx["in.image"]
    a = preprocess(img)
    b = preprocess((img + 1) / 2, value_range=(0.0, 1.0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)   # ~1 ulp of [0, 1] values, divided by std ~0.27


def test_matches_transformers_clip_vision_model():
    """transformers' CLIPVisionModelWithProjection (tiny config, random weights): our layer=-2 is hidden_states[-2],
    layer=0 hidden_states[0]; its state dict (with position_ids) loads as it is."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=128, image_size=224, patch_size=14, projection_dim=16,
                                        hidden_act="gelu")
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    sd = hf.state_dict()
    assert clip_vision_config_from_shapes(sd) == CLIP_VISION_PRESETS["tiny"]
    m = load_clip_vision(sd)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        hs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 0):
            torch.testing.assert_close(m(pixels, layer=layer), hs[layer], atol=1e-5, rtol=0)


def test_vit_h_layout():
    """clip_vision_h.safetensors' names and shapes: transformers' CLIPVisionModelWithProjection with ComfyUI's
    clip_vision_config_h.json (1280 wide, 32 layers, 16 heads, 5120 MLP, patch 14, 224 px, projection 1024), built on
    the meta device; 632.1 M parameters; 257 tokens of 1280."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                        intermediate_size=5120, image_size=224, patch_size=14, projection_dim=1024,
                                        hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.device("meta"):
        hf = {k: tuple(v.shape) for k, v in transformers.CLIPVisionModelWithProjection(cfg).state_dict().items()
              if not k.endswith("position_ids")}
    assert clip_vision_shapes("vit-h-14") == hf
    assert is_clip_vision(hf) and clip_vision_config_from_shapes(hf) == CLIP_VISION_PRESETS["vit-h-14"]
    assert clip_vision_label(clip_vision_config_from_shapes(hf)) == "CLIP ViT-H/14 vision"
    assert hf["vision_model.embeddings.position_embedding.weight"] == (257, 1280)
    assert sum(torch.Size(s).numel() for s in hf.values()) == 632_076_800


def test_safetensors_fp16_and_mismatch(tmp_path, fx, model):
    sd = {k[5:]: v.half().contiguous() for k, v in fx.items() if k.startswith("clip.")}
    sd["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    path = tmp_path / "clip_vision_tiny_fp16.safetensors"
    save_file(sd, str(path))
    m = load_clip_vision(path, dtype="fp32")
    torch.testing.assert_close(encode_image(m, fx["in.image"]), fx["out.penultimate"], atol=5e-2, rtol=0)
    del sd["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="1 missing: vision_model.encoder.layers.1.mlp.fc2.bias"):
        load_clip_vision(tmp_path / "bad.safetensors", config="tiny")


def test_bad_inputs(model):
    with pytest.raises(InputError):
        model(torch.zeros(1, 3, 112, 112))                 # 64 patches for 256 position embeddings
    with pytest.raises(InputError):
        preprocess(torch.zeros(1, 4, 10, 10))
    with pytest.raises(InputError):
        CLIPVision("tiny")(torch.zeros(1, 3, 224, 224), layer=9)
