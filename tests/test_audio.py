"""Audio front-end: decoding, resampling, Whisper log-mel and frame alignment (DESIGN.md §1, issue 2)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.signal
import torch

from conftest import log_sweep, read_wav, write_wav
from omnisync_core.audio import (FrameAligner, as_fraction, from_array, from_comfy_audio, is_silent, load_audio,
                                 log_mel_spectrogram, prepare_audio, resample)
from omnisync_core.errors import AudioError, InputError


def _reference_features():
    from faster_whisper.feature_extractor import FeatureExtractor   # numpy reference, test-only
    return FeatureExtractor(feature_size=80)


def _error_db(reference: np.ndarray, ours: np.ndarray) -> float:
    return 10 * math.log10(float(((reference - ours) ** 2).sum() / (reference ** 2).sum()))


def _write_audio(path, samples: np.ndarray, rate: int, codec: str, layout: str = "mono"):
    """Encode float samples [C, N] with PyAV into any container (test-side writer)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], frame_size):
            chunk = np.ascontiguousarray(samples[:, start:start + frame_size].astype(np.float32))
            frame = av.AudioFrame.from_ndarray(chunk if av.AudioFormat(fmt).is_planar else chunk.T.reshape(1, -1),
                                               format="fltp" if av.AudioFormat(fmt).is_planar else "flt",
                                               layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# ---------------------------------------------------------------- log-mel

def test_log_mel_matches_reference_on_speech(speech_wav):
    samples, rate = read_wav(speech_wav)
    speech16k = scipy.signal.resample_poly(samples.astype(np.float64), 320, 441).astype(np.float32)
    reference = _reference_features()(speech16k, padding=0)
    ours = log_mel_spectrogram(torch.from_numpy(speech16k)).numpy()
    assert ours.shape == reference.shape == (80, len(speech16k) // 160)
    assert np.abs(ours - reference).max() <= 1e-3
    # Whisper's 30 s window: zero padding to 3000 frames, clamp taken over the padded clip.
    padded = np.pad(speech16k, (0, 480000 - len(speech16k)))
    ours30 = log_mel_spectrogram(torch.from_numpy(speech16k), pad_to_frames=3000).numpy()
    assert ours30.shape == (80, 3000)
    assert np.abs(ours30 - _reference_features()(padded, padding=0)).max() <= 1e-3


def test_log_mel_matches_reference_on_sweep():
    sweep = (0.5 * log_sweep(16000, 4.0, 30.0, 7900.0)).astype(np.float32)
    reference = _reference_features()(sweep, padding=0)
    ours = log_mel_spectrogram(torch.from_numpy(sweep)).numpy()
    assert np.abs(ours - reference).max() <= 1e-3
    batched = log_mel_spectrogram(torch.from_numpy(np.stack([sweep, sweep[::-1].copy()])))
    assert batched.shape == (2, 80, 400)
    assert torch.allclose(batched[0], torch.from_numpy(ours))


def test_mel_filters_match_reference():
    from omnisync_core.audio import mel_filters
    np.testing.assert_allclose(mel_filters(80).numpy(), _reference_features().mel_filters, atol=1e-7)
    assert mel_filters(128).shape == (128, 201)


# ---------------------------------------------------------------- resampling

@pytest.mark.parametrize("rate", [44100, 48000, 8000, 22050])
def test_resample_matches_scipy(rate):
    up, down = Fraction(16000, rate).numerator, Fraction(16000, rate).denominator
    # A sweep over the shared pass-band (to 0.8 x the lower Nyquist, below scipy's default filter's transition),
    # faded in and out so that the two filters' different lengths do not meet a hard edge.
    sweep = 0.9 * log_sweep(rate, 2.0, 20.0, 0.8 * min(rate, 16000) / 2) * scipy.signal.windows.tukey(2 * rate, 0.05)
    ours = resample(torch.from_numpy(sweep.astype(np.float32)), rate, 16000).double().numpy()
    default = scipy.signal.resample_poly(sweep, up, down)
    assert len(ours) == len(default) == math.ceil(len(sweep) * up / down)
    assert _error_db(default, ours) <= -60.0
    # The same Kaiser design in scipy: the two implementations then agree to float32 precision.
    taps = scipy.signal.firwin(2 * 32 * max(up, down) + 1, 1.0 / max(up, down), window=("kaiser", 14.0))
    assert _error_db(scipy.signal.resample_poly(sweep, up, down, window=taps), ours) <= -100.0


def test_resample_shapes_gain_and_odd_ratios():
    constant = torch.full((2, 44100), 0.25)
    out = resample(constant, 44100, 16000)
    assert out.shape == (2, 16000)
    assert torch.allclose(out[:, 200:-200], torch.tensor(0.25), atol=1e-5)
    x = torch.randn(3000)
    assert torch.equal(resample(x, 16000, 16000), x)
    # An odd camera rate with thousands of phases takes the gathered path and still matches scipy.
    odd = 0.9 * log_sweep(16001, 0.5, 50.0, 6000.0)
    ours = resample(torch.from_numpy(odd.astype(np.float32)), 16001, 16000).double().numpy()
    taps = scipy.signal.firwin(2 * 32 * 16001 + 1, 1.0 / 16001, window=("kaiser", 14.0))
    assert _error_db(scipy.signal.resample_poly(odd, 16000, 16001, window=taps), ours) <= -100.0


# ---------------------------------------------------------------- decoding

def test_load_audio_wav_int16_stereo(tmp_path):
    rate = 44100
    left, right = 0.5 * log_sweep(rate, 1.0, 100, 5000), 0.25 * np.ones(rate)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), rate)
    wave = load_audio(path)
    assert wave.sample_rate == rate and wave.samples.shape == (rate,) and wave.samples.dtype == torch.float32
    expected = (np.round(left * 32767) + np.round(right * 32767)) / 2 / 32768
    np.testing.assert_allclose(wave.samples.numpy(), expected, atol=1e-6)
    assert wave.seconds == pytest.approx(1.0)


