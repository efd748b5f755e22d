"""The PyTorch BlazeFace / Face Mesh port against MediaPipe 0.10.21 (test-only oracle) on real faces."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from omnisync_core.errors import InputError
from omnisync_core.face.blazeface import WEIGHTS_DIR, TFLiteNet, box_iou, ssd_anchors, weighted_nms
from omnisync_core.face.detect import (FaceDetector, FaceLandmarker, detect_faces, roi_from_detection,
                                       roi_from_landmarks, warp_frames)

mp = pytest.importorskip("mediapipe")
cv2 = pytest.importorskip("cv2")


# ------------------------------------------------------------------------------------------------ images


def _astronaut():
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def _grace_hopper():
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB")).copy()


def _rotate(img, deg):
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR)


def _variants():
    a = _astronaut()
    return {
        "astronaut": a,
        "scale0.5": cv2.resize(a, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
        "scale1.5": cv2.resize(a, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR),
        "pad": np.pad(a, ((40, 0), (150, 10), (0, 0))),
        "crop": np.ascontiguousarray(a[30:400, 60:380]),
        "rot30": _rotate(a, 30),
        "rot-20": _rotate(a, -20),
        "mirror": np.ascontiguousarray(a[:, ::-1]),
        "dark": (a * 0.5).astype(np.uint8),
        "grace_hopper": _grace_hopper(),
    }


VARIANTS = _variants()


@pytest.fixture(scope="module")
def models():
    return {"short": FaceDetector.load("short"), "full": FaceDetector.load("full"), "mesh": FaceLandmarker.load()}


def _mp_detections(fd, img):
    res = fd.process(img)
    h, w = img.shape[:2]
    boxes = []
    for d in res.detections or []:
        b = d.location_data.relative_bounding_box
        boxes.append([b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h])
    return torch.tensor(boxes).reshape(-1, 4) + 0.5  # MediaPipe puts pixel centres at integers, we at + 0.5


# ------------------------------------------------------------------------------------------------ oracle tests


@pytest.mark.parametrize("model", ["short", "full"])
def test_detector_matches_mediapipe(models, model):
    checked = 0
    fd = mp.solutions.face_detection.FaceDetection(model_selection=int(model == "full"), min_detection_confidence=0.5)
    for name, img in VARIANTS.items():
        ref = _mp_detections(fd, img)
        ours = models[model].detect(torch.from_numpy(img)[None])[0]
        assert len(ours) == len(ref), f"{model}/{name}: {len(ours)} faces, mediapipe {len(ref)}"
        if len(ref):
            iou = box_iou(ours.boxes, ref).diagonal()
            print(f"{model:5s} {name:12s} IoU {iou.min().item():.4f}")
            assert (iou >= 0.9).all(), f"{model}/{name}: IoU {iou.tolist()}"
            checked += 1
    fd.close()
    assert checked >= len(VARIANTS) - 2  # at most the smallest variants may be missed by both


def test_landmarks_match_mediapipe(models):
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=False, max_num_faces=1) as fm:
        for name, img in VARIANTS.items():
            res = fm.process(img)
            faces = detect_faces(torch.from_numpy(img)[None], models["short"], models["mesh"], max_faces=1)[0]
            if not res.multi_face_landmarks:
                assert len(faces) == 0 or faces.scores[0] < 0.6, name
                continue
            h, w = img.shape[:2]
            ref = torch.tensor([[p.x * w + 0.5, p.y * h + 0.5, p.z * w] for p in res.multi_face_landmarks[0].landmark])
            ours = faces.landmarks[0]
            width = (ref[:, 0].max() - ref[:, 0].min()).item()
            err = (ours[:, :2] - ref[:, :2]).norm(dim=-1).mean().item() / width
            z_err = (ours[:, 2] - ref[:, 2]).abs().mean().item() / width
            print(f"mesh  {name:12s} face width {width:6.1f}px  mean xy err {100 * err:.3f}%  z err {100 * z_err:.3f}%")
            assert err <= 0.01 and z_err <= 0.01, name


def test_networks_match_tflite_interpreter():
    """Tensor-level: every converted network against the TFLite interpreter on the same input."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    root = __import__("pathlib").Path(mp.__file__).parent / "modules"
    cases = {"blazeface_short": "face_detection/face_detection_short_range.tflite",
             "blazeface_full": "face_detection/face_detection_full_range_sparse.tflite",
             "facemesh": "face_landmark/face_landmark.tflite"}
    for name, rel in cases.items():
        it = litert.Interpreter(model_path=str(root / rel))
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        x = np.random.default_rng(0).uniform(-1, 1, inp["shape"]).astype(np.float32)
        it.set_tensor(inp["index"], x)
        it.invoke()
        net = TFLiteNet.load(WEIGHTS_DIR / f"{name}.safetensors")
        with torch.inference_mode():  # channels-last, as the detectors feed it
            outs = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        for det, out in zip(it.get_output_details(), outs):
            ref = torch.from_numpy(it.get_tensor(det["index"]))
            out = (out.permute(0, 2, 3, 1) if out.ndim == 4 else out).reshape(ref.shape)
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), f"{name}/{det['name']}"


