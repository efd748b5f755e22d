"""Training data: synthetic and video shards, the Eq. 1-3 pairing, audio alignment, and graceful skips."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open

from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.io import VideoWriter
from omnisync_core.train.data import LipSyncDataset, PairSampler, build_shards, synthetic_shards
from omnisync_core.train.synthetic import make_example

WINDOW, EXCLUSION = 9, 2
SENTENCES = ["Hello there, how are you today?", "Open the window wide, please."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return WhisperEncoder(WhisperEncoderConfig(d_model=32, n_heads=2, n_layers=1)).eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, encoder):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = tmp_path_factory.mktemp("synthetic")
    synthetic_shards(out, 3, size=32, seed=11, sentences=SENTENCES, audio_encoder=encoder, shard_size=2)
    return out


@pytest.fixture(scope="module")
def dataset(shards):
    return LipSyncDataset(shards, window=WINDOW, exclusion=EXCLUSION)


def test_synthetic_shards_format(shards, dataset):
    index = json.loads((shards / "index.json").read_text())
    assert index["size"] == 32 and index["audio"] == "features" and index["skipped"] == []
    assert [len(s["clips"]) for s in index["shards"]] == [2, 1]
    with safe_open(str(shards / index["shards"][0]["file"]), framework="pt") as f:
        records = json.loads(f.metadata()["clips"])
        t = records[0]["frames"]
        frames, pose = f.get_tensor("0.frames"), f.get_tensor("0.pose")
        assert frames.dtype == torch.uint8 and frames.shape == (t, 32, 32, 3)
        assert pose.shape == (t, 10) and pose.abs().max() < 1.0       # keypoints inside the crop
        assert f.get_tensor("0.openness").shape == (t,) and f.get_tensor("0.mouth_xy").shape == (t, 2)
        feats = f.get_tensor("0.features")
        # 25 fps -> two 20 ms tokens per frame, plus the margin after the last frame
        assert feats.dtype == torch.float16 and feats.shape[1] == 32 and 2 * t <= feats.shape[0] <= 2 * t + 9
        mouth = f.get_tensor("0.mouth_xy")
    # crops are centred on the face as at inference (margin 0.3): the mouth sits below the centre, mid-width
    assert ((mouth[:, 0] - 16).abs() < 3).all() and ((mouth[:, 1] > 17) & (mouth[:, 1] < 28)).all()
    assert len(dataset.clips) == 3 and len(dataset) == sum(c.frames // WINDOW for c in dataset.clips)


def test_reference_never_touches_the_target(dataset):
    for index in range(len(dataset)):
        for sigma, seed in ((0.95, 0), (0.3, 1), (0.3, 2)):
            s = dataset[(index, sigma, seed)]
            a = s["start"]
            ref = s["reference_frames"]
            assert ((ref < a - EXCLUSION) | (ref >= a + WINDOW + EXCLUSION)).all(), (index, sigma, ref)
            assert s["video"].shape == s["reference"].shape == (3, WINDOW, 32, 32)
            assert s["audio"].shape == (WINDOW, 5, 32)
            assert -1.0 <= float(s["video"].min()) and float(s["video"].max()) <= 1.0


def test_pseudo_pairs_are_closer_in_pose(dataset):
    pseudo = [dataset[(i, 0.95, i)]["pose_distance"] for i in range(len(dataset))]
    random_ = [dataset[(i, 0.5, 100 * i + j)]["pose_distance"] for i in range(len(dataset)) for j in range(4)]
    assert sum(pseudo) / len(pseudo) < 0.7 * sum(random_) / len(random_)


def test_sigma_threshold_switches_the_pairing(dataset):
    index = 1
    clip, a = dataset.items[index]
    pose = dataset.clips[clip].pose
    high = dataset[(index, 0.86, 0)]
    assert high["pseudo"]
    # independent brute force: nearest allowed frame in pose for each target frame
    for j, ref in enumerate(high["reference_frames"].tolist()):
        best = min((float((pose[a + j] - pose[c]).norm()), c) for c in range(len(pose))
                   if c < a - EXCLUSION or c >= a + WINDOW + EXCLUSION)
        assert float((pose[a + j] - pose[ref]).norm()) == pytest.approx(best[0], abs=1e-6)
    low = dataset[(index, 0.84, 0)]
    assert not low["pseudo"]
    ref = low["reference_frames"]
    assert torch.equal(ref, torch.arange(int(ref[0]), int(ref[0]) + WINDOW))     # a contiguous other segment
    starts = {int(dataset[(index, 0.5, seed)]["reference_frames"][0]) for seed in range(12)}
    assert len(starts) > 2                                                        # drawn, not fixed
    loose = LipSyncDataset(dataset_root(dataset), window=WINDOW, pair_threshold=0.5, pseudo_mode="segment")
    seg = loose[(index, 0.6, 0)]
    assert seg["pseudo"] and torch.equal(seg["reference_frames"], torch.arange(int(seg["reference_frames"][0]),
                                                                               int(seg["reference_frames"][0]) + WINDOW))


def dataset_root(dataset):
    return dataset.clips[0].shard.parent


def test_audio_windows_follow_the_frames(shards, dataset):
    clip, a = dataset.items[2]
    c = dataset.clips[clip]
    with safe_open(str(c.shard), framework="pt") as f:
        feats = f.get_tensor(f"{c.key}.features").float()
    got = dataset[(2, 0.5, 0)]["audio"]
    for j in range(WINDOW):
        centre = 2 * (c.first_frame + a + j) - c.feature_start          # 25 fps: frame k starts at token 2k
        expected = feats[[min(max(centre + o, 0), len(feats) - 1) for o in range(-2, 3)]]
        assert torch.equal(got[j], expected)


def test_pair_sampler_is_deterministic_and_splits_over_ranks():
    sigma = lambda g: float(torch.rand((), generator=g))  # noqa: E731
    a, b = PairSampler(7, 4, 3, sigma), PairSampler(7, 4, 3, sigma)
    assert a.batch(5) == b.batch(5) and a.batch(5) != a.batch(6)
    assert a.shard(5, 0, 2) + a.shard(5, 1, 2) == a.batch(5)
    seen = [a.item(s, j)[0] for s in range(7) for j in range(4)]        # 4 epochs of 7 items
    assert all(sorted(seen[7 * e:7 * e + 7]) == list(range(7)) for e in range(4))


def test_broken_shard_is_skipped_with_a_warning(shards, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    broken = copy / index["shards"][0]["file"]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="omnisync_core.train.data"):
        ds = LipSyncDataset(copy, window=WINDOW)
    assert any("unreadable shard" in r.message and broken.name in r.message for r in caplog.records)
    assert [s["source"] for s in ds.skipped] == [str(broken)]
    assert len(ds.clips) == 1                           # the intact shard's clip is still there
    ds[(0, 0.9, 0)]


def test_build_shards_from_videos_skips_a_clip_without_audio(tmp_path, encoder, caplog):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    clip, wave = make_example("Hello there, how are you?", seed=4, size=64)
    talking, silent = tmp_path / "talking.mp4", tmp_path / "silent.mp4"
    with VideoWriter(talking, 25, audio=wave, crf=10) as w:
        w.write(clip.frames)
    with VideoWriter(silent, 25) as w:
        w.write(clip.frames[:30])
    with caplog.at_level(logging.WARNING, logger="omnisync_core.train.data"):
        index_path = build_shards([talking, silent], tmp_path / "out", size=32, clip_frames=None,
                                  audio_encoder=encoder)
    assert any("no audio" in r.message and "silent.mp4" in r.message for r in caplog.records)
    index = json.loads(index_path.read_text())
    assert index["skipped"] == [{"source": str(silent), "reason": "the video has no audio track"}]
    assert [c["frames"] for s in index["shards"] for c in s["clips"]] == [len(clip)]
    ds = LipSyncDataset(tmp_path / "out", window=WINDOW)
    s = ds[(0, 0.95, 0)]
    assert s["video"].shape == (3, WINDOW, 32, 32) and s["audio"].shape == (WINDOW, 5, 32)
    # samples instead of features when no encoder is given; the dataset then encodes them
    build_shards([talking], tmp_path / "raw", size=32, clip_frames=None)
    raw = LipSyncDataset(tmp_path / "raw", window=WINDOW, audio_encoder=encoder)
    assert json.loads((tmp_path / "raw" / "index.json").read_text())["audio"] == "samples"
    torch.testing.assert_close(raw[(0, 0.95, 0)]["audio"], s["audio"], atol=2e-3, rtol=0)


def test_rendered_pseudo_pairs_differ_only_around_the_mouth(tmp_path, encoder):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    synthetic_shards(tmp_path, 2, size=32, render_size=64, seed=3, sentences=SENTENCES, audio_encoder=encoder,
                     pseudo_pairs=True)
    ds = LipSyncDataset(tmp_path, window=WINDOW, pair_threshold=0.5)
    assert all(c.has_pseudo for c in ds.clips)
    high = ds.sample(0, 0.9, torch.Generator().manual_seed(0))
    assert high["pseudo"] and high["reference_kind"] == "rendered"
    assert torch.equal(high["reference_frames"], high["target_frames"])     # same frames, other lips
    diff = (high["reference"] - high["video"]).abs().amax(0)                   # [n, S, S]
    assert diff.amax() > 0.3                                                   # the lips differ somewhere
    mouth, width = high["mouth_xy"], high["face_width"]
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    far = ((xs - mouth[:, 0, None, None]).square() + (ys - mouth[:, 1, None, None]).square()).sqrt() \
        > 0.45 * width[:, None, None]
    assert diff[far].amax() < 0.05                                             # identical away from the mouth
    low = ds.sample(0, 0.2, torch.Generator().manual_seed(0))
    assert low["reference_kind"] == "segment" and not low["pseudo"]