@pytest.mark.parametrize("container,codec", [("m4a", "aac"), ("flac", "flac"), ("mp3", "libmp3lame"),
                                             ("ogg", "libopus")])
def test_load_audio_compressed(tmp_path, container, codec):
    rate = 48000
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    path = tmp_path / f"tone.{container}"
    try:
        _write_audio(path, np.stack([tone, tone]), rate, codec, layout="stereo")
    except (av.error.FFmpegError, ValueError) as error:   # encoder not in this PyAV build
        pytest.skip(f"{codec} encoder unavailable: {error}")
    wave = load_audio(path)
    assert wave.sample_rate == rate
    assert abs(wave.samples.shape[0] - rate) <= 2048       # codec priming/padding
    spectrum = np.abs(np.fft.rfft(wave.samples.numpy()))
    assert abs(np.argmax(spectrum) * rate / len(wave.samples) - 440) < 3
    assert abs(float(wave.samples.abs().max()) - 0.5) < 0.08


def test_from_array_layouts_and_pcm_types():
    rate = 8000
    base = np.sin(np.linspace(0, 20, rate))
    int16 = np.round(base * 32767).astype(np.int16)
    assert torch.allclose(from_array(int16, rate).samples, torch.from_numpy(int16 / 32768.0).float(), atol=1e-7)
    int32 = (base * 2 ** 30).astype(np.int32)
    assert torch.allclose(from_array(int32, rate).samples, torch.from_numpy(base / 2).float(), atol=1e-6)
    uint8 = np.round(base * 100 + 128).astype(np.uint8)
    assert torch.allclose(from_array(uint8, rate).samples, torch.from_numpy((uint8 - 128.0) / 128).float())
    stereo = torch.from_numpy(np.stack([base, -base / 2])).float()
    assert torch.allclose(from_array(stereo, rate).samples, torch.from_numpy(base / 4).float(), atol=1e-6)
    assert torch.allclose(from_array(stereo.T, rate, channels_first=False).samples,
                          from_array(stereo, rate).samples)
    comfy = {"waveform": stereo.unsqueeze(0), "sample_rate": rate}
    assert torch.equal(from_comfy_audio(comfy).samples, from_array(stereo, rate).samples)


