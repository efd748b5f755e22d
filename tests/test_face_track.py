"""Face tracking on synthetic detection sequences: gaps, no face, several faces, cuts, jitter, shot changes."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnisync_core.errors import InputError
from omnisync_core.face.track import (CHEEK_POINTS, MOUTH_POINTS, FaceTrack, ShotChanges, build_track,
                                      detect_shot_changes, savgol)
from omnisync_core.face.types import FACE_POINTS, FaceDetections, FrameFaces, face_points

HW = (360, 640)


def keypoints(box):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    rel = [(0.3, 0.35), (0.7, 0.35), (0.5, 0.55), (0.5, 0.78), (0.0, 0.4), (1.0, 0.4)]
    return torch.tensor([[x0 + a * w, y0 + b * h] for a, b in rel])


def landmarks(box, gen):
    """468 points inside the box; the indices the tracker reads sit where a face has them."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    pts = torch.stack([x0 + w * (0.1 + 0.8 * torch.rand(468, generator=gen)),
                       y0 + h * (0.1 + 0.8 * torch.rand(468, generator=gen)), torch.zeros(468)], -1)
    named = {13: (0.5, 0.74), 14: (0.5, 0.8), 61: (0.38, 0.77), 291: (0.62, 0.77), 234: (0.02, 0.45),
             454: (0.98, 0.45), 33: (0.22, 0.36), 133: (0.4, 0.36), 263: (0.78, 0.36), 362: (0.6, 0.36)}
    for i, (a, b) in named.items():
        pts[i, :2] = torch.tensor([x0 + a * w, y0 + b * h])
    return pts


def frame_faces(boxes, with_landmarks=False, seed=0, shuffle=False):
    if not boxes:
        return FrameFaces.empty()
    gen = torch.Generator().manual_seed(seed)
    if shuffle:
        boxes = [boxes[i] for i in torch.randperm(len(boxes), generator=gen).tolist()]
    lm = torch.stack([landmarks(b, gen) for b in boxes]) if with_landmarks else None
    return FrameFaces(torch.tensor(boxes, dtype=torch.float32), torch.full((len(boxes),), 0.9),
                      torch.stack([keypoints(b) for b in boxes]), lm)


def square(cx, cy, size):
    return [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]


def centres(track):
    return (track.boxes[:, :2] + track.boxes[:, 2:]) / 2


def test_gap_is_interpolated_and_valid():
    T = 60
    truth = [square(100 + 4 * t, 150 + t, 100) for t in range(T)]
    seq = [frame_faces([] if 20 <= t < 30 else [truth[t]], True, t) for t in range(T)]
    track = build_track(seq, HW)
    assert track.valid.all() and not track.warnings
    assert not track.detected[20:30].any() and track.detected[:20].all() and track.detected[30:].all()
    assert torch.allclose(track.boxes, torch.tensor(truth), atol=1e-3)  # linear motion: SG and lerp are exact
    assert track.points is not None and track.points.shape == (T, len(FACE_POINTS), 2)
    # mouth and width from the named Face Mesh points, which are the means of their mesh indices
    assert torch.allclose(track.mouth_xy, track.point("mouth")) and torch.allclose(track.point("chin"),
                                                                                    track.points[:, -1])
    assert torch.allclose(track.face_width, (track.point("left_cheek") - track.point("right_cheek")).norm(dim=-1))
    mesh = torch.stack([landmarks(truth[t], torch.Generator().manual_seed(t)) for t in (0, 40)])
    assert torch.allclose(track.mouth_xy[[0, 40]], mesh[:, list(MOUTH_POINTS), :2].mean(1), atol=1e-2)
    assert torch.allclose(track.face_width[[0, 40]], (mesh[:, CHEEK_POINTS[1], :2] - mesh[:, CHEEK_POINTS[0], :2])
                          .norm(dim=-1), atol=1e-2)
    assert torch.allclose(track.mouth_xy[25], torch.tensor([100 + 4 * 25.0, 150 + 25 + 0.27 * 100]), atol=1e-3)


