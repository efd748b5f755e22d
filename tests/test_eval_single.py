"""evaluate_frames (what the OmniSync Evaluate node calls) on frames in memory, and its plain chart."""

import math

import torch

from omnisync_core.eval.single import evaluate_frames, line_chart
from omnisync_core.train import synthetic


def test_frames_with_their_own_source_and_without():
    torch.set_num_threads(1)
    n, fps, rate = 24, 25, 16000
    t = torch.arange(n) / fps
    mouth = synthetic.MouthTrack((torch.sin(2 * math.pi * 4 * t) * 0.5 + 0.5) * 0.8, torch.full((n,), 0.5))
    frames = synthetic.render_clip(synthetic.style_of(5), mouth, size=96, motion_seed=6).frames
    ts = torch.arange(int(n / fps * rate)) / rate
    buzz = 0.3 * (torch.sin(2 * math.pi * 4 * ts) * 0.5 + 0.5) * torch.sign(torch.sin(2 * math.pi * 150 * ts))
    full = evaluate_frames(frames, buzz.expand(2, -1), rate, fps, source=frames, windows=(9, 2))
    m = full.metrics
    assert m["psnr_outside_mouth"] == 100.0 and m["face_rate"] == 1.0 and m["av_corr_best"] > 0.5
    assert "PSNR outside mouth: 100 dB" in full.text and "strip: rows source" in full.text
    assert full.image.dtype == torch.uint8 and full.image.shape[0] > 3 * 96 and full.image.shape[-1] == 3
    alone = evaluate_frames(frames, buzz, rate, fps)
    assert alone.metrics["psnr_outside_mouth"] is None and alone.metrics["av_corr"] == m["av_corr"]
    assert any("no source" in note for note in alone.notes)


def test_line_chart_draws_where_the_values_say():
    img = line_chart([(torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0]), (255, 0, 0))], area=torch.full((5,), 0.5),
                     width=100, height=60)
    red = (img[..., 0] == 255) & (img[..., 1] == 0)
    rows = red.nonzero()[:, 0].unique().tolist()
    assert rows == [8, 9]                              # the peak (1.0) at 95 % of the plot height, 2 px thick
    cols = red.nonzero()[:, 1]
    assert int(cols.min()) == 6 and int(cols.max()) >= 93 and not bool(red[:, 40:60].any())     # NaN: a gap
    grey = (img[..., 0] == 215)
    assert bool(grey[40, 50]) and not bool(grey[20, 50])     # the area fills the lower half
