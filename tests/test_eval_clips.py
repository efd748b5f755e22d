"""The held-out synthetic clips the sample manifest makes on first use: the same problems as
omnisync_core/eval/sync.py, a source speaking its own sentence and a ground truth that differs from it only around
the mouth."""

import shutil

import pytest
import torch

from omnisync_core.eval.clips import make_synthetic, read_frames, read_speech
from omnisync_core.eval.manifest import held_out_specs

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def test_held_out_specs_draw_what_sync_py_draws():
    from omnisync_core.train import synthetic

    specs = held_out_specs(3, size=64)
    # eval/sync.py's held_out_clips draws the same way: sentences from SENTENCES[32:], voices, seeds 900000 + i
    g = torch.Generator().manual_seed(900_000)
    for i, spec in enumerate(specs):
        a, b = torch.randperm(8, generator=g)[:2].tolist()
        va, vb = (synthetic.VOICES[int(j)] for j in torch.randint(len(synthetic.VOICES), (2,), generator=g))
        s = spec.synthetic
        assert (s["seed"], s["sentence"], s["driving_sentence"], s["voice"], s["driving_voice"]) == (
            900_000 + i, synthetic.SENTENCES[32 + a], synthetic.SENTENCES[32 + b], va, vb)
    assert [s.name for s in held_out_specs(2, start=1)] == ["held-out-1", "held-out-2"]


def test_a_synthetic_clip_has_source_driving_speech_and_ground_truth(tmp_path):
    torch.set_num_threads(1)
    spec = held_out_specs(1, size=64)[0].synthetic
    files = make_synthetic(spec, tmp_path / "clip")
    source, fps = read_frames(files.video)
    truth, _ = read_frames(files.ground_truth)
    speech = read_speech(files.audio)
    assert fps == 25 and source.shape[1:] == truth.shape[1:] == (64, 64, 3)
    assert truth.shape[0] == min(source.shape[0], round(speech.numel() / 640))
    n = truth.shape[0]
    diff = (source[:n].float() - truth.float()).abs().mean(-1)              # [T, H, W]
    # same face, motion and blinks: only the mouth region differs (H.264 noise elsewhere)
    assert diff[:, :28].mean() < 1.5 and diff[:, 36:56, 16:48].mean() > 4 * diff[:, :28].mean()
    again = make_synthetic(spec, tmp_path / "clip")                          # made once
    assert again.video.stat().st_mtime_ns == files.video.stat().st_mtime_ns
