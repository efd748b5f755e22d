"""LatentSync UNet3D: exact key layout of the 1.6 checkpoint, fp32 parity with upstream on a tiny random model, the
window-wide GroupNorm, DeepCache's cached step, shape-based config recognition and strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnisync_core.errors import InputError
from omnisync_core.model.latentsync_unet import (
    LATENTSYNC_UNET_PRESETS, LatentSyncUNet, latentsync_config_from_shapes, latentsync_unet_shapes,
    load_latentsync_unet,
)
from omnisync_core.model.loading import CheckpointMismatchError

FIX = Path(__file__).parent / "fixtures" / "latentsync"
MANIFEST = Path(__file__).parent / "fixtures" / "manifests" / "latentsync_1.6_unet.json"
# fp32 CPU; ours and upstream order the same ops differently (einops vs reshape/permute, one SDPA layout), so sums
# differ in the last bits; through ~60 layers that stays below 1e-4 on outputs of magnitude ~0.5.
ATOL = 1e-4


def tiny_weights() -> dict[str, torch.Tensor]:
    sd = {}
    for part in (0, 1):
        sd.update(load_file(FIX / f"unet_tiny_weights_{part}.safetensors"))
    return {k: v.float() for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny():
    return load_latentsync_unet(tiny_weights())


@pytest.fixture(scope="module")
def io():
    return load_file(FIX / "unet_tiny_io.safetensors")


def test_meta_state_dict_equals_the_1_6_manifest():
    manifest = json.loads(MANIFEST.read_text())
    ours = latentsync_unet_shapes("latentsync-1.6")
    assert {k: list(v) for k, v in ours.items()} == manifest["tensors"]
    assert len(ours) == manifest["num_tensors"] == 1246
    total = sum(torch.Size(s).numel() for s in ours.values())
    assert total == manifest["num_elements"] == 1_267_944_644
    assert sum(k.endswith("pos_encoder.pe") for k in ours) == 40


def test_config_is_read_from_shapes():
    manifest = json.loads(MANIFEST.read_text())["tensors"]
    assert latentsync_config_from_shapes(manifest) == LATENTSYNC_UNET_PRESETS["latentsync-1.6"]
    assert latentsync_config_from_shapes(latentsync_unet_shapes("tiny")) == LATENTSYNC_UNET_PRESETS["tiny"]
    with pytest.raises(InputError):
        latentsync_config_from_shapes({"blocks.0.weight": (3, 3)})


def test_parity_16_frame_window(tiny, io):
    with torch.no_grad():
        out = tiny(io["sample16"], 451, io["audio16"])
    assert out.shape == (2, 4, 16, 16, 16)
    torch.testing.assert_close(out, io["out16"], atol=ATOL, rtol=0)


def test_parity_8_frames_and_groupnorm_spans_the_window(tiny, io):
    with torch.no_grad():
        out8 = tiny(io["sample16"][:, :, :8], 451, io["audio16"][:, :8])
    torch.testing.assert_close(out8, io["out8"], atol=ATOL, rtol=0)
    # the same 8 frames inside the 16-frame window give other results (joint GroupNorm + temporal attention)
    assert (out8 - io["out16"][:, :, :8]).abs().max() > 0.1


def test_groupnorm_couples_frames_without_motion_modules(tiny, io):
    """Even with every temporal module removed, frame 0's output depends on frame 15 (resnet GroupNorm statistics
    are taken over the whole window)."""
    cfg = LATENTSYNC_UNET_PRESETS["tiny"]
    from dataclasses import replace
    flat = LatentSyncUNet(replace(cfg, use_motion_module=False))
    flat.load_state_dict({k: v for k, v in tiny.state_dict().items() if "motion_modules" not in k})
    x, a = io["sample16"][:1], io["audio16"][:1]
    y = x.clone()
    y[:, :, 15] += 1.0
    with torch.no_grad():
        d = (flat(x, 451, a)[:, :, 0] - flat(y, 451, a)[:, :, 0]).abs().max()
        # per frame it would be exactly independent: a batch of single frames is unaffected
        single = flat(x[:, :, :1], 451, a[:, :1]) - flat(y[:, :, :1], 451, a[:, :1])
    assert d > 1e-3
    assert single.abs().max() == 0


def test_parity_without_audio_and_odd_size(tiny, io):
    with torch.no_grad():
        torch.testing.assert_close(tiny(io["sample16"][:1], 451, None), io["out16_noaudio"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tiny(io["sample_odd"], torch.tensor(23), io["audio_odd"]), io["out_odd"],
                                   atol=ATOL, rtol=0)


def test_deep_cache_step_reproduces_the_full_step(tiny, io):
    """At the same input a cached step equals the full step exactly in what it recomputes; with a new timestep it
    changes only through the last layer and the head."""
    x, a = io["sample16"][:1], io["audio16"][:1]
    with torch.no_grad():
        full, cache = tiny(x, 451, a, return_deep_cache=True)
        again = tiny(x, 451, a, deep_cache=cache)
        later = tiny(x, 300, a, deep_cache=cache)
    assert cache.shape == (1, 32, 16, 16, 16)
    torch.testing.assert_close(again, full, atol=1e-6, rtol=0)
    assert (later - full).abs().max() > 1e-3
    with pytest.raises(InputError):
        tiny(x[:, :, :8], 451, a[:, :8], deep_cache=cache)


def test_strict_loading_reports_mismatches(tmp_path):
    sd = tiny_weights()
    path = tmp_path / "unet.safetensors"
    save_file(sd, str(path))
    model = load_latentsync_unet(path, dtype="fp16")
    assert model.dtype == torch.float16
    bad = dict(sd)
    bad.pop("conv_out.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_latentsync_unet(bad, config="tiny")
    msg = str(e.value)
    assert "conv_out.bias" in msg and "extra.weight" in msg and "conv_in.weight" in msg
    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()}
    assert isinstance(load_latentsync_unet(prefixed), LatentSyncUNet)


def test_rejects_bad_inputs(tiny, io):
    with pytest.raises(InputError):
        tiny(io["sample16"][:, :4], 451, io["audio16"])
    with pytest.raises(InputError):
        tiny(io["sample16"], 451, io["audio16"][:, :8])
    with pytest.raises(InputError):   # the frame-position table has 24 rows
        tiny(torch.zeros(1, 13, 25, 8, 8), 1, torch.zeros(1, 25, 50, 24))


def test_an_sd_unet_is_not_taken_for_latentsync():
    from omnisync_core.model.latentsync_unet import is_latentsync_unet
    shapes = latentsync_unet_shapes("latentsync-1.6")
    assert is_latentsync_unet(shapes)
    sd15 = {k: s for k, s in shapes.items() if "motion_modules" not in k}
    sd15["conv_in.weight"] = (320, 4, 3, 3)          # SD 1.5's 4 input channels
    assert not is_latentsync_unet(sd15)


def test_full_size_forward_shapes_on_meta():
    """The real 1.6 widths (320/640/1280, 40-160-wide heads) run through every block: shapes only, no memory."""
    with torch.device("meta"):
        model = LatentSyncUNet("latentsync-1.6")
        x, audio = torch.empty(2, 13, 16, 64, 64), torch.empty(2, 16, 50, 384)
        out, cache = model(x, 951, audio, return_deep_cache=True)
        cached = model(x, 901, audio, deep_cache=cache)
    assert out.shape == cached.shape == (2, 4, 16, 64, 64)
    assert cache.shape == (2, 320, 16, 64, 64)
