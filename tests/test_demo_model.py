"""The bundled demo model: what it is, that the run command's example lip-syncs with it, and that it lip-syncs
faces it never saw to speech it never heard."""

import json
import shutil
import subprocess
import sys

import av
import pytest
import torch
from safetensors import safe_open

from omnisync_core.model.bundle import DEMO_MODEL, load_bundle
from omnisync_core.model.pixel_codec import PixelCodec

ROOT = DEMO_MODEL.parents[3]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEMO_MODEL)


def test_demo_model_is_a_small_documented_bundle(bundle):
    assert DEMO_MODEL.stat().st_size <= 25_000_000
    for name in ("omnisync_demo.md", "omnisync_demo.toml", "LICENSE-whisper"):
        assert (DEMO_MODEL.parent / name).is_file(), name
    with safe_open(str(DEMO_MODEL), framework="pt") as f:
        card = json.loads(f.metadata()["model_card"])
    assert "synthetic" in card["description"] and card["trained_steps"] > 0
    assert isinstance(bundle.vae, PixelCodec) and bundle.dit.config.prediction == "source-residual"
    assert bundle.dit.config.in_dim == bundle.vae.config.z_dim
    assert bundle.audio_encoder.config.d_model == bundle.dit.config.audio_dim == 384        # Whisper tiny
    d = bundle.defaults
    assert d["crop_size"] == 64 and d["window"] == 5 and d["overlap"] == 1
    assert all(p.dtype == torch.float32 for p in bundle.dit.parameters())


def _frames(path):
    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


def test_run_command_example_lip_syncs_with_the_demo_model(tmp_path):
    """The README's run command, cut to its first second of speech (the whole example runs in CI as it is)."""
    import wave

    short = tmp_path / "speech_1s.wav"
    with wave.open(str(EXAMPLES / "speech.wav")) as src, wave.open(str(short), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(src.getframerate()))
    out = tmp_path / "out.mp4"
    result = subprocess.run([sys.executable, "-m", "omnisync_core.cli", "lipsync", "--video",
                             str(EXAMPLES / "face.mp4"), "--audio", str(short), "--out", str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "25 frames" in result.stdout
    src, got = _frames(EXAMPLES / "face.mp4")[:25].float(), _frames(out).float()
    assert got.shape == src.shape
    diff = (got - src).abs().mean(-1)                       # [T, H, W]
    assert diff.amax() > 40                                 # the mouth was redrawn
    # edits stay inside the face crop: the top rows and the frame's left edge are the source, up to the noise of
    # a second H.264 generation
    assert diff[:, :40].mean() < 2 and diff[:, :, :30].mean() < 2
    assert diff[:, 150:200, 90:170].mean() > 3 * diff[:, :40].mean()      # the change is around the mouth


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_demo_model_follows_new_speech_on_held_out_faces(bundle):
    """benchmarks/demo_sync.py, cut to two clips and the default sampler: the generated mouth follows the new
    audio, the source mouth does not."""
    from omnisync_core.eval.sync import held_out_clips, score
    from omnisync_core.face.analyze import FaceAnalyzer
    from omnisync_core.generator import SamplerOptions
    from omnisync_core.train.synthetic import SENTENCES

    d = bundle.defaults
    clips = held_out_clips(2, bundle.audio_encoder, FaceAnalyzer(), SENTENCES[32:], crop_size=d["crop_size"])
    result = score(bundle.dit, bundle.vae, clips, SamplerOptions(steps=d["steps"], shift=d["shift"], tau=d["tau"]),
                   window=d["window"])
    assert result.corr_generated >= 0.5, result
    assert abs(result.corr_source) <= 0.3, result
    assert result.psnr_outside_mouth >= 25, result
