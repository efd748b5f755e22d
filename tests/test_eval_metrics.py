"""The weight-free metrics of omnisync_core/eval on cases with a known answer: identical videos, a shifted audio
track, a frozen mouth, noise outside (and inside) the mouth, seams at window boundaries, a known landmark offset,
the success rule and the cost meter."""

import math
import shutil

import pytest
import torch

from omnisync_core.eval import envelope, fidelity, lmd, temporal
from omnisync_core.eval.cost import PeakMemory
from omnisync_core.eval.faces import LIPS, FaceSeries
from omnisync_core.eval.success import SuccessRule, is_success

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def face_series(t: int, width: float = 128.0, cx: float = 96.0, cy: float = 96.0) -> FaceSeries:
    """A still, made-up mesh: every point on a circle of the face width; the lips on a small ellipse around
    (cx, cy + 0.25 w)."""
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(468, 2, generator=g) * width * 0.8 + torch.tensor([cx - 0.4 * width, cy - 0.4 * width])
    pts[234], pts[454] = torch.tensor([cx - width / 2, cy]), torch.tensor([cx + width / 2, cy])
    a = torch.linspace(0, 2 * math.pi, len(LIPS) + 1)[:-1]
    pts[list(LIPS)] = torch.stack([cx + 0.2 * width * a.cos(), cy + 0.25 * width + 0.08 * width * a.sin()], -1)
    return FaceSeries.from_landmarks(pts.expand(t, -1, -1).clone())


def test_identical_videos_are_perfect():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (4, 192, 192, 3), dtype=torch.uint8, generator=g)
    faces = face_series(4)
    f = fidelity.fidelity(frames, frames.clone(), faces, faces)
    assert f.psnr_outside_mouth == f.psnr_face == fidelity.PSNR_CAP
    assert f.ssim_outside_mouth == pytest.approx(1.0, abs=1e-6) and f.ssim_face == pytest.approx(1.0, abs=1e-6)
    assert lmd.lmd(faces, faces) == 0.0
    assert temporal.mouth_jitter(faces) == 0.0                 # a still mesh does not shake


def _masks(faces: FaceSeries, hw, dilate=0.15):
    """The mouth mask fidelity() uses, whole-frame, for placing the noise."""
    lm = faces.landmarks[0]
    w = float((lm[234] - lm[454]).norm())
    return fidelity.mouth_discs(lm[list(LIPS)], torch.full((len(LIPS),), dilate * w), 0, 0, *hw)


def test_noise_outside_the_mouth_is_measured_and_noise_inside_is_not():
    t, hw = 3, (192, 192)
    faces = face_series(t)
    src = torch.full((t, *hw, 3), 0.5)
    mouth = _masks(faces, hw)
    g = torch.Generator().manual_seed(2)
    noise = (torch.rand(t, *hw, 3, generator=g) - 0.5) * 0.2             # uniform +-0.1, no clipping at 0.5
    inside = fidelity.fidelity(src + noise * mouth[None, ..., None], src, faces, faces)
    assert inside.psnr_outside_mouth == fidelity.PSNR_CAP
    assert inside.ssim_outside_mouth == pytest.approx(1.0, abs=1e-6)      # read 5 px clear of the mask
    assert inside.psnr_face < 40                   # the face crop includes the mouth
    out = fidelity.fidelity(src + noise * ~mouth[None, ..., None], src, faces, faces)
    # the exact PSNR of that noise over the region the metric reads: the face box grown by 30 %, minus the mouth
    lm = faces.landmarks[0]
    lo, hi = lm.amin(0), lm.amax(0)
    x0, y0 = (lo - 0.3 * (hi - lo)).floor().clamp(min=0).long().tolist()
    x1, y1 = (hi + 0.3 * (hi - lo)).ceil().long().tolist()
    region = torch.zeros(hw, dtype=torch.bool)
    region[y0:y1, x0:x1] = True
    region &= ~mouth
    mse = float(noise.square().sum(-1)[:, region].sum()) / (3 * t * int(region.sum()))
    assert out.psnr_outside_mouth == pytest.approx(-10 * math.log10(mse), abs=1e-3)
    assert out.psnr_outside_mouth == pytest.approx(10 * math.log10(300), abs=0.2)      # 1 / E[U(-.1,.1)^2]
    assert out.ssim_outside_mouth < 0.9


def test_known_landmark_offset_gives_lmd():
    truth = face_series(5, width=128.0)
    moved = FaceSeries.from_landmarks(truth.landmarks + torch.tensor([0.6, 0.8]))     # 1 px
    assert lmd.lmd(moved, truth) == pytest.approx(256 / 128, rel=1e-5)
    assert lmd.lmd(moved, truth, centered=True) == pytest.approx(0.0, abs=1e-4)
    gone = FaceSeries.from_landmarks(torch.full((5, 468, 2), float("nan")))
    assert math.isnan(lmd.lmd(gone, truth))


def test_jitter_of_a_shaking_mouth():
    """Lip points alternating +-a face widths each frame: the second difference is 4a, J = 400 a."""
    faces = face_series(10)
    lm = faces.landmarks.clone()
    a, w = 0.01, 128.0
    sign = torch.tensor([(-1.0) ** i for i in range(10)]).view(-1, 1)
    lm[:, list(LIPS), 0] += sign * a * w
    assert temporal.mouth_jitter(FaceSeries.from_landmarks(lm)) == pytest.approx(400 * a, rel=1e-4)
    lm[4] = float("nan")                                              # a lost face only removes its triples
    assert temporal.mouth_jitter(FaceSeries.from_landmarks(lm)) == pytest.approx(400 * a, rel=1e-4)


