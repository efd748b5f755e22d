"""InfiniteTalk's audio path: BS.1770 loudness (against pyloudnorm and the standard's sine values),
chinese-wav2vec2-base as InfiniteTalk runs it (fixture made by running upstream's Wav2Vec2Model subclass; transformers' Wav2Vec2Model), the
per-video-frame windows at any frame rate, and audio_proj's latent-frame locality."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from omnisync_core.audio.align import FrameAligner
from omnisync_core.audio.loudness import _biquads, integrated_loudness, k_weighting, normalize_loudness
from omnisync_core.audio.wav2vec2 import (
    WAV2VEC2_PRESETS, Wav2Vec2, encode_speech, frame_windows, is_wav2vec2, load_wav2vec2,
    normalize_wav2vec2_state_dict, prepare_speech, wav2vec2_config_from_shapes, wav2vec2_label,
)
from omnisync_core.errors import InputError
from omnisync_core.model.loading import CheckpointMismatchError
from omnisync_core.model.wan_i2v import WanI2VDiT, audio_windows, wan_i2v_config

FIXTURE = Path(__file__).parent / "fixtures" / "infinitetalk" / "wav2vec2_tiny.safetensors"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def speechlike(rate, seconds, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 1.3 * t)) + 0.05 * rng.standard_normal(len(t))
    x[: rate // 2] *= 1e-3                               # a quiet lead-in the relative gate drops
    x = np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], 1) if channels > 1 else x
    return x.astype(np.float32)


# ---------------------------------------------------------------- loudness

@pytest.mark.parametrize("rate, channels", [(16000, 1), (44100, 1), (48000, 2)])
def test_loudness_matches_pyloudnorm(rate, channels):
    """pyloudnorm (what InfiniteTalk calls) agrees to 1e-6 LU; it filters float32 data, we filter in float64."""
    pyln = pytest.importorskip("pyloudnorm")
    x = speechlike(rate, 3.3, channels)
    want = pyln.Meter(rate).integrated_loudness(x)
    assert abs(integrated_loudness(x, rate) - want) < 1e-6
    if channels == 1:
        ref = pyln.normalize.loudness(x, want, -23.0)
        np.testing.assert_allclose(normalize_loudness(x, rate), ref, rtol=0, atol=1e-7)


def test_k_weighting_is_the_two_biquads():
    """Our exact filter (FIR part + all-pole impulse response, no scipy) equals scipy's recursive lfilter."""
    signal = pytest.importorskip("scipy.signal")
    x = speechlike(16000, 2.0)
    y = x.astype(np.float64)
    for b, a in _biquads(16000):
        y = signal.lfilter(b, a, y)
    np.testing.assert_allclose(k_weighting(x, 16000), y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_bs1770_sine_values(rate):
    """BS.1770: a 0 dBFS 997 Hz sine in one channel reads -3.01 LKFS, at -20 dBFS -23.01; EBU Tech 3341 allows
    +-0.1 LU. pyloudnorm's filter design (which InfiniteTalk uses) gives -3.05 at 48 kHz and -3.08 at 16 kHz."""
    t = np.arange(rate * 5) / rate
    for amp, want in ((1.0, -3.01), (0.1, -23.01)):
        assert abs(integrated_loudness(amp * np.sin(2 * np.pi * 997 * t), rate) - want) < 0.1


def test_silence_and_short_audio():
    """Digital silence is -inf and left alone (upstream skips |LUFS| > 100); under one 400 ms block pyloudnorm
    raises, so integrated_loudness does and normalize_loudness leaves the track unchanged."""
    silence = np.zeros(16000, np.float32)
    assert integrated_loudness(silence, 16000) == float("-inf")
    assert np.array_equal(normalize_loudness(silence, 16000), silence)
    short = speechlike(16000, 0.3)
    with pytest.raises(InputError, match="400 ms"):
        integrated_loudness(short, 16000)
    assert np.array_equal(normalize_loudness(short, 16000), short)
    loud = normalize_loudness(speechlike(16000, 2.0), 16000)
    assert abs(integrated_loudness(loud, 16000) + 23.0) < 1e-4


# ---------------------------------------------------------------- wav2vec2 against upstream

@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURE)


@pytest.fixture(scope="module")
def w2v(fx):
    return load_wav2vec2({k[4:]: v for k, v in fx.items() if k.startswith("w2v.")})


def test_fixture_is_the_tiny_preset(fx, w2v):
    """transformers' state dict (parametrized weight norm, masked_spec_embed) loads; the config reads from shapes."""
    assert w2v.config == WAV2VEC2_PRESETS["tiny"]
    assert "encoder.pos_conv_embed.conv.weight_g" in w2v.state_dict()