def test_long_gap_is_not_valid_and_ends_hold():
    T = 80
    seq = [frame_faces([square(300, 180, 100)] if 10 <= t < 20 or 60 <= t < 70 else []) for t in range(T)]
    with pytest.warns(UserWarning, match="pass through unchanged"):
        track = build_track(seq, HW, max_gap=25, max_hold=5)
    assert track.valid[10:20].all() and track.valid[60:70].all()
    assert not track.valid[20:60].any()  # 40-frame gap > max_gap
    assert track.valid[5:10].all() and not track.valid[:5].any()  # held 5 frames before the first sighting
    assert track.valid[70:75].all() and not track.valid[75:].any()
    assert torch.allclose(track.boxes[0], torch.tensor(square(300, 180, 100)))


@pytest.mark.parametrize("user_box", [None, (10.0, 20.0, 110.0, 140.0)])
def test_no_face_anywhere_uses_fallback_box(user_box):
    seq = [FrameFaces.empty() for _ in range(12)]
    with pytest.warns(UserWarning, match="No face was found"):
        track = build_track(seq, HW, box=user_box)
    expect = torch.tensor(user_box) if user_box else torch.tensor(square(320, 180, 0.5 * 360))
    assert torch.allclose(track.boxes, expect.expand(12, 4))
    assert track.valid.all() and not track.detected.any() and track.points is None
    assert len(track.warnings) == 1
    # mouth lies inside the box, below its centre
    assert ((track.mouth_xy[:, 1] > (expect[1] + expect[3]) / 2) & (track.mouth_xy[:, 1] < expect[3])).all()


def two_people(T=50):
    """A: large, starts far left, drifts to the centre while shrinking; B: small, starts near the centre, drifts
    right while growing. Per-frame rules would switch person mid-clip; identity tracking must not."""
    a = [square(120 + 3.4 * t, 180, 120 - t) for t in range(T)]
    b = [square(400 + 2.4 * t, 170, 70 + t) for t in range(T)]
    seq = [frame_faces([a[t], b[t]], shuffle=True, seed=t) for t in range(T)]
    return seq, torch.tensor(a), torch.tensor(b)


@pytest.mark.parametrize("kwargs,who", [({"select": "largest"}, "a"), ({"select": "central"}, "b"),
                                        ({"face_index": 0}, "a"), ({"face_index": 1}, "b")])
def test_two_faces_selection_and_identity(kwargs, who):
    seq, a, b = two_people()
    # sanity of the scenario: the per-frame winner of the rule changes during the clip
    assert (a[0, 2] - a[0, 0]) > (b[0, 2] - b[0, 0]) and (a[-1, 2] - a[-1, 0]) < (b[-1, 2] - b[-1, 0])
    assert abs((a[0, 0] + a[0, 2]) / 2 - 320) > abs((b[0, 0] + b[0, 2]) / 2 - 320)
    assert abs((a[-1, 0] + a[-1, 2]) / 2 - 320) < abs((b[-1, 0] + b[-1, 2]) / 2 - 320)
    track = build_track(seq, HW, **kwargs)
    target = a if who == "a" else b
    assert torch.allclose(track.boxes, target, atol=1e-3)
    assert track.detected.all() and (track.shot_ids == 0).all()


def test_face_index_out_of_range_warns_and_uses_rightmost():
    seq, a, b = two_people(10)
    with pytest.warns(UserWarning, match="Face index 5"):
        track = build_track(seq, HW, face_index=5)
    assert torch.allclose(track.boxes, b, atol=1e-3)


@pytest.mark.parametrize("given_cut", [True, False])
def test_hard_cut_reselects_without_smoothing_across(given_cut):
    T, cut = 60, 30
    gen = torch.Generator().manual_seed(1)
    a = [square(150, 180, 110) for _ in range(cut)]
    b = [square(470, 160, 150) for _ in range(T - cut)]
    noisy = [(torch.tensor(x) + torch.randn(4, generator=gen)).tolist() for x in a + b]
    # shot 2 also has a small background face on the left, where A was
    seq = [frame_faces([noisy[t]] + ([square(90, 260, 50)] if t >= cut else []), seed=t) for t in range(T)]
    track = build_track(seq, HW, shot_changes=[cut] if given_cut else None)
    c = centres(track)
    assert torch.allclose(c[: cut], torch.tensor([150.0, 180.0]).expand(cut, 2), atol=2.0)
    assert torch.allclose(c[cut:], torch.tensor([470.0, 160.0]).expand(T - cut, 2), atol=2.0)
    assert (c[cut - 1] - c[cut]).norm() > 300  # jumps within one frame
    assert (track.shot_ids[:cut] == 0).all() and (track.shot_ids[cut:] == 1).all()
    assert track.valid.all()


