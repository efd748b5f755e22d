"""LatentSync audio tokens against upstream's Audio2Feature on a small random Whisper: the 5-tensor layer stack at
50 Hz, the 10-token window per video frame at 25 / 29.97 / 24 fps, and the whole-track windows (a track up to 30 s is
upstream exactly; past 30 s the first window is still upstream's and there is no seam)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omnisync_core.audio.features import plan_chunks
from omnisync_core.audio.latentsync_audio import (
    latentsync_audio_features, latentsync_frame_tokens, whisper_layer_stack,
)
from omnisync_core.errors import AudioError
from omnisync_core.model.loading import load_whisper

FIX = Path(__file__).parent / "fixtures" / "latentsync"
# fp32: our log-mel (torch STFT, Slaney filters computed here) vs upstream's (same STFT, librosa's stored filters)
# differ by ~1e-6 relative; through the conv stem and 4 blocks on features of magnitude ~1 that stays below 2e-4
ATOL = 2e-4


def signal(seconds: float) -> torch.Tensor:
    """The fixture's deterministic test signal (the same formula the generating script used)."""
    t = np.arange(int(seconds * 16000), dtype=np.float64) / 16000
    x = (0.3 * np.sin(2 * np.pi * (200 * t + 150 / (2 * np.pi * 0.7) * (1 - np.cos(2 * np.pi * 0.7 * t))))
         + 0.2 * np.sin(2 * np.pi * 1234 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
         + 0.05 * np.sin(2 * np.pi * 3100 * t + 1.0))
    return torch.from_numpy(x.astype(np.float32))


@pytest.fixture(scope="module")
def io():
    return load_file(FIX / "audio_tiny_io.safetensors")


@pytest.fixture(scope="module")
def encoder(io):
    sd = {k: v for k, v in io.items() if k.startswith("encoder.")}
    return load_whisper(sd, config=dict(n_mels=80, n_ctx=1500, d_model=32, n_heads=2, n_layers=4))


def test_short_track_features_equal_upstream(encoder, io):
    feats = latentsync_audio_features(signal(2.05), encoder)
    assert feats.shape == io["features_short"].shape == (102, 5, 32)
    torch.testing.assert_close(feats, io["features_short"], atol=ATOL, rtol=0)


def test_layer_stack_is_stem_then_blocks(encoder):
    mel = torch.randn(1, 80, 3000)
    stack = whisper_layer_stack(encoder, mel)
    final, hidden = encoder(mel, output_hidden_states=True)
    assert stack.shape == (1, 1500, 5, 32)
    for i, h in enumerate(hidden):
        assert torch.equal(stack[:, :, i + 1], h)
    assert torch.equal(encoder.blocks[0](stack[:, :, 0]), stack[:, :, 1])   # layer 0 is block 0's input


@pytest.mark.parametrize("name,fps", [("25", 25), ("2997", 29.97), ("24", 24)])
def test_frame_windows_match_upstream(io, name, fps):
    feats = io["features_short"]
    index = io[f"index_{name}"]
    tokens = latentsync_frame_tokens(feats, index.shape[0], fps)
    assert tokens.shape == (index.shape[0], 50, 32)
    # upstream's window of frame i, flattened time-major: [t0 L0..L4, t1 L0..L4, ...]
    assert torch.equal(tokens, feats[index].flatten(1, 2))
    if name == "25":
        assert torch.equal(tokens, io["chunks_25"])
    part = latentsync_frame_tokens(feats, 5, fps, first_frame=20)
    assert torch.equal(part, tokens[20:25])


def test_long_track_keeps_upstreams_first_window_and_has_no_seam(encoder, io):
    feats = latentsync_audio_features(signal(31.0), encoder)
    assert feats.shape[0] == int(io["long_tokens"])
    chunks = plan_chunks(feats.shape[0])
    assert chunks[0].start == 0 and chunks[0].keep_to == 1250 and chunks[1].start == 1000
    torch.testing.assert_close(feats[:50], io["long_head"], atol=ATOL, rtol=0)
    torch.testing.assert_close(feats[1200:1250], io["long_1200_1250"], atol=ATOL, rtol=0)
    # upstream restarts the encoder at token 1500 with no left context (the 30 s glitch); ours encodes those
    # tokens inside a window that started 500 tokens earlier, so they differ
    assert (feats[1500:1550] - io["long_1500_1550"]).abs().max() > 10 * ATOL


def test_rejects_bad_input(encoder):
    with pytest.raises(AudioError):
        latentsync_audio_features(torch.zeros(2, 1000), encoder)
    with pytest.raises(AudioError):
        latentsync_audio_features(torch.zeros(100), encoder)
    with pytest.raises(AudioError):
        latentsync_frame_tokens(torch.zeros(10, 384), 4, 25)