def test_comfy_audio_read_by_key_from_a_lazy_mapping():
    from collections.abc import Mapping

    class LazyAudio(Mapping):           # VideoHelperSuite passes a Mapping that decodes on access
        def __init__(self):
            self.loaded = 0

        def __getitem__(self, key):
            self.loaded += 1
            return {"waveform": torch.zeros(1, 1, 800) + 0.1, "sample_rate": 8000}[key]

        def __iter__(self):
            return iter(["waveform", "sample_rate"])

        def __len__(self):
            return 2

    lazy = LazyAudio()
    wave = prepare_audio(lazy)
    assert wave.sample_rate == 16000 and wave.samples.shape == (1600,) and lazy.loaded == 2


def test_prepare_audio_from_file_and_array(speech_wav):
    samples, rate = read_wav(speech_wav)
    from_file = prepare_audio(speech_wav)
    from_memory = prepare_audio(torch.from_numpy(samples), rate)
    assert from_file.sample_rate == 16000
    assert from_file.samples.shape[0] == math.ceil(len(samples) * 16000 / rate)
    assert torch.allclose(from_file.samples, from_memory.samples, atol=1e-4)
    assert not is_silent(from_file)
    assert is_silent(prepare_audio(torch.zeros(16000), 16000))


# ---------------------------------------------------------------- bad input

