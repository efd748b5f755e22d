"""Length policies, window planning and the streaming cross-fade."""

from __future__ import annotations

import pytest
import torch

from omnisync_core.errors import InputError
from omnisync_core.timeline import (CrossFader, LENGTH_POLICIES, plan_timeline, plan_windows, source_frame_index,
                                    valid_window_length)


def test_default_policy_follows_the_audio():
    longer_audio = plan_timeline(num_video_frames=50, num_audio_frames=120)
    assert (longer_audio.num_frames, longer_audio.audio_frames) == (120, 120)
    shorter_audio = plan_timeline(num_video_frames=50, num_audio_frames=30)
    assert (shorter_audio.num_frames, shorter_audio.audio_frames) == (30, 30)
    assert plan_timeline(50, 30, "trim").num_frames == 30 and plan_timeline(50, 80, "trim").num_frames == 50
    video = plan_timeline(50, 30, "video")
    assert (video.num_frames, video.audio_frames) == (50, 30)


def test_source_frames_under_each_policy():
    frames = torch.arange(12)
    assert source_frame_index(frames, 4, "pingpong").tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert source_frame_index(frames, 4, "loop").tolist() == [0, 1, 2, 3] * 3
    assert source_frame_index(frames, 4, "hold").tolist() == [0, 1, 2, 3] + [3] * 8
    assert source_frame_index(frames, 1, "pingpong").tolist() == [0] * 12
    # Within the source every policy is the identity.
    for policy in LENGTH_POLICIES:
        assert source_frame_index(torch.arange(4), 4, policy).tolist() == [0, 1, 2, 3]


def test_bad_timelines():
    with pytest.raises(InputError, match="length policy"):
        plan_timeline(10, 10, "stretch")
    with pytest.raises(InputError, match="no frames"):
        plan_timeline(0, 10)
    with pytest.raises(InputError, match="shorter than one video frame"):
        plan_timeline(10, 0)


@pytest.mark.parametrize("num_frames,window,overlap", [(1, 81, 8), (81, 81, 8), (82, 81, 8), (300, 81, 8),
                                                       (1000, 17, 8), (40, 9, 0), (161, 21, 10)])
def test_windows_cover_every_frame(num_frames, window, overlap):
    windows = plan_windows(num_frames, window, overlap)
    assert windows[0].start == 0 and windows[-1].stop == num_frames
    for a, b in zip(windows, windows[1:]):
        assert len(a) == window and b.start == a.stop - overlap
    for w in windows:
        assert 0 < len(w) <= window and valid_window_length(len(w)) % 4 == 1


def test_bad_windows():
    with pytest.raises(InputError, match="4k \\+ 1"):
        plan_windows(100, 80, 8)
    with pytest.raises(InputError, match="overlap"):
        plan_windows(100, 21, 11)


@pytest.mark.parametrize("num_frames,window,overlap", [(300, 81, 8), (90, 21, 10), (23, 9, 4), (5, 9, 2)])
def test_cross_fade_of_identical_outputs_is_exact_and_streams(num_frames, window, overlap):
    video = torch.rand(num_frames, 4, 3)
    windows = plan_windows(num_frames, window, overlap)
    fader, out, next_index = CrossFader(windows), [], 0
    for w in windows:
        start, finished = fader.add(video[w.start:w.stop].clone())
        assert start == next_index
        assert finished.shape[0] <= window          # never more than one window handed back
        out.append(finished)
        next_index += finished.shape[0]
    assert torch.allclose(torch.cat(out), video, atol=1e-6)


def test_cross_fade_ramps_between_windows():
    windows = plan_windows(13, 9, 4)                 # [0, 9) and [5, 13): overlap 5..8
    fader = CrossFader(windows)
    _, first = fader.add(torch.zeros(9, 1))
    _, rest = fader.add(torch.ones(8, 1))
    blended = torch.cat([first, rest])[:, 0]
    assert blended[:5].tolist() == [0.0] * 5 and blended[9:].tolist() == [1.0] * 4
    assert torch.allclose(blended[5:9], torch.tensor([0.2, 0.4, 0.6, 0.8]))
    with pytest.raises(InputError, match="more window outputs"):
        fader.add(torch.ones(8, 1))
