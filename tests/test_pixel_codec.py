"""PixelCodec: exact round trip, Wan-compatible shapes and temporal grouping, use inside OmniSyncGenerator."""

import pytest
import torch

from omnisync_core.errors import InputError
from omnisync_core.generator import OmniSyncGenerator, SamplerOptions
from omnisync_core.model.dit import OmniSyncDiT, get_config
from omnisync_core.model.pixel_codec import PixelCodec, PixelCodecConfig


def _video(t, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, t, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("fs,ft,t", [(1, 1, 3), (4, 1, 6), (2, 4, 9), (8, 4, 1)])
def test_round_trip_exact_and_shapes(fs, ft, t):
    codec = PixelCodec(spatial_factor=fs, temporal_factor=ft, scale=0.5, shift=0.1)
    x = _video(t, 16, 24)
    z = codec.encode(x)
    assert z.shape == (2, 3 * ft * fs * fs, 1 + (t - 1) // ft, 16 // fs, 24 // fs)
    assert z.shape[1] == codec.config.z_dim
    assert torch.allclose(codec.decode(z, clamp=False), x, atol=1e-6)
    assert torch.equal(codec.decode(codec.encode(x, normalize=False), normalized=False), x)   # bit-exact
    assert torch.equal(PixelCodec(spatial_factor=fs, temporal_factor=ft).decode(
        PixelCodec(spatial_factor=fs, temporal_factor=ft).encode(x)), x)


def test_normalisation_and_clamp():
    codec = PixelCodec(scale=0.5, shift=0.25)
    x = _video(2)
    assert torch.allclose(codec.encode(x), (codec.encode(x, normalize=False) - 0.25) / 0.5)
    big = torch.full_like(codec.encode(x), 10.0)
    assert codec.decode(big).max() == 1.0
    assert codec.decode(big, clamp=False).max() > 1.0


def test_wan_temporal_grouping():
    """Latent 0 holds frame 0 only; latent f holds frames 4f-3 .. 4f, as Wan's causal VAE groups them."""
    codec = PixelCodec(spatial_factor=1, temporal_factor=4)
    t = 9
    x = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1).expand(1, 3, t, 2, 2)
    z = codec.encode(x, normalize=False)            # channels (slot, colour): slot k of latent f = frame 4f-3+k
    assert z.shape[2] == 3
    slots = z[0, :, :, 0, 0].view(4, 3, 3)[:, 0]    # [slot, latent]
    assert slots[:, 0].tolist() == [0, 0, 0, 0]
    assert slots[:, 1].tolist() == [1, 2, 3, 4]
    assert slots[:, 2].tolist() == [5, 6, 7, 8]


def test_spatial_blocks_stay_local():
    codec = PixelCodec(spatial_factor=4)
    x = torch.zeros(1, 3, 1, 8, 8)
    x[0, :, 0, 4:8, 0:4] = 1.0                        # one 4x4 block -> one latent cell
    z = codec.encode(x, normalize=False)[0, :, 0]
    assert torch.count_nonzero(z.abs().sum(0)).item() == 1 and z[:, 1, 0].eq(1).all()


def test_bad_input_raises():
    codec = PixelCodec(spatial_factor=4, temporal_factor=4)
    with pytest.raises(InputError):
        codec.encode(torch.zeros(1, 3, 4, 8, 8))     # not 4k+1 frames
    with pytest.raises(InputError):
        codec.encode(torch.zeros(1, 3, 5, 6, 8))     # height not a multiple of 4
    with pytest.raises(InputError):
        codec.decode(torch.zeros(1, 5, 2, 2, 2))     # wrong channel count
    with pytest.raises(InputError):
        PixelCodecConfig(scale=0.0)


def test_config_dict_and_no_state():
    codec = PixelCodec({"spatial_factor": 2, "temporal_factor": 4})
    assert PixelCodec(codec.config.to_dict()).config == codec.config
    assert len(codec.state_dict()) == 0


@pytest.mark.parametrize("guidance", ["ds-cfg", "cfg", "none"])
def test_generator_runs_with_pixel_codec(guidance):
    """OmniSyncGenerator with a tiny DiT on the codec's latents (Wan's 4x temporal grouping, which the generator's
    DS-CFG mouth mapping assumes), on a 7-frame window (padded to 9 inside)."""
    torch.manual_seed(0)
    codec = PixelCodec(spatial_factor=4, temporal_factor=4)
    z = codec.config.z_dim
    dit = OmniSyncDiT(get_config("tiny", in_dim=z, out_dim=z, audio_dim=24, temporal_compression=4))
    with torch.no_grad():
        for p in dit.parameters():      # a fresh DiT has zero head and zero audio output: make it do something
            p.add_(torch.randn_like(p) * 0.02)
    dit.set_text_context(torch.randn(1, 3, 32))
    gen = OmniSyncGenerator(dit, codec, SamplerOptions(steps=6, guidance=guidance))
    crops = torch.rand(7, 32, 32, 3)
    audio = torch.randn(7, 4, 24)
    mouth = torch.tensor([[16.0, 22.0]]).expand(7, 2)
    out = gen.edit(crops, audio, mouth, torch.full((7,), 20.0), seed=3)
    assert out.shape == (7, 32, 32, 3)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, gen.edit(crops, audio, mouth, torch.full((7,), 20.0), seed=3))   # seeded
    assert gen.last_stats.model_calls > 0


def test_generator_identity_dit_returns_source():
    """A DiT that predicts v = eps - z_src (the exact velocity towards the source) makes the generator return the
    source crops: checks encode/decode wiring and colour range conversion end to end."""
    codec = PixelCodec(spatial_factor=4, temporal_factor=4)

    class ToSource(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, sigma, source=None, audio=None, text=None, audio_mask=None):
            s = sigma.reshape(-1, 1, 1, 1, 1)
            return (x - source) / s.clamp_min(1e-6)     # x = (1-s) src + s eps  =>  v = eps - src

    crops = torch.rand(5, 16, 16, 3)
    gen = OmniSyncGenerator(ToSource(), codec, SamplerOptions(steps=8, guidance="none"))
    out = gen.edit(crops, torch.zeros(5, 2, 8), torch.full((5, 2), 8.0), torch.full((5,), 10.0), seed=0)
    assert torch.allclose(out, crops, atol=1e-4)


def test_source_residual_model_with_a_silent_head_returns_its_source():
    """A source-residual DiT whose head outputs zero predicts x0 = source at every step, so sampling from any
    noise level lands exactly on the source (the velocity it returns is (x - source) / sigma)."""
    codec = PixelCodec(spatial_factor=4, scale=0.5)
    cfg = get_config("tiny", in_dim=48, out_dim=48, audio_dim=16, temporal_compression=1,
                     prediction="source-residual")
    dit = OmniSyncDiT(cfg).eval()
    dit.set_text_context(torch.zeros(1, cfg.text_len, cfg.text_dim))
    torch.nn.init.zeros_(dit.head.head.weight)
    torch.nn.init.zeros_(dit.head.head.bias)
    crops = torch.rand(5, 32, 32, 3)
    out = OmniSyncGenerator(dit, codec, SamplerOptions(steps=8)).edit(crops, torch.randn(5, 5, 16),
                                                                  torch.full((5, 2), 16.0), torch.full((5,), 12.0), 0)
    assert (out - crops).abs().max() < 1e-4
    with pytest.raises(InputError, match="source"):
        dit(torch.zeros(1, 48, 1, 8, 8), 0.5)
    with pytest.raises(InputError, match="prediction"):
        get_config("tiny", prediction="epsilon")