def test_bad_audio_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty)
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(AudioError, match="could not decode|no audio stream"):
        load_audio(garbage)
    video_only = tmp_path / "video_only.mp4"
    with av.open(str(video_only), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(video_only)
    header_only = write_wav(tmp_path / "zero.wav", np.zeros(0), 16000)
    with pytest.raises(AudioError, match="zero length"):
        load_audio(header_only)


def test_bad_waveforms():
    with pytest.raises(AudioError, match="zero length"):
        from_array(torch.zeros(0), 16000)
    with pytest.raises(AudioError, match="zero length"):
        from_comfy_audio({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100})
    nans = torch.zeros(100)
    nans[17] = float("nan")
    with pytest.raises(AudioError, match="1 NaN"):
        from_array(nans, 16000)
    with pytest.raises(AudioError, match="sample rate"):
        from_array(torch.zeros(10), 0)
    with pytest.raises(AudioError, match="sample rate"):
        from_array(torch.zeros(10), 44100.5)
    with pytest.raises(AudioError, match="batch of 2"):
        from_array(torch.zeros(2, 1, 10), 16000)
    with pytest.raises(AudioError, match="'waveform'"):
        from_comfy_audio({"samples": torch.zeros(10)})
    with pytest.raises(AudioError, match="sample_rate"):
        prepare_audio(torch.zeros(10))
    with pytest.raises(AudioError, match="zero-length"):
        log_mel_spectrogram(torch.zeros(0))


# ---------------------------------------------------------------- frame alignment

LISTED_FPS = [23.976, 24, 25, 29.97, 30, 50, 60]


def test_no_drift_after_an_hour():
    aligner = FrameAligner(29.97, feature_rate=100)
    sample = round(90000 / 29.97 * 16000)
    assert aligner.sample_of_frame(90000, 16000) == sample
    assert abs(aligner.feature_of_frame(90000) * 160 - sample) <= 160
    tokens = FrameAligner(29.97, feature_rate=50)
    assert abs(tokens.feature_of_frame(90000) * 320 - sample) <= 320


@pytest.mark.parametrize("fps", LISTED_FPS + [12.5, 47.952, "30000/1001", 59.94])
def test_every_frame_of_an_hour_lands_on_its_instant(fps):
    aligner = FrameAligner(fps, feature_rate=100)
    exact_fps = as_fraction(fps)
    frames = aligner.num_frames(3600 * 16000, 16000)
    assert frames == math.floor(3600 * exact_fps + Fraction(1, 2))
    index = torch.arange(frames)
    features = aligner.feature_indices(index)
    starts = torch.tensor([aligner.sample_of_frame(i, 16000) for i in range(0, frames, 997)])
    # The feature's interval [k * 160, (k + 1) * 160) holds the exact instant, so the rounded sample is within a hop.
    assert torch.all((features[::997] * 160 - starts).abs() <= 160)
    exact = [Fraction(i) * 16000 / exact_fps for i in range(0, frames, 997)]
    assert all(k * 160 <= t < (k + 1) * 160 for k, t in zip(features[::997].tolist(), exact))
    assert torch.all(features[1:] >= features[:-1])
    assert features[-1] < 3600 * 100
    for i in (0, 1, frames // 3, frames - 1):
        assert features[i].item() == aligner.feature_of_frame(i) == math.floor(Fraction(i) * 100 / exact_fps)


def test_listed_frame_counts_for_one_hour():
    expected = {23.976: 86314, 24: 86400, 25: 90000, 29.97: 107892, 30: 108000, 50: 180000, 60: 216000}
    for fps, count in expected.items():
        assert FrameAligner(fps).num_frames(3600 * 16000, 16000) == count
        assert FrameAligner(fps).num_frames(3600 * 44100, 44100) == count


def test_window_gather_clamps_at_the_edges():
    aligner = FrameAligner(25, feature_rate=50)
    features = torch.arange(10, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    windows = aligner.gather(features, torch.tensor([0, 2, 4]), before=2, after=2)
    assert windows.shape == (3, 5, 3)
    assert windows[:, :, 0].tolist() == [[0, 0, 0, 1, 2], [2, 3, 4, 5, 6], [6, 7, 8, 9, 9]]


@pytest.mark.parametrize("bad", [0, -25, float("nan"), "fast", 5000])
def test_bad_frame_rates(bad):
    with pytest.raises(InputError, match="frame rate"):
        FrameAligner(bad)


def test_rms_is_measured_block_by_block():
    """mono_rms sums float64 squares of the mono mix one block at a time (an hour needs no float64 copy of the
    track); it equals the whole-track formula to float64 rounding (the summation order differs), for mono,
    stereo, a track shorter than a block and one that is not a whole number of blocks."""
    from omnisync_core.audio.track import AudioTrack
    from omnisync_core.audio.waveform import mono_rms

    generator = torch.Generator().manual_seed(0)
    for shape, block in (((1, 100_003), 4096), ((2, 50_000), 999), ((7,), 1 << 18), ((2, 3), 1)):
        samples = torch.rand(shape, generator=generator) * 2 - 1
        channels = samples if samples.ndim == 2 else samples[None]
        want = float(channels.double().mean(dim=0).pow(2).mean().sqrt())
        assert mono_rms(samples, block=block) == pytest.approx(want, rel=1e-12)
    track = AudioTrack.from_samples(torch.full((2, 10), 0.5), 16000)
    assert track.rms == pytest.approx(0.5, rel=1e-12) and mono_rms(torch.zeros(1, 0)) == 0.0


@pytest.mark.parametrize("rate, channels", [(22050, 1), (44100, 2), (16000, 2)])
def test_speech_ranges_equal_the_whole_tracks_resampling(tmp_path, rate, channels):
    """SpeechReader decodes a long range once and resamples it READ_BLOCK at a time (a 30 s window's resampling
    buffers are never held); any range, one far longer than a block included, equals the same samples of
    resampling the whole mono mix (each block reads whole filter periods with the filter's margin: the same taps
    on the same values, fp32 round-off only), with zeros past the end."""
    from omnisync_core.audio.track import READ_BLOCK as block
    from omnisync_core.audio.track import AudioTrack

    seconds = 11.3
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2.5 * t))
    data = np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono
    track = AudioTrack.from_file(write_wav(tmp_path / "speech.wav", data, rate))
    whole = resample(torch.from_numpy(read_wav(tmp_path / "speech.wav")[0]), rate, 16000)
    for start, stop in ((0, 3 * block + 17), (4321, 4321 + block), (99_000, 99_000 + 2 * block + 5),
                        (whole.shape[0] - 1000, whole.shape[0] + 500)):
        reader = track.speech()
        got = reader.read(start, stop)
        reader.close()
        want = torch.cat([whole[start:stop], torch.zeros(max(0, stop - whole.shape[0]))])
        assert got.shape == (stop - start,)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 2])
