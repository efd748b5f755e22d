"""HumoDiT against ComfyUI's own HumoWanModel (comfy/ldm/wan/model.py) from a real checkout ($COMFYUI_PATH).

A tiny backbone (2 layers, width 40) with ComfyUI's real, hard-coded audio widths (1280-wide Whisper features,
512 hidden, 16 tokens x 1536); ComfyUI's random state dict is loaded into ours as it is. Skips without
COMFYUI_PATH or when this interpreter cannot import ComfyUI (run it with the ComfyUI venv:
``COMFYUI_PATH=... PYTHONPATH=. /path/to/comfy-venv/bin/python -m pytest tests/test_comfyui_humo.py``).
"""

import os
import sys

import pytest
import torch

from omnisync_core.model.humo import HumoConfig, load_humo

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
T, H, W = 3, 4, 6
# fp32 on both sides; ComfyUI computes the timestep sinusoids in fp32 (ours, like upstream, in fp64), builds RoPE
# from fp32 positions and uses its own attention kernel. Measured max |diff|: 4.8e-7 (one item), 1.4e-6 (batch of 3)
# at outputs of magnitude ~2.
ATOL = 1e-5


def _comfy():
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set (run bash scripts/comfyui_test.sh with a ComfyUI checkout)")
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True                 # before comfy.model_management is imported
        import comfy.model_management  # noqa: F401
        import comfy.ops
        from comfy.ldm.wan.model import HumoWanModel
    except ImportError as e:
        pytest.skip(f"this interpreter cannot import ComfyUI ({e}); use the ComfyUI venv")
    return HumoWanModel, comfy.ops.disable_weight_init


@pytest.fixture(scope="module")
def models():
    HumoWanModel, ops = _comfy()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    comfy_model = HumoWanModel(model_type="humo", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=40, ffn_dim=64,
                               freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=2, qk_norm=True,
                               cross_attn_norm=True, eps=1e-6, operations=ops)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                               # ComfyUI leaves its weights uninitialised (torch.empty)
        for name, p in comfy_model.named_parameters():
            if name.endswith("modulation") or p.ndim == 1:
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / (p.numel() // p.shape[0]) ** 0.5))
    comfy_model.eval()
    ours = load_humo(comfy_model.state_dict())
    yield comfy_model, ours
    torch.set_num_threads(before)


def inputs(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 16, T, H, W, generator=g), sigma=torch.rand(b, generator=g),
                text=torch.randn(b, 16, 32, generator=g), audio=torch.randn(b, T, 8, 5, 1280, generator=g),
                reference=torch.randn(b, 16, 1, H, W, generator=g))


def comfy_forward(model, x, sigma, text, audio, reference):
    """ComfyUI's conventions: timestep = 1000 * sigma (flow), context = the padded umT5 features, audio_embed = the
    video frames' windows (ComfyUI appends the reference frame's zero window itself), reference_latent."""
    with torch.no_grad():
        return model(x, sigma * 1000.0, text, audio_embed=audio, reference_latent=reference)


def test_config_read_from_comfy_state_dict(models):
    comfy_model, ours = models
    assert ours.config == HumoConfig(dim=40, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, text_len=16)
    assert ours.state_dict().keys() == comfy_model.state_dict().keys()


def test_matches_comfyui_with_reference(models):
    comfy_model, ours = models
    inp = inputs(1)
    want = comfy_forward(comfy_model, **inp)
    with torch.no_grad():
        got = ours(**inp)
    assert got.shape == want.shape == (1, 16, T, H, W)
    print("max |ours - ComfyUI|:", float((got - want).abs().max()), "of max |v|", float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_matches_comfyui_mixed_batch(models):
    """One batch with different sigma, text, audio (one item null = zeros) and reference (one item zeros)."""
    comfy_model, ours = models
    inp = inputs(3, seed=2)
    inp["audio"][1] = 0
    inp["reference"][2] = 0
    want = comfy_forward(comfy_model, **inp)
    with torch.no_grad():
        got = ours(**inp)
    print("max |ours - ComfyUI| (batch):", float((got - want).abs().max()), "of max |v|", float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_null_audio_is_zero_windows_not_a_skip(models):
    """Ours (as upstream HuMo) never skips the audio attention: audio=None is zero windows. ComfyUI's
    audio_embed=None skips it, which is a different output; its zero audio_embed is ours."""
    comfy_model, ours = models
    inp = inputs(1, seed=3)
    with torch.no_grad():
        ours_null = ours(inp["x"], inp["sigma"], inp["text"], None, inp["reference"])
    comfy_zero = comfy_forward(comfy_model, **(inp | dict(audio=torch.zeros_like(inp["audio"]))))
    comfy_skip = comfy_forward(comfy_model, **(inp | dict(audio=None)))
    torch.testing.assert_close(ours_null, comfy_zero, atol=ATOL, rtol=0)
    assert (comfy_skip - comfy_zero).abs().max() > 100 * ATOL
