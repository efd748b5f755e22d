"""Wan2.1 VAE: diffusers AutoencoderKLWan as a numerical oracle on random weights, key layouts, causality/caching,
shape errors, tiled decode, and a printed time/memory figure."""

import time
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from omnisync_core.errors import InputError
from omnisync_core.model.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE, WanVAEConfig
from omnisync_core.model.vae_keys import diffusers_to_wan_vae, is_diffusers_vae, wan_vae_to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP synchronisation dominates on a shared CPU (measured 60x slower with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random weights everywhere: gains near 1, biases near 0, weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module.eval()


def _video(t: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module", params=[2, 1], ids=["res2", "res1"])
def pair(request):
    """(diffusers oracle, our model with its converted weights) for the tiny preset (and a 1-res-block variant)."""
    n_res = request.param
    ref = _randomize(AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=n_res), seed=n_res)
    ours = WanVAE(WanVAEConfig(dim=8, num_res_blocks=n_res)).eval()
    ours.load_state_dict(diffusers_to_wan_vae(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def tiny():
    return _randomize(WanVAE("tiny"), seed=7)


def test_matches_diffusers(pair):
    ref, ours = pair
    size = 32 if ours.config.num_res_blocks == 2 else 16
    x = _video(9, size, size)
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mean
        mu = ours.encode(x, normalize=False)
        assert mu.shape == (1, 16, 3, size // 8, size // 8)
        err_enc = (mu - mu_ref).abs().max().item()
        assert err_enc <= TOL, err_enc
        out_ref = ref.decode(mu_ref).sample
        out = ours.decode(mu_ref, normalized=False)
    assert out.shape == x.shape
    # diffusers clamps to [-1, 1]: make sure most values are not saturated, or the comparison would be weak
    assert (out_ref.abs() < 0.999).float().mean() > 0.8
    err_dec = (out - out_ref).abs().max().item()
    assert err_dec <= TOL, err_dec
    print(f"\nvae vs diffusers: encode max abs {err_enc:.2e}, decode max abs {err_dec:.2e}")


def test_real_size_layout_matches_diffusers():
    """The wan2.1 preset has exactly diffusers' parameters (names via both key maps, shapes) on the meta device."""
    with torch.device("meta"):
        ours = WanVAE("wan2.1")
        ref = AutoencoderKLWan()
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(sd) == len(ref_sd) == 194
    for name in ["encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
                 "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
                 "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight", "conv1.weight", "conv2.weight",
                 "decoder.middle.2.residual.6.weight", "decoder.upsamples.3.time_conv.weight",
                 "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
                 "decoder.head.0.gamma"]:
        assert name in sd, name
    to_d = wan_vae_to_diffusers(sd)
    assert to_d.keys() == ref_sd.keys()
    assert all(to_d[k].shape == ref_sd[k].shape for k in ref_sd)
    assert convert_wan_vae_to_diffusers(sd).keys() == ref_sd.keys()  # diffusers' own converter agrees on names
    assert diffusers_to_wan_vae(ref_sd).keys() == sd.keys()
    assert is_diffusers_vae(ref_sd) and not is_diffusers_vae(sd)
    cfg = WanVAEConfig.from_state_dict(sd)
    assert cfg == WanVAEConfig()
    assert len(cfg.latents_mean) == len(cfg.latents_std) == 16
    assert cfg.latents_mean == tuple(ref.config.latents_mean) and cfg.latents_std == tuple(ref.config.latents_std)


def test_key_maps_round_trip(pair):
    ref, ours = pair
    sd = ours.state_dict()
    assert wan_vae_to_diffusers(sd).keys() == ref.state_dict().keys()
    back = diffusers_to_wan_vae(wan_vae_to_diffusers(sd))
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_from_state_dict_infers_config_and_loads(pair):
    ref, ours = pair
    loaded = WanVAE.from_state_dict(ref.state_dict())  # diffusers layout, detected
    assert loaded.config == ours.config
    x = _video(5, 16, 16, seed=3)
    with torch.no_grad():
        want = ours.encode(x)
        # same weights in other allocations: equal up to the summation order the kernels pick for them
        torch.testing.assert_close(loaded.encode(x), want, rtol=0, atol=1e-6 * float(want.abs().max()))
    bad = dict(ours.state_dict())
    bad.pop("decoder.head.2.bias")
    with pytest.raises(InputError, match="missing"):
        WanVAE.from_state_dict(bad)


def test_normalisation_constants(tiny):
    x = _video(5, 16, 16, seed=1)
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        raw = tiny.encode(x, normalize=False)
        z = tiny.encode(x)
        assert torch.allclose(z, (raw - mean) / std, atol=1e-6)
        assert torch.allclose(tiny.decode(z), tiny.decode(raw, normalized=False), atol=1e-5)
        # deterministic by default; sampling differs
        assert torch.equal(tiny.encode(x), z)
        assert not torch.allclose(tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(0)), z)


def test_causal_prefix_and_chunking(tiny):
    """Appending frames never changes earlier latents/frames; the chunk size never changes the result."""
    x = _video(17, 16, 16, seed=2)
    with torch.no_grad():
        z17 = tiny.encode(x)
        z9 = tiny.encode(x[:, :, :9])
        assert z17.shape[2] == 5 and z9.shape[2] == 3
        assert (z17[:, :, :3] - z9).abs().max() <= 1e-5
        assert (tiny.encode(x, chunk=3) - z17).abs().max() <= 1e-5
        v5 = tiny.decode(z17)
        v3 = tiny.decode(z17[:, :, :3])
        assert v5.shape[2] == 17 and v3.shape[2] == 9
        assert (v5[:, :, :9] - v3).abs().max() <= 1e-5
        assert (tiny.decode(z17, chunk=4) - v5).abs().max() <= 1e-5
        # and the prefix does depend on the frames: a change in frame 9 changes latent 3 but not 0..2
        y = x.clone()
        y[:, :, 9] = 0
        zy = tiny.encode(y)
        assert torch.equal(zy[:, :, :3], z17[:, :, :3]) and not torch.allclose(zy[:, :, 3], z17[:, :, 3])


@pytest.mark.parametrize("shape, match", [
    ((1, 3, 8, 32, 32), "4k\\+1 frames"),
    ((1, 3, 9, 36, 32), "multiples of 8"),
    ((1, 3, 9, 32, 20), "multiples of 8"),
    ((3, 9, 32, 32), "\\[B, 3, T, H, W\\]"),
    ((1, 4, 9, 32, 32), "\\[B, 3, T, H, W\\]"),
])
def test_bad_video_shapes(tiny, shape, match):
    with pytest.raises(InputError, match=match):
        tiny.encode(torch.zeros(shape))


def test_bad_latents_and_options(tiny):
    with pytest.raises(InputError, match="latents"):
        tiny.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(InputError, match="latents"):
        tiny.decode(torch.zeros(16, 2, 4, 4))
    with pytest.raises(InputError, match="overlap"):
        tiny.decode(torch.zeros(1, 16, 1, 8, 8), tile_size=4, tile_overlap=4)
    with pytest.raises(InputError, match="chunk"):
        tiny.encode(torch.zeros(1, 3, 5, 16, 16), chunk=0)
    with pytest.raises(InputError, match="preset"):
        WanVAE("huge")


def test_tiled_decode_close_to_untiled(tiny):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 16, 2, 12, 12, generator=g)  # batch 2 also takes the fast mkldnn conv path on CPU
    with torch.no_grad():
        full = tiny.decode(z)
        errs = {}
        for tile, overlap in [(8, 2), (10, 6)]:
            tiled = tiny.decode(z, tile_size=tile, tile_overlap=overlap)
            assert tiled.shape == full.shape
            errs[(tile, overlap)] = ((tiled - full).abs().mean().item(), (tiled - full).abs().max().item())
    print("\ntiled decode vs untiled (mean abs, max abs) on random weights:",
          {k: tuple(round(e, 4) for e in v) for k, v in errs.items()})
    # random weights and a 12-cell latent are a hard case (every tile border lies within the receptive field of
    # the whole frame); the error must still be small on average and shrink with more overlap
    assert errs[(10, 6)][0] < errs[(8, 2)][0]
    assert errs[(10, 6)][0] < 0.05 and errs[(8, 2)][0] < 0.1


def test_tile_blending_is_exact_for_a_local_decoder(tiny, monkeypatch):
    """With a stand-in decoder that is purely local (pixel = function of its latent cell), tiles agree in their
    overlaps, so the blended result must equal the untiled one exactly: checks tile placement and weights."""

    def local_decoder(z, chunk):
        for l0, l1 in tiny._chunks(z.shape[2], chunk):
            f0, f1 = max(0, 1 + 4 * (l0 - 1)), 1 + 4 * (l1 - 1)
            cells = torch.sin(z[:, :3, l0:l1]) * torch.cos(z[:, 3:6, l0:l1])
            frames = cells.repeat_interleave(f1 - f0, 2)[:, :, : f1 - f0] if l0 else cells
            yield f0, f1, frames.repeat_interleave(8, 3).repeat_interleave(8, 4)

    monkeypatch.setattr(tiny, "_decode_tile", local_decoder)
    z = torch.randn(1, 16, 3, 11, 13, generator=torch.Generator().manual_seed(9))
    full = tiny.decode(z, normalized=False)
    for tile, overlap in [(4, 1), (5, 3), (8, 0), (6, 5)]:
        tiled = tiny.decode(z, normalized=False, tile_size=tile, tile_overlap=overlap)
        assert (tiled - full).abs().max() <= 1e-6, (tile, overlap)


def test_bfloat16_runs_close_to_float32(tiny):
    x = _video(5, 16, 16, seed=6)
    low = WanVAE("tiny").eval()
    low.load_state_dict(tiny.state_dict())
    low = low.to(torch.bfloat16)
    with torch.no_grad():
        z32, z16 = tiny.encode(x), low.encode(x)
        assert z16.dtype == torch.float32 and (z16 - z32).abs().max() < 0.1 * z32.abs().max()
        v16 = low.decode(z32)
        assert v16.dtype == torch.float32 and (v16 - tiny.decode(z32)).abs().mean() < 0.05


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by aten ops while active and still referenced (CPU-friendly)."""

    def __init__(self, ignore: list[torch.Tensor]):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.size: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.now = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.now -= self.size.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in self.ignore or not ptr:
                    continue
                if ptr not in self.size:
                    self.size[ptr], self.refs[ptr] = storage.nbytes(), 0
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[ptr] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def test_time_and_memory_figure(tiny):
    """Printed figure: time and peak live tensor memory of encode+decode at two clip lengths. Memory may grow with
    T only by the latent and output tensors (loose check; the caches hold a fixed number of frames)."""
    rows, peaks = [], {}
    for t in (5, 21):
        x = _video(t, 32, 32, seed=4)
        tracker = _LiveTensorBytes(ignore=[x, *tiny.parameters()])
        t0 = time.perf_counter()
        with torch.no_grad(), tracker:
            z = tiny.encode(x)
            out = tiny.decode(z)
        dt = time.perf_counter() - t0
        io = (out.numel() + z.numel()) * 4
        peaks[t] = (tracker.peak, io)
        rows.append(f"T={t:3d} 32x32: {dt:.2f} s, peak live tensors {tracker.peak / 2**20:.2f} MiB "
                    f"(of which latent+output {io / 2**20:.2f} MiB)")
        assert out.shape == x.shape
        del z, out
    print("\ntiny VAE encode+decode:\n  " + "\n  ".join(rows))
    (p_short, io_short), (p_long, io_long) = peaks[5], peaks[21]
    assert p_long - p_short < 1.5 * (io_long - io_short) + 0.1 * p_short