def test_speech_preparation_matches_upstream(fx):
    """-23 LUFS (pyloudnorm there, ours here) and the feature extractor, to a float32 ulp of the gain."""
    x = prepare_speech(fx["in.speech"].numpy())
    np.testing.assert_allclose(x, fx["out.input_values"].numpy(), rtol=0, atol=1e-7)
    assert abs(integrated_loudness(fx["in.speech"].numpy(), 16000) - fx["out.lufs"].item()) < 1e-6
    dn = prepare_speech(fx["in.speech"].numpy(), do_normalize=True)
    np.testing.assert_allclose(dn, fx["out.input_values_dn"].numpy(), rtol=0, atol=2e-6)


def test_features_match_upstream(fx, w2v):
    """get_embedding: 2.13 s -> int(2.13 * 25) = 53 frames of 3 layers; the CNN features are interpolated before the
    transformer. Measured max |diff| 2.3e-6 at magnitude ~4 (the inputs differ by 1.5e-8, the gain's rounding)."""
    f = encode_speech(w2v, fx["in.speech"].numpy())
    assert f.shape == fx["out.features"].shape == (53, 3, 32)
    torch.testing.assert_close(f, fx["out.features"], atol=2e-5, rtol=0)
    w2v.config.do_normalize = True
    try:
        torch.testing.assert_close(encode_speech(w2v, fx["in.speech"].numpy()), fx["out.features_dn"], atol=2e-5,
                                   rtol=0)
    finally:
        w2v.config.do_normalize = False
    with torch.no_grad():
        native = w2v(torch.from_numpy(prepare_speech(fx["in.speech"].numpy())))[0]
    torch.testing.assert_close(native, fx["out.native"], atol=2e-5, rtol=0)


def test_interpolating_after_the_encoder_differs(fx, w2v):
    """ComfyUI core's order (encoder at 50 Hz, outputs interpolated to 25 fps) is not InfiniteTalk's: on this model
    the features differ by ~45% of their RMS. interpolate="hidden" is exactly the native outputs resampled."""
    x = fx["in.speech"].numpy()
    before, after = encode_speech(w2v, x), encode_speech(w2v, x, interpolate="hidden")
    rms = lambda t: t.pow(2).mean().sqrt().item()
    assert rms(after - before) > 0.2 * rms(before)
    want = F.interpolate(fx["out.native"].flatten(1).T[None], size=53, mode="linear", align_corners=True)[0].T
    torch.testing.assert_close(after, want.reshape(53, 3, 32), atol=2e-5, rtol=0)


# ---------------------------------------------------------------- wav2vec2 against transformers

def hf_model(stable=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16,) * 7, conv_bias=stable,
                                      feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable)
    return transformers.Wav2Vec2Model(cfg).eval()


