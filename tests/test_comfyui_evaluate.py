"""OmniSync Evaluate in a real ComfyUI ($COMFYUI_PATH; skipped without it): frames + audio (+ source) in, metrics
text and a plot IMAGE out."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_helpers import InProcessComfy, requires_comfyui, temp_root

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def cf():
    return InProcessComfy(temp_root("omnisync-evaluate-"))


def face_and_speech(frames: int = 24, fps: int = 25, rate: int = 16000):
    """A synthetic face whose mouth opens four times a second, and a buzz that gets loud four times a second."""
    from omnisync_core.train import synthetic

    t = torch.arange(frames) / fps
    mouth = synthetic.MouthTrack((torch.sin(2 * math.pi * 4 * t) * 0.5 + 0.5) * 0.8, torch.full((frames,), 0.5))
    clip = synthetic.render_clip(synthetic.style_of(5), mouth, size=96, motion_seed=6)
    ts = torch.arange(int(frames / fps * rate)) / rate
    buzz = 0.3 * (torch.sin(2 * math.pi * 4 * ts) * 0.5 + 0.5) * torch.sign(torch.sin(2 * math.pi * 150 * ts))
    return clip.frames, {"waveform": buzz.view(1, 1, -1), "sample_rate": rate}


def test_evaluate_node_describes_itself_and_scores_frames(cf):
    cls = cf.node("OmniSyncEvaluate")
    schema = cls.GET_SCHEMA()
    assert schema.category == "OmniSync" and len(schema.description) > 40
    assert all(item.tooltip and len(item.tooltip) > 10 for item in schema.inputs)
    frames, audio = face_and_speech()
    text, plots = cf.run("OmniSyncEvaluate", images=frames, audio=audio, fps=25.0, source_images=frames.clone(),
                         window=9, overlap=2, syncnet_path="", arcface_path="")
    assert "PSNR outside mouth: 100 dB" in text and "success rule: follows-speech v1" in text
    assert "LSE-C / LSE-D need SyncNet weights" in text
    assert plots.ndim == 4 and plots.shape[0] == 1 and plots.shape[-1] == 3 and plots.shape[1] > 4 * 96
    assert 0 <= float(plots.min()) and float(plots.max()) <= 1
    alone, picture = cf.run("OmniSyncEvaluate", images=frames, audio=audio, fps=25.0)
    assert "PSNR outside mouth" not in alone and "no source frames given" in alone
    assert "mouth-audio r" in alone and picture.shape[1] < plots.shape[1]       # the plot without the strip


def test_missing_weights_are_one_clear_error(cf):
    frames, audio = face_and_speech(8)
    errors = cf.core("errors")
    with pytest.raises(errors.InputError, match="SyncNet weights not found"):
        cf.run("OmniSyncEvaluate", images=frames, audio=audio, fps=25.0, syncnet_path="/nope/syncnet.safetensors")