def test_converter_reproduces_shipped_weights():
    import importlib.util
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(__file__).resolve().parents[1] / "tools" / "convert_mediapipe.py"
    spec = importlib.util.spec_from_file_location("convert_mediapipe", path)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    root = Path(mp.__file__).parent / "modules"
    for name, rel in conv.MODELS.items():
        weights, graph = conv.convert(root / rel)
        with safe_open(str(WEIGHTS_DIR / f"{name}.safetensors"), framework="pt") as f:
            assert json.loads(f.metadata()["graph"]) == graph, name
            assert sorted(f.keys()) == sorted(weights), name
            for k, v in weights.items():
                assert torch.equal(f.get_tensor(k), v), (name, k)


# ------------------------------------------------------------------------------------------------ behaviour


def test_batch_float_and_no_face(models):
    a = VARIANTS["astronaut"]
    blank = np.full_like(a, 127)
    ramp = np.broadcast_to(np.linspace(0, 255, a.shape[1], dtype=np.uint8)[None, :, None], a.shape)
    batch = torch.from_numpy(np.stack([a, blank, VARIANTS["mirror"], ramp]))
    faces = detect_faces(batch, models["short"], models["mesh"])
    assert [len(f) for f in faces] == [1, 0, 1, 0]
    assert faces[1].boxes.shape == (0, 4) and faces[1].keypoints.shape == (0, 6, 2)
    assert faces[1].landmarks.shape == (0, 468, 3)
    none = detect_faces(batch[1:2], models["short"], models["mesh"])[0]
    assert len(none) == 0 and none.landmarks.shape == (0, 468, 3)
    single = detect_faces(batch[:1], models["short"], models["mesh"])[0]
    torch.testing.assert_close(faces[0].boxes, single.boxes)
    torch.testing.assert_close(faces[0].landmarks, single.landmarks)
    # ComfyUI IMAGE: float 0..1 gives the same faces (only uint8 rounding differs)
    flt = models["short"].detect(batch.float() / 255)
    assert (box_iou(flt[0].boxes, faces[0].boxes).diagonal() > 0.99).all()
    assert models["short"].detect(batch[:0]) == []
    with pytest.raises(InputError):
        models["short"].detect(batch[..., :2])


