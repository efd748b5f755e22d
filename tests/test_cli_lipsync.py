"""`omnisync lipsync` end to end with a tiny random model, and its bad-input contract: one clear line on stderr,
a non-zero exit, and no file at --out."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_wav
from omnisync_core import cli
from omnisync_core.audio import FrameAligner, load_audio
from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.io import VideoWriter, probe_video
from omnisync_core.model.bundle import save_bundle
from omnisync_core.model.dit import OmniSyncDiT, get_config
from omnisync_core.model.vae import WanVAE, WanVAEConfig
from test_pipeline import moving_pattern, write_clip


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    whisper = WhisperEncoder(WhisperEncoderConfig(d_model=64, n_heads=2, n_layers=1))
    dit = OmniSyncDiT(get_config("tiny", audio_dim=64))
    dit.init_new_weights()
    for module in dit.modules():                       # a "trained-looking" model: audio and source matter
        if hasattr(module, "weight") and module.weight is not None and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.02)
    dit.set_text_context(torch.randn(1, dit.config.text_len, dit.config.text_dim))
    vae = WanVAE(WanVAEConfig.preset("tiny"))
    defaults = {"crop_size": 64, "window": 9, "overlap": 2, "steps": 4, "audio_before": 1, "audio_after": 1}
    return save_bundle(tmp_path_factory.mktemp("model") / "tiny.safetensors", dit, vae, whisper, defaults)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", moving_pattern(30, 96, 128), Fraction(25))


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name)


def test_lipsync_end_to_end_with_a_tiny_model(tmp_path, tiny_bundle, clip, short_speech_wav, capsys):
    speech_wav = short_speech_wav
    out = tmp_path / "out.mp4"
    code, stdout, err = run(["lipsync", "--video", str(clip), "--audio", str(speech_wav), "--out", str(out),
                             "--model", str(tiny_bundle), "--detector", "none", "--seed", "3"], capsys)
    assert code == 0, err
    info = probe_video(out)
    audio = load_audio(speech_wav)
    assert info.num_frames == FrameAligner(25).num_frames(audio.samples.shape[0], audio.sample_rate)
    assert info.has_audio and info.fps == 25
    assert "frames" in stdout and "per output second" in stdout and "peak RAM" in stdout
    assert leftovers(tmp_path) == []
    # Same seed, same output.
    again = tmp_path / "again.mp4"
    assert run(["lipsync", "--video", str(clip), "--audio", str(speech_wav), "--out", str(again), "--model",
                str(tiny_bundle), "--detector", "none", "--seed", "3"], capsys)[0] == 0
    from omnisync_core.io import VideoReader
    with VideoReader(out) as first, VideoReader(again) as second:
        assert torch.equal(first.read_all(), second.read_all())
    threads = torch.get_num_threads()
    try:
        assert run(["lipsync", "--video", str(clip), "--audio", str(speech_wav), "--out", str(tmp_path / "one.mp4"),
                    "--model", str(tiny_bundle), "--detector", "none", "--threads", "1"], capsys)[0] == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def _bad(tmp_path, capsys, video, audio, model, out=None, match=""):
    out = out or tmp_path / "out.mp4"
    code, _, err = run(["lipsync", "--video", str(video), "--audio", str(audio), "--out", str(out), "--model",
                        str(model), "--detector", "none"], capsys)
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("omnisync: error:"), err
    assert match.lower() in lines[0].lower(), lines[0]
    assert not Path(out).exists()
    assert leftovers(Path(out).parent if Path(out).parent.exists() else tmp_path) == []


def test_bad_inputs_fail_cleanly(tmp_path, tiny_bundle, clip, speech_wav, capsys):
    _bad(tmp_path, capsys, tmp_path / "missing.mp4", speech_wav, tiny_bundle, match="not found")
    code, _, err = run(["lipsync", "--video", str(clip), "--audio", str(speech_wav), "--out", str(tmp_path / "t.mp4"),
                        "--model", str(tiny_bundle), "--threads", "0"], capsys)
    assert code == 2 and "--threads must be at least 1" in err and not (tmp_path / "t.mp4").exists()
    _bad(tmp_path, capsys, clip, tmp_path / "missing.wav", tiny_bundle, match="not found")
    # A video with no video stream (an audio file given as --video).
    _bad(tmp_path, capsys, speech_wav, speech_wav, tiny_bundle, match="no video stream")
    # Audio with no audio stream (a silent-track-less video given as --audio).
    _bad(tmp_path, capsys, clip, clip, tiny_bundle, match="no audio stream")
    # Zero-length audio.
    empty_audio = write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    _bad(tmp_path, capsys, clip, empty_audio, tiny_bundle, match="zero length")
    # A corrupt mp4: the first half of a valid file.
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    _bad(tmp_path, capsys, corrupt, speech_wav, tiny_bundle, match="corrupt")
    # An output folder that does not exist, and one that is a file.
    _bad(tmp_path, capsys, clip, speech_wav, tiny_bundle, out=tmp_path / "nowhere" / "out.mp4", match="folder")
    # A model that is not there, and a pickle pretending to be one.
    _bad(tmp_path, capsys, clip, speech_wav, tmp_path / "none.safetensors", match="model not found")
    pickle_model = tmp_path / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, pickle_model)
    _bad(tmp_path, capsys, clip, speech_wav, pickle_model, match="safetensors")


def test_ctrl_c_leaves_nothing(tmp_path, tiny_bundle, clip, speech_wav, capsys, monkeypatch):
    def interrupt(self, stage, done, total):
        if stage == "lipsync":
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressBar, "__call__", interrupt)
    out = tmp_path / "out.mp4"
    code, _, err = run(["lipsync", "--video", str(clip), "--audio", str(speech_wav), "--out", str(out), "--model",
                        str(tiny_bundle), "--detector", "none"], capsys)
    assert code == 130 and "interrupted" in err
    assert not out.exists() and leftovers(tmp_path) == []