def test_smoothing_reduces_jitter_on_a_static_face():
    T = 120
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor(square(320, 180, 120))
    raw = truth + 3.0 * torch.randn(T, 4, generator=gen)
    seq = [frame_faces([raw[t].tolist()], True, t) for t in range(T)]
    track = build_track(seq, HW)
    raw_jitter = raw.std(0).mean()
    smooth_jitter = track.boxes.std(0).mean()
    assert smooth_jitter * 2 <= raw_jitter, (float(raw_jitter), float(smooth_jitter))
    assert (track.boxes - truth).abs().mean() < (raw - truth).abs().mean() / 2
    no_smooth = build_track(seq, HW, smoothing=1, landmark_smoothing=1)
    assert torch.allclose(no_smooth.boxes, raw)


def test_savgol_matches_scipy_and_keeps_quadratics():
    from scipy.signal import savgol_filter

    x = torch.randn(50, 3, dtype=torch.float64)
    for w in (5, 15, 51):
        ours = savgol(x, w).numpy()
        ref = savgol_filter(x.numpy(), min(w, 49), 2, axis=0, mode="interp")
        assert np.abs(ours - ref).max() < 1e-9
    t = torch.arange(30, dtype=torch.float64)[:, None]
    q = 0.3 * t ** 2 - 2 * t + 5
    assert torch.allclose(savgol(q, 15), q)  # zero lag: motion of degree <= 2 passes unchanged


def test_min_score_and_window_save_load(tmp_path):
    T = 20
    seq = []
    for t in range(T):
        ff = frame_faces([square(200 + t, 180, 100), square(500, 180, 200)], True, t)
        ff.scores[1] = 0.2  # a large but weak detection is ignored
        seq.append(ff)
    track = build_track(seq, HW)
    assert torch.allclose(centres(track)[:, 0], 200 + torch.arange(T).float(), atol=1e-3)
    win = track.window(5, 12)
    assert len(win) == 7 and torch.equal(win.boxes, track.boxes[5:12]) and torch.equal(win.points,
                                                                                       track[5:12].points)
    path = str(tmp_path / "track.safetensors")
    track.save(path)
    back = FaceTrack.load(path)
    for name in ("boxes", "points", "valid", "detected", "shot_ids", "mouth_xy", "face_width", "eyes"):
        assert torch.equal(getattr(back, name), getattr(track, name)), name
    assert back.frame_hw == track.frame_hw and back.warnings == track.warnings
    track.save(path, with_points=False)
    assert FaceTrack.load(path).points is None
    assert track.to("cpu").boxes.device.type == "cpu"


def test_keypoint_mouth_without_landmarks_and_bad_input():
    seq = [frame_faces([square(300, 200, 100)]) for _ in range(5)]
    track = build_track(seq, HW)
    assert track.points is None
    assert torch.allclose(track.mouth_xy, torch.tensor([300.0, 150 + 78.0]).expand(5, 2))
    assert torch.allclose(track.face_width, torch.full((5,), 100.0))
    with pytest.raises(InputError):
        build_track([], HW)
    with pytest.raises(InputError):
        build_track(seq, HW, select="biggest")
    with pytest.raises(InputError):
        build_track(seq, HW, box=(10, 10, 5, 50))


# ------------------------------------------------------------------------------------------------ shot changes

def _pan(img, T, step, out_hw=(72, 128), start=0):
    x = torch.from_numpy(np.array(img)).float() / 255
    x = F.interpolate(x.permute(2, 0, 1)[None], size=(180, 320), mode="area")[0].permute(1, 2, 0)
    h, w = out_hw
    return torch.stack([x[20:20 + h, start + step * t: start + step * t + w] for t in range(T)])