def test_seam_at_window_boundaries():
    """A picture that steps up by 10 levels at every window hand-over and is still elsewhere: S = 10."""
    t, window, overlap = 21, 5, 0
    marks = temporal.boundary_transitions(t, window, overlap)
    assert marks.nonzero()[:, 0].tolist() == [5, 10, 15, 20]
    level = torch.cumsum(marks.float() * 10, 0)
    frames = (40 + level).view(-1, 1, 1, 1).expand(t, 16, 16, 3).to(torch.uint8)
    boxes = torch.tensor([2.0, 2.0, 14.0, 14.0]).expand(t, 4)
    assert temporal.seam_error(frames, boxes, window, overlap) == pytest.approx(10.0)
    still = torch.full((t, 16, 16, 3), 40, dtype=torch.uint8)
    assert temporal.seam_error(still, boxes, window, overlap) == 0.0
    # with an overlap the hand-over spans the cross-faded frames and the first one after them
    # windows [0, 5), [3, 8), [6, 11), [9, 13)
    assert temporal.boundary_transitions(13, 5, 2).nonzero()[:, 0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_lag_of_a_shifted_envelope():
    g = torch.Generator().manual_seed(3)
    env = torch.nn.functional.conv1d(torch.rand(1, 1, 120, generator=g), torch.ones(1, 1, 5) / 5)[0, 0]
    mouth = 0.2 * env + 0.01                   # a mouth that follows the speech exactly
    assert envelope.av_sync(mouth, env).corr == pytest.approx(1.0)
    for s in (-2, 1, 3):
        # the audio track shifted by s frames: y_t = env_{t-s}; the mouth is then s frames early
        shifted = envelope.lagged(env, s)
        sync = envelope.av_sync(mouth, shifted, max_lag=4)
        assert sync.offset == -s and sync.best_corr == pytest.approx(1.0)
    frozen = envelope.av_sync(torch.full((120,), 0.05), env)
    assert math.isnan(frozen.corr) and math.isnan(frozen.best_corr)


def test_success_rule():
    rule = SuccessRule()
    assert is_success(1.0, 0.5, None, rule)
    assert not is_success(0.5, 0.9, None, rule)                   # the face was lost in half the frames
    assert not is_success(1.0, 0.1, None, rule)                   # the mouth does not follow the speech
    assert not is_success(1.0, float("nan"), None, rule)          # a frozen mouth has no correlation at all
    assert not is_success(1.0, 0.5, 0.4, rule) and is_success(1.0, 0.5, 4.0, rule)
    assert is_success(1.0, 0.5, 0.4, SuccessRule(min_lse_c=None))
    assert "follows-speech v1" in rule.describe()


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as cost:
        block = torch.ones(64 * 2 ** 20 // 4)                    # 64 MiB, touched
        block += 1
        import time

        time.sleep(0.1)
        del block
    start = PeakMemory()
    with start:
        pass
    assert cost.peak_ram_mib >= start.peak_ram_mib + 48 or cost.peak_ram_mib > 64
    assert cost.seconds >= 0.1 and cost.peak_vram_mib is None or torch.cuda.is_available()


@needs_espeak
def test_a_synthetic_face_on_its_own_video_and_frozen():
    """score_output end to end on a held-out synthetic face: its own video and speech score as perfect as the
    metrics can; the same face with its mouth frozen shut fails the success rule; the speech delayed by 2
    frames shows as a mouth 2 frames early."""
    from omnisync_core.eval.faces import analyze_frames
    from omnisync_core.eval.score import Reference, Scorers, score_output
    from omnisync_core.face.analyze import FaceAnalyzer
    from omnisync_core.train import synthetic

    torch.set_num_threads(1)
    analyzer = FaceAnalyzer()
    n = 48
    clip, wave = synthetic.make_example(synthetic.SENTENCES[34], 900_003, size=96)
    frames = (clip.frames[:n] * 255).round().to(torch.uint8)
    faces = analyze_frames(frames, analyzer)
    ref = Reference(frames, 25.0, wave.samples, faces, truth=frames, truth_faces=faces)
    same = score_output(frames, ref, Scorers(analyzer), windows=(5, 1))
    m = same.metrics
    assert m["psnr_outside_mouth"] == 100.0 and m["ssim_outside_mouth"] == pytest.approx(1.0, abs=1e-6)
    assert m["lmd"] == 0.0 and m["jitter_ratio"] == pytest.approx(1.0)
    assert m["face_rate"] == 1.0 and m["av_corr_best"] > 0.5 and m["revoice_corr"] > 0.8 and m["success"] == 1.0
    assert m["lse_c"] is None and m["csim"] is None                     # no weights given: skipped
    assert same.strip.shape == (4 * 96, 4 * 96, 3)

    shut = synthetic.MouthTrack(torch.zeros(n), torch.full((n,), 0.5))
    frozen = (synthetic.render_clip(synthetic.style_of(900_003), shut, size=96, motion_seed=900_004).frames * 255
              ).round().to(torch.uint8)
    f = score_output(frozen, ref, Scorers(analyzer)).metrics
    assert f["success"] == 0.0 and not (f["av_corr_best"] or 0) > 0.3
    assert f["lmd"] > 1.0 and f["psnr_outside_mouth"] > 30            # only the mouth differs

    late = Reference(frames, 25.0, torch.cat([torch.zeros(2 * 640), wave.samples]), faces)   # 2 frames later
    d = score_output(frames, late, Scorers(analyzer)).metrics
    assert d["av_offset"] == -2