def test_rois_and_tracking(models):
    def rois(name):
        f = detect_faces(torch.from_numpy(VARIANTS[name])[None], models["short"], models["mesh"])[0]
        return roi_from_detection(f.boxes, f.keypoints)[0], roi_from_landmarks(f.landmarks)[0]

    upright = rois("astronaut")
    for name, turn in [("rot30", -30), ("rot-20", 20)]:  # a counter-clockwise image turn is a negative rotation
        from_det, from_lm = (np.degrees((r - u)[3].item()) for r, u in zip(rois(name), upright))
        assert abs(from_det - turn) < 10 and abs(from_lm - turn) < 2, (name, from_det, from_lm)
    img = torch.from_numpy(VARIANTS["rot30"])[None]
    roi = rois("rot30")[0]
    lm, presence = models["mesh"].landmarks(img, roi[None])
    assert presence.item() > 0.9
    # tracking: an ROI from the landmarks gives (nearly) the same landmarks again
    lm2, presence2 = models["mesh"].landmarks(img, roi_from_landmarks(lm))
    width = (lm[0, :, 0].max() - lm[0, :, 0].min()).item()
    assert presence2.item() > 0.9
    assert (lm2 - lm)[0, :, :2].norm(dim=-1).mean() < 0.02 * width
    # an ROI on empty background gives a low face presence score
    _, p_bg = models["mesh"].landmarks(img, torch.tensor([[40.0, 460.0, 80.0, 0.0]]))
    assert p_bg.item() < 0.5


@pytest.mark.parametrize("zero_border", [True, False])
def test_warp_matches_opencv(zero_border):
    img = VARIANTS["grace_hopper"]
    m = np.array([[1.9, -0.9, -60.3], [0.9, 1.9, 40.7]], np.float32)  # output pixel -> source, partly outside
    border = cv2.BORDER_CONSTANT if zero_border else cv2.BORDER_REPLICATE
    ref = cv2.warpAffine(img, m, (192, 192), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border)
    frames = torch.from_numpy(np.stack([img[::-1], img]))  # sample from frame 1 via index
    ours = warp_frames(frames, torch.from_numpy(m)[None], 192, zero_border, index=torch.tensor([1]))[0]
    diff = (ours.permute(1, 2, 0) - torch.from_numpy(ref).float()).abs()
    assert diff.mean() < 0.2 and diff.max() <= 4  # OpenCV quantises positions to 1/32 px


def test_anchors_and_nms():
    a = ssd_anchors(128, (8, 16, 16, 16), 1.0)
    assert a.shape == (896, 2) and torch.allclose(a[0], torch.tensor([0.5 / 16, 0.5 / 16]))
    assert torch.equal(a[0], a[1]) and torch.allclose(a[512], torch.tensor([1 / 16, 1 / 16]))
    assert ssd_anchors(192, (4,), 0.0).shape == (2304, 2)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60]])
    kps = boxes[:, None, :2].expand(3, 6, 2)
    b, k, s = weighted_nms(boxes, kps, torch.tensor([0.6, 0.9, 0.7]))
    torch.testing.assert_close(s, torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(b[0], torch.tensor([(0.6 * 0 + 0.9 * 1) / 1.5, 0, (0.6 * 10 + 0.9 * 11) / 1.5, 10]))
    torch.testing.assert_close(k[1, 0], torch.tensor([50.0, 50.0]))


def test_speed_1080p(models):
    """Prints ms/frame for a batch of 8 full-HD frames: wall time with the default threads, and CPU time on one
    thread (robust on a shared machine). No assertion on time."""
    canvas = np.zeros((1080, 1920, 3), np.uint8)  # a talking-head framing: face about 330 px wide
    canvas[:, 420:1500] = cv2.resize(VARIANTS["astronaut"][20:320, 80:380], (1080, 1080))
    frames = torch.from_numpy(np.stack([canvas] * 8))
    det, mesh = models["short"], models["mesh"]
    faces = det.detect(frames)
    assert all(len(f) == 1 for f in faces)
    rois = torch.cat([roi_from_detection(f.boxes, f.keypoints) for f in faces])
    steps = {"detector": lambda: det.detect(frames), "mesh": lambda: mesh.landmarks(frames, rois)}
    threads = torch.get_num_threads()
    report = []
    for name, fn in steps.items():
        fn()
        t = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t) / 8 * 1000
        torch.set_num_threads(1)
        try:
            fn()
            t = time.process_time()
            fn()
            cpu = (time.process_time() - t) / 8 * 1000
        finally:
            torch.set_num_threads(threads)
        report.append(f"{name} {wall:.2f} ms/frame wall ({threads} threads), {cpu:.2f} ms/frame CPU (1 thread)")
    print("1080p batch 8: " + "; ".join(report))


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-s"]))