def test_detect_shot_changes_on_a_cut_between_two_pans():
    import matplotlib.cbook
    import skimage.data

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        import matplotlib.image

        hopper = matplotlib.image.imread(f, format="jpg")
    shot_a = _pan(skimage.data.astronaut(), 25, 3)
    shot_b = _pan(hopper[..., :3], 20, 4)
    clip = torch.cat([shot_a, shot_b])
    assert detect_shot_changes(clip) == [25]
    assert detect_shot_changes((clip * 255).round().to(torch.uint8)) == [25]
    assert detect_shot_changes(shot_a) == []  # steady pan: no cut
    flash = shot_a.clone()
    flash[10] = 1.0  # a single white frame counts once, not twice
    assert len(detect_shot_changes(flash)) <= 1


def test_landmark_indices_on_a_real_face_mesh():
    """MediaPipe (test-only oracle) meshes the astronaut; our index choices must land on her mouth and cheeks."""
    mp = pytest.importorskip("mediapipe")
    import skimage.data

    img = np.array(skimage.data.astronaut())
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        res = mesh.process(img)
    lm = torch.tensor([[p.x * 512, p.y * 512, p.z * 512] for p in res.multi_face_landmarks[0].landmark])
    box = torch.cat([lm[:, :2].min(0).values, lm[:, :2].max(0).values])
    ff = FrameFaces(box[None], torch.ones(1), keypoints(box.tolist())[None], lm[None])
    track = build_track([ff] * 3, (512, 512))
    mouth, width = track.mouth_xy[0], track.face_width[0]
    # BlazeFace's mouth keypoint for this photo (mediapipe face_detection short range): (219.8, 148.6)
    assert (mouth - torch.tensor([219.8, 148.6])).norm() < 0.1 * width
    assert lm[1, 1] < mouth[1] < lm[152, 1]  # below the nose tip, above the chin
    assert 0.85 < width / (box[2] - box[0]) <= 1.0  # cheek to cheek spans nearly the whole mesh
    eyes = track.eyes[0]
    assert eyes[0, 0] < mouth[0] < eyes[1, 0] and (eyes[:, 1] < mouth[1]).all()


def test_shot_signatures_can_be_computed_in_chunks():
    from omnisync_core.face.track import frame_signatures, shot_changes_from_signatures

    clip = torch.rand(1, 48, 64, 3).expand(30, -1, -1, -1).clone()
    clip[12:] = torch.rand(48, 64, 3) * 0.5
    whole = frame_signatures(clip)
    parts = torch.cat([frame_signatures(clip[:7]), frame_signatures(clip[7:])])
    assert torch.allclose(whole, parts)
    assert shot_changes_from_signatures(parts) == detect_shot_changes(clip) == [12]
    with pytest.raises(InputError):
        detect_shot_changes(torch.rand(4, 8, 8))


def test_detections_and_track_keep_a_few_bytes_per_frame():
    """What a clip keeps per frame is its faces' boxes, keypoints and named points, not the 468-point mesh: the
    state of an hour at 60 fps stays in the tens of MB (216,000 frames)."""
    T = 300
    seq = [frame_faces([square(200 + t * 0.5, 180, 100)], True, t) for t in range(T)]
    detections = FaceDetections().extend(seq)
    assert len(detections) == T and detections.num_faces == T
    per_frame = detections.nbytes() / T
    assert per_frame < 400, per_frame                       # a mesh alone is 468 x 3 x 4 = 5616 bytes
    again = detections.frame(17)
    assert torch.equal(again.boxes, seq[17].boxes) and torch.allclose(again.points, face_points(seq[17].landmarks))
    track = build_track(detections, HW)
    assert track.nbytes() / T < 300, track.nbytes() / T
    assert torch.allclose(track.boxes, build_track(seq, HW).boxes)   # a list of FrameFaces tracks the same
    assert len(detections.frame(5, min_score=0.95)) == 0      # scores are 0.9


def test_shot_changes_stream_chunk_by_chunk():
    clip = torch.rand(1, 48, 64, 3).expand(40, -1, -1, -1).clone()
    clip[23:] = torch.rand(48, 64, 3) * 0.5
    shots = ShotChanges()
    for start in range(0, 40, 6):                              # a cut inside a chunk and chunk edges elsewhere
        shots.add(clip[start:start + 6])
    assert shots.cuts() == detect_shot_changes(clip) == [23]
    assert sum(s.numel() for s in shots._scores) == 39        # one score per frame pair, nothing else per frame
