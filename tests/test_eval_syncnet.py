"""SyncNet (omnisync_core/eval/syncnet.py) against syncnet_python on random weights (tests/fixtures/syncnet), its
one-time conversion from a pickle, and the LSE formulas on known answers."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from omnisync_core.eval.syncnet import (SyncNet, convert_syncnet, load_syncnet, mfcc, resample_frames,
                                        sync_scores, syncnet_crops, syncnet_embeddings)
from omnisync_core.model.loading import CheckpointError, CheckpointMismatchError

FIXTURE = Path(__file__).parent / "fixtures" / "syncnet"


@pytest.fixture(scope="module")
def reference():
    data = load_file(str(FIXTURE / "syncnet_parity.safetensors"))
    with safe_open(str(FIXTURE / "syncnet_parity.safetensors"), "pt") as f:
        meta = f.metadata()
    return data, meta


@pytest.fixture(scope="module")
def random_weights():
    recipe = json.loads((FIXTURE / "syncnet_weights_recipe.json").read_text())
    sd = {k: off + sc * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
          for k, (seed, off, sc, shape) in recipe["tensors"].items()}
    for k, (total, first) in recipe["fingerprint"].items():
        # torch's CPU generator is what makes these; if it ever changes, the fixture must be made again
        assert sd[k].reshape(-1)[:4].tolist() == pytest.approx(first, rel=1e-6, abs=1e-7), k
        assert float(sd[k].double().sum()) == pytest.approx(total, rel=1e-5, abs=1e-4), k
    return sd


def test_mfcc_matches_python_speech_features(reference):
    data, _ = reference
    got = mfcc(data["audio_int16"].double())
    want = data["mfcc_f64"]
    assert got.shape == want.shape == (13, 55)
    # float64 both sides; only the FFT implementations differ
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_syncnet_matches_the_reference_on_random_weights(reference, random_weights):
    data, meta = reference
    model = load_syncnet(random_weights)
    crops = data["frames_small_bgr"].repeat_interleave(8, 1).repeat_interleave(8, 2).permute(0, 3, 1, 2).float()
    lip, aud = syncnet_embeddings(model, crops, data["audio_int16"].double() / 32768)
    # fp32 through 12 layers with different kernels: 1e-5 of the embeddings' scale (|lip| up to ~7, |aud| ~45)
    torch.testing.assert_close(lip, data["lip_features"], rtol=0, atol=1e-5 * data["lip_features"].abs().max())
    torch.testing.assert_close(aud, data["audio_features"], rtol=0, atol=1e-5 * data["audio_features"].abs().max())
    result = sync_scores(lip, aud, int(meta["vshift"]))
    assert result.offset == int(meta["offset"])
    assert result.lse_d == pytest.approx(float(meta["min_dist"]), rel=1e-5)
    assert result.lse_c == pytest.approx(float(meta["confidence"]), rel=1e-4)
    from omnisync_core.eval.syncnet import sync_distances

    torch.testing.assert_close(sync_distances(lip, aud, 3), data["dists"], rtol=1e-5, atol=1e-3)


def test_conversion_reads_the_pickle_weights_only_and_round_trips(tmp_path, random_weights):
    model = SyncNet()
    sd = dict(random_weights)
    # what an old torch.save of the module's state dict holds: BatchNorm counters too, in the legacy format
    for k in [k for k in sd if k.endswith("running_mean")]:
        sd[k.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    legacy = tmp_path / "syncnet_v2.model"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    out = convert_syncnet(legacy)
    assert out == tmp_path / "syncnet_v2.safetensors"
    loaded = load_syncnet(out)
    model.load_state_dict(random_weights)
    x = torch.randn(2, 1, 13, 20)
    torch.testing.assert_close(loaded.forward_aud(x), model.eval().forward_aud(x), rtol=0, atol=0)
    zipped = tmp_path / "zipped.pt"
    torch.save({"state_dict": random_weights}, zipped)
    assert load_syncnet(convert_syncnet(zipped, tmp_path / "z.safetensors")).netfcaud[3].weight.shape == (1024, 512)


class NotATensor:
    pass


def test_conversion_refuses_code_and_wrong_shapes(tmp_path, random_weights):
    evil = tmp_path / "evil.model"
    torch.save({"netcnnaud.0.weight": NotATensor()}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        convert_syncnet(evil)
    assert not (tmp_path / "evil.safetensors").exists()
    bad = dict(random_weights)
    bad["netfclip.0.weight"] = torch.zeros(512, 256)
    del bad["netcnnaud.0.bias"]
    wrong = tmp_path / "wrong.model"
    torch.save(bad, wrong)
    with pytest.raises(CheckpointMismatchError, match="netcnnaud.0.bias") as info:
        convert_syncnet(wrong)
    assert "netfclip.0.weight" in str(info.value)


def test_shifted_audio_gives_the_offset():
    """Video window i shows what audio window i - s says (the audio leads by s frames): offset s, LSE-D about
    0 (only pairwise_distance's 1e-6 per component), LSE-C the median distance."""
    g = torch.Generator().manual_seed(0)
    aud = torch.randn(40, 64, generator=g)
    for s in (-4, 0, 3):
        lip = torch.roll(aud, s, 0)           # lip[i] = aud[i - s]; the wrapped rows only add noise
        r = sync_scores(lip, aud, vshift=6)
        assert r.offset == s
        assert r.lse_c > 5 and r.lse_d < 0.15 * r.lse_c
    r = sync_scores(torch.randn(40, 64, generator=g), aud, vshift=6)      # unrelated: no confident offset
    assert r.lse_c < 0.5 * sync_scores(aud, aud, vshift=6).lse_c


def test_crop_window_follows_the_reference_geometry():
    """syncnet_python's crop_video: x in cx +- 1.4 s, y from cy - s to cy + 1.8 s (crop_scale 0.4), 110 outside."""
    h, w = 200, 300
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w, 1).expand(1, h, w, 3) / 255.0
    box = torch.tensor([[100.0, 60.0, 160.0, 120.0]])               # s = 30, centre (130, 90)
    crops = syncnet_crops(xs, box, size=224)                        # value = x coordinate of the sample (0..255)
    left, right = 130 - 1.4 * 30, 130 + 1.4 * 30
    u = (torch.arange(224) + 0.5) / 224
    want = left + u * (right - left) - 0.5                          # pixel j's centre is at j + 0.5
    torch.testing.assert_close(crops[0, 0, 112], want, rtol=0, atol=1e-3)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1, 1).expand(1, h, w, 3) / 255.0
    col = syncnet_crops(ys, box, size=224)[0, 1, :, 112]
    top, bottom = 90 - 30, 90 + 1.8 * 30
    ok = top + u * (bottom - top) < h - 1
    torch.testing.assert_close(col[ok], (top + u * (bottom - top) - 0.5)[ok], rtol=0, atol=1e-3)
    far = syncnet_crops(xs, torch.tensor([[-400.0, 0.0, -300.0, 100.0]]), size=32)
    assert torch.allclose(far[0, :, :, :4], torch.tensor(110.0))
    assert resample_frames(50, 50.0).tolist() == list(range(0, 50, 2))
    assert resample_frames(25, 25.0).tolist() == list(range(25))


def test_lse_runs_on_frames_and_boxes_at_another_frame_rate(random_weights):
    """The whole path (25 fps resampling, crops, MFCC, embeddings, scores) on 50 fps frames: finite scores over
    the 31 candidate shifts, and the same numbers as the steps done by hand."""
    from omnisync_core.eval.syncnet import lse

    torch.set_num_threads(1)
    model = load_syncnet(random_weights)
    g = torch.Generator().manual_seed(4)
    frames = torch.randint(0, 256, (24, 64, 64, 3), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([16.0, 12.0, 48.0, 52.0]).expand(24, 4)
    pcm = torch.randn(16000 * 24 // 50, generator=g) * 0.1
    r = lse(model, frames, boxes, pcm, fps=50)
    assert r.distances.shape == (31,) and all(map(lambda v: v == v, (r.lse_c, r.lse_d)))
    crops = syncnet_crops(frames[::2], boxes[::2])
    lip, aud = syncnet_embeddings(model, crops, pcm)
    assert lip.shape == (12 - 5, 1024)                     # windows 0 .. min(T, N // 640) - 6, as the reference
    assert r.lse_d == sync_scores(lip, aud).lse_d
