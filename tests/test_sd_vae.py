"""SD VAE (sd-vae-ft-mse) against diffusers' AutoencoderKL on a tiny random config: moments, the sampled encode
LatentSync uses (same generator draw), decode, slicing; the three checkpoint layouts; strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from omnisync_core.errors import InputError
from omnisync_core.model.loading import CheckpointMismatchError
from omnisync_core.model.sd_vae import (
    SD_VAE_PRESETS, SDVAE, is_sd_vae, load_sd_vae, normalize_sd_vae_state_dict, sd_vae_config_from_shapes,
    sd_vae_shapes,
)

diffusers = pytest.importorskip("diffusers")
MANIFEST = Path(__file__).parent / "fixtures" / "manifests" / "latentsync_sd_vae.json"
# fp32; same ops in the same order except einops vs view/transpose around the one attention: ~1e-6 at |x| ~ 1
ATOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                                  scaling_factor=0.18215).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():   # norms and biases random too
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 1 / p[0].numel() ** 0.5)
                    + (1.0 if p.ndim == 1 and "norm" in name and name.endswith("weight") else 0.0))
    ours = load_sd_vae(ref.state_dict())
    assert ours.config == SD_VAE_PRESETS["tiny"]
    return ref, ours


def test_encode_matches_diffusers(pair):
    ref, ours = pair
    x = torch.rand(3, 3, 24, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.moments(x)
        torch.testing.assert_close(mean, dist.mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(logvar, dist.logvar, atol=ATOL, rtol=0)
        want = dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    # slices of 2 (3 images): the noise is drawn for the whole batch first, exactly as diffusers' one call
    got = ours.encode(x, generator=torch.Generator().manual_seed(7), slice_size=2)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.encode(x, sample=False, slice_size=1), dist.mean * 0.18215, atol=ATOL, rtol=0)


def test_decode_matches_diffusers_in_slices(pair):
    ref, ours = pair
    z = torch.randn(5, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.decode(z / 0.18215).sample
    for s in (1, 2, 5):
        torch.testing.assert_close(ours.decode(z, slice_size=s), want, atol=ATOL, rtol=0)


def test_window_layout_round_trips(pair):
    _, ours = pair
    x = torch.rand(1, 3, 4, 16, 16) * 2 - 1          # [B, C, F, H, W]
    z = ours.encode(x, sample=False)
    assert z.shape == (1, 4, 4, 8, 8)
    assert ours.decode(z).shape == (1, 3, 4, 16, 16)
    flat = ours.encode(x[0].transpose(0, 1), sample=False)
    torch.testing.assert_close(z[0].transpose(0, 1), flat, atol=0, rtol=0)
    with pytest.raises(InputError):
        ours.decode(torch.zeros(1, 3, 8, 8))


def test_real_config_key_layouts():
    manifest = json.loads(MANIFEST.read_text())
    ours = sd_vae_shapes("sd-vae-ft-mse")
    assert {k: list(v) for k, v in ours.items()} == manifest["diffusers"]
    assert sum(torch.Size(s).numel() for s in ours.values()) == manifest["num_elements"] == 83_653_863
    ldm = {k: torch.empty(s, device="meta") for k, s in manifest["ldm"].items()}
    assert is_sd_vae(ldm)
    mapped = {k: list(v.shape) for k, v in normalize_sd_vae_state_dict(ldm).items()}
    assert mapped == manifest["diffusers"]
    assert sd_vae_config_from_shapes(normalize_sd_vae_state_dict(ldm)) == SD_VAE_PRESETS["sd-vae-ft-mse"]


def test_legacy_attention_names_and_strict_loading(pair, tmp_path):
    ref, ours = pair
    sd = ref.state_dict()
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in sd.items()}
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, str(path))
    loaded = load_sd_vae(path)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded.encode(x, sample=False), ours.encode(x, sample=False), atol=0, rtol=0)
    bad = dict(sd)
    bad.pop("decoder.conv_out.bias")
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_out.bias"):
        load_sd_vae(bad)
    assert isinstance(SDVAE("tiny"), SDVAE)