def test_native_rate_matches_transformers():
    """No interpolation: the stacked layer outputs are transformers' hidden_states[1:] (base, post-norm)."""
    hm = hf_model()
    m = load_wav2vec2(hm.state_dict())
    x = torch.randn(2, 16000)
    with torch.no_grad():
        want = torch.stack(hm(x, output_hidden_states=True).hidden_states[1:], 2)
        got = m(x)
    assert got.shape == (2, 49, 3, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_interpolation_before_the_encoder_with_transformers_modules():
    """InfiniteTalk's order, composed from transformers' own modules: CNN -> linear interpolation to 25 fps ->
    feature projection -> positional conv -> layer norm -> layers."""
    hm = hf_model()
    m = load_wav2vec2(hm.state_dict())
    x = torch.randn(1, 24000)
    with torch.no_grad():
        feats = F.interpolate(hm.feature_extractor(x), size=37, mode="linear", align_corners=True).transpose(1, 2)
        h = hm.feature_projection(feats)[0]
        h = hm.encoder.layer_norm(h + hm.encoder.pos_conv_embed(h))
        outs = []
        for layer in hm.encoder.layers:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
        got = m(x, 37)
    torch.testing.assert_close(got, torch.stack(outs, 2), atol=1e-5, rtol=0)


def test_pre_norm_variant_matches_transformers():
    """The large-checkpoint layout (LayerNorm convs, pre-norm layers): the layers' outputs, the last after the
    encoder's final norm (transformers' last_hidden_state)."""
    hm = hf_model(stable=True)
    sd = hm.state_dict()
    cfg = wav2vec2_config_from_shapes(sd)
    assert cfg.do_stable_layer_norm and cfg.feat_extract_norm == "layer" and cfg.conv_bias
    m = load_wav2vec2(sd)
    x = torch.randn(1, 16000)
    with torch.no_grad():
        out = hm(x, output_hidden_states=True)
        got = m(x)
    torch.testing.assert_close(got[:, :, :2], torch.stack(out.hidden_states[1:3], 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, :, 2], out.last_hidden_state, atol=1e-5, rtol=0)


def test_pretraining_file_layout(tmp_path, w2v, fx):
    """The HF checkpoint's layout (saved from Wav2Vec2ForPreTraining: `wav2vec2.` prefix, quantizer and projection
    heads, weight_g / weight_v) loads from safetensors, reading only the encoder's tensors, fp16 included."""
    sd = {f"wav2vec2.{k}": v.contiguous() for k, v in w2v.state_dict().items()}
    sd |= {"quantizer.codevectors": torch.zeros(1, 640, 128), "project_q.weight": torch.zeros(256, 256),
           "project_hid.weight": torch.zeros(256, 32), "wav2vec2.masked_spec_embed": torch.zeros(32)}
    path = tmp_path / "model.safetensors"
    save_file({k: v.half() for k, v in sd.items()}, str(path))
    assert is_wav2vec2({k: v.shape for k, v in sd.items()})
    m = load_wav2vec2(path, dtype="fp32")
    assert all(torch.equal(v, w2v.state_dict()[k].half().float()) for k, v in m.state_dict().items())
    f = encode_speech(m, fx["in.speech"].numpy())
    torch.testing.assert_close(f, fx["out.features"], atol=5e-2, rtol=0)     # fp16-rounded weights
    del sd["wav2vec2.encoder.layers.2.final_layer_norm.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointMismatchError, match="1 missing: encoder.layers.2.final_layer_norm.bias"):
        load_wav2vec2(bad, config="tiny")


def test_chinese_base_layout():
    """The base checkpoint's layout: transformers' Wav2Vec2Model with its default (base) config, built on the meta
    device, has our keys and shapes (94.37 M parameters, + SpecAugment's 768-wide mask vector, not read), and
    reads back as the chinese-base preset."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Wav2Vec2("chinese-base").state_dict().items()}
        hf = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).state_dict()
    assert {k: tuple(v.shape) for k, v in normalize_wav2vec2_state_dict(hf).items()} == ours
    shapes = {f"wav2vec2.{k}": s for k, s in ours.items()}
    assert wav2vec2_config_from_shapes(shapes) == WAV2VEC2_PRESETS["chinese-base"]
    assert shapes["wav2vec2.encoder.pos_conv_embed.conv.weight_v"] == (768, 48, 128)
    assert sum(np.prod(s) for s in ours.values()) == 94_370_944
    assert wav2vec2_label(WAV2VEC2_PRESETS["chinese-base"]) == "wav2vec2 base (12 layers x 768)"


# ---------------------------------------------------------------- windows and audio_proj

def test_windows_at_25_fps_are_upstreams():
    feats = torch.randn(40, 3, 8)
    frames = torch.arange(10, 10 + 81)
    assert torch.equal(frame_windows(feats, frames, 25), audio_windows(feats, 10, 81))


@pytest.mark.parametrize("fps", [30, "30000/1001", 24])
def test_windows_at_other_rates_follow_the_clock(fps):
    """Frame i at `fps` is centred on the 25 fps feature holding its start time, +-2 features, clamped."""
    feats = torch.arange(100.0)[:, None, None].expand(100, 1, 2)
    frames = torch.arange(0, 120)
    w = frame_windows(feats, frames, fps)
    centre = FrameAligner(fps, 25).feature_indices(frames)
    assert torch.equal(w[:, 2, 0, 0].long(), centre.clamp(0, 99))
    assert torch.equal(w[:, :, 0, 0].long(), (centre[:, None] + torch.arange(-2, 3)).clamp(0, 99))


def test_speech_to_audio_tokens_is_latent_frame_local(fx, w2v):
    """wav2vec2 features -> windows -> audio_proj: latent frame 0 hears video frame 0 only, latent frame k video
    frames 4k-3 .. 4k only (audio_proj works per latent frame, so other frames' tokens stay bit-identical)."""
    feats = encode_speech(w2v, fx["in.speech"].numpy())               # [53, 3, 32]
    torch.manual_seed(0)
    dit = WanI2VDiT(wan_i2v_config("tiny", wav2vec_dim=32)).eval()
    win = frame_windows(feats, torch.arange(21), 25)[None]              # 21 video frames -> 6 latent frames
    with torch.no_grad():
        tokens = dit.audio_tokens(win)
        assert tokens.shape == (1, 6, 4, 24)
        for frame, latent in ((0, 0), (5, 2), (8, 2), (9, 3)):
            bumped = win.clone()
            bumped[:, frame] += 1.0
            changed = (dit.audio_tokens(bumped) != tokens).flatten(2).any(-1)[0]
            assert changed.tolist() == [i == latent for i in range(6)]