def test_file_cursor_reads_equal_the_decoded_track(tmp_path, channels):
    """The file cursor's reads as a window walk makes them (overlapping, forward, inside what it holds, past the
    end, and one behind it that re-decodes) are the decoded samples themselves: slices of the same decode, so
    bit-equal, with zeros outside the track."""
    from omnisync_core.audio.track import AudioTrack

    rate = 22050
    t = np.arange(int(7.7 * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t)
    track = AudioTrack.from_file(write_wav(tmp_path / "a.wav", np.stack([mono, -mono], 1) if channels == 2
                                           else mono, rate))
    whole = track.cursor().read(0, track.num_samples).clone()
    assert whole.shape == (channels, track.num_samples)
    n = track.num_samples
    cursor = track.cursor()
    for start, stop in ((-300, 5000), (4000, 40_000), (4100, 4200), (39_000, 90_000), (60_000, 61_000),
                        (n - 500, n + 700), (10, 20), (n + 5, n + 9)):
        got = cursor.read(start, stop)
        want = torch.zeros(channels, stop - start)
        a, b = max(start, 0), min(stop, n)
        if b > a:
            want[:, a - start:b - start] = whole[:, a:b]
        assert torch.equal(got, want), (start, stop)
    cursor.close()


def test_a_read_far_into_a_file_holds_only_its_range(tmp_path):
    """A read far ahead of the cursor, or behind it (a re-decode from the start), drops the decoded audio before
    the range block by block instead of gathering it: reading 1 s at the end of 5 min of 48 kHz stereo (110 MiB
    as float32) must not raise the peak memory by more than a few MiB. Run in a fresh process, whose peak RSS
    (VmHWM) is the measure."""
    import subprocess
    import sys

    rate, seconds = 48000, 300
    t = np.arange(seconds * rate) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    path = write_wav(tmp_path / "long.wav", np.stack([tone, 0.5 * tone], axis=1), rate)
    del t, tone
    child = f"""
import sys, torch
from omnisync_core.audio.track import AudioTrack
from omnisync_core.memory import peak_rss_mib
track = AudioTrack.from_file({str(path)!r})
cursor = track.cursor()
cursor.read(0, 1000)
before = peak_rss_mib()
end = cursor.read({(seconds - 1) * rate}, {seconds * rate})        # far ahead of the cursor
back = cursor.read({(seconds - 2) * rate}, {(seconds - 1) * rate})  # behind it: a re-decode from the start
after = peak_rss_mib()
print(after - before, cursor._buffer.shape[1], float(end.abs().max()), float(back.abs().max()))
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True,
                            cwd=str(Path(__file__).resolve().parents[1]))
    growth_mib, held, end_peak, back_peak = (float(v) for v in result.stdout.split())
    assert end_peak == pytest.approx(0.3, abs=0.01) and back_peak == pytest.approx(0.3, abs=0.01)
    assert held <= 2 * rate, f"the cursor holds {held / rate:.1f} s of audio after a 1 s read"
    assert growth_mib < 20, f"reading 1 s at the end of {seconds} s raised the peak by {growth_mib:.0f} MiB"
