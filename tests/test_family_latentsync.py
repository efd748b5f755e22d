"""The LatentSync family on tiny random models in their real layouts (a UNet3D and Whisper written as upstream's
pickles and converted, an SD VAE in diffusers' layout), on the CPU: recognition of the released 1.6 key list and
``check-model`` of a converted file in that layout, ``omnisync convert`` and ``omnisync download latentsync-1.6``,
the streaming Whisper features, the window (16 frames, the last one padded), the crop pixels outside the mouth mask
kept bit for bit, and whole jobs through the CLI at 29.97 fps and on frames in memory."""

from __future__ import annotations

import json
import math
from dataclasses import replace
import shutil
import struct
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from omnisync_core.audio.latentsync_audio import LatentSyncAudioTrack, latentsync_audio_features
from omnisync_core.audio.track import AudioTrack
from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.cli import main
from omnisync_core.families import family, recognise, recognise_tensors
from omnisync_core.errors import InputError
from omnisync_core.families.base import GenerationOptions
from omnisync_core.families.download import download, download_plan
from omnisync_core.families.files import resolve_files
from omnisync_core.families.latentsync import FAMILY, LatentSyncGenerator, alignment_points, pad_index
from omnisync_core.face.types import POINT_NAMES, point_index
from omnisync_core.frames import lipsync_frames
from omnisync_core.io import VideoWriter, probe_video
from omnisync_core.job import WindowInput, window_input
from omnisync_core.model.convert import whisper_checkpoint_shapes
from omnisync_core.model.latentsync_unet import LatentSyncUNet
from omnisync_core.model.loading import TensorInfo
from omnisync_core.model.sd_vae import SDVAE, SDVAEConfig
from omnisync_core.pipeline import LipSyncOptions
from omnisync_core.plan import plan_lipsync
from omnisync_core.sources import TensorFrames
from omnisync_core.timeline import plan_windows

from conftest import write_wav
from tiny_models import face_crops, randomize, speech_tone, talking_pattern

MANIFEST = Path(__file__).parent / "fixtures" / "manifests" / "latentsync_1.6_unet.json"
SIZE = 64          # our crop; the tiny UNet (8 x 8 latents) x the tiny VAE (factor 8) gives LatentSync's crop 64
SR = 16000
BOX = (40, 24, 88, 72)
TINY_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=24, n_audio_head=2, n_audio_layer=4, n_vocab=51865,
                 n_text_ctx=8, n_text_state=24, n_text_head=2, n_text_layer=1)


# ---------------------------------------------------------------- tiny files in their real layouts

@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    """Upstream's two pickles as its scripts write them, with tiny random weights: latentsync_unet.pt
    (``{"global_step", "state_dict"}``, scripts/train_unet.py L454-459) and whisper/tiny.pt (OpenAI's ``{"dims",
    "model_state_dict"}``, fp16)."""
    root = tmp_path_factory.mktemp("pickles")
    torch.manual_seed(0)
    unet = randomize(LatentSyncUNet("tiny"), 1)
    torch.save({"global_step": 1234, "state_dict": unet.state_dict()}, root / "latentsync_unet.pt")
    g = torch.Generator().manual_seed(3)
    sd = {k: (0.2 * torch.randn(s, generator=g)).half() for k, s in whisper_checkpoint_shapes(TINY_DIMS).items()}
    enc = WhisperEncoder(WhisperEncoderConfig(n_mels=80, d_model=24, n_heads=2, n_layers=4))
    sd["encoder.positional_embedding"] = enc.positional_embedding.half()     # the sinusoid, as OpenAI's file
    (root / "whisper").mkdir()
    torch.save({"dims": dict(TINY_DIMS), "model_state_dict": sd}, root / "whisper" / "tiny.pt")
    return {"unet": root / "latentsync_unet.pt", "whisper": root / "whisper" / "tiny.pt", "module": unet}


@pytest.fixture(scope="module")
def models(pickles, tmp_path_factory):
    """A ComfyUI models/ folder: the pickles converted by ``omnisync convert`` into diffusion_models/ and
    audio_encoders/, a tiny SD VAE (4 levels: factor 8) in diffusers' layout in vae/."""
    root = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "audio_encoders", "vae"):
        (root / sub).mkdir()
    assert main(["convert", str(pickles["unet"]), "--out", str(root / "diffusion_models" /
                                                                "latentsync_unet.safetensors")]) == 0
    assert main(["convert", str(pickles["whisper"]), "--out", str(root / "audio_encoders" /
                                                                   "latentsync_whisper_tiny.safetensors")]) == 0
    vae = randomize(SDVAE(SDVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)), 2, 0.02)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    return root


def _generator(models, **options) -> LatentSyncGenerator:
    fam, files = resolve_files("latentsync_unet.safetensors", str(models))
    assert fam is FAMILY
    return FAMILY.load(files, FAMILY.memory_plan(torch.device("cpu")), GenerationOptions(**{"steps": 4, **options}))


def _points(n: int) -> torch.Tensor:
    """Named face points of an upright face centred in a SIZE crop (brows, nose, mouth where a face has them)."""
    pts = torch.full((n, len(POINT_NAMES), 2), SIZE / 2)
    pts[:, point_index("right_brow")] = torch.tensor([SIZE * 0.36, SIZE * 0.36])
    pts[:, point_index("left_brow")] = torch.tensor([SIZE * 0.64, SIZE * 0.36])
    pts[:, point_index("nose")] = torch.tensor([SIZE * 0.5, SIZE * 0.5])
    pts[:, point_index("mouth")] = torch.tensor([SIZE * 0.5, SIZE * 0.66])
    return pts + 0.3 * torch.arange(n).view(-1, 1, 1)


def _window(gen, n: int, fps=Fraction(25), start: int = 0, seed: int = 7, points: bool = True,
            crops=None) -> WindowInput:
    features = gen.audio_features(AudioTrack.from_samples(speech_tone(3.0), SR), fps)
    frames = torch.arange(start, start + n)
    mouth = torch.tensor([[SIZE * 0.5, SIZE * 0.66]]).expand(n, 2).clone()
    width = torch.full((n,), SIZE * 0.5)
    return WindowInput(face_crops(n) if crops is None else crops, frames, fps, features.window(frames), mouth, width,
                       _points(n) if points else None, seed + start, torch.ones(n, dtype=torch.bool))


# ---------------------------------------------------------------- 1. recognition, check-model, convert

def _manifest_shapes() -> dict:
    return {k: tuple(v) for k, v in json.loads(MANIFEST.read_text())["tensors"].items()}


def test_the_released_key_list_is_latentsync_1_6():
    shapes = _manifest_shapes()
    for prefix in ("", "model.diffusion_model."):          # converted file, and ComfyUI's prefixed layout
        found = recognise_tensors({prefix + k: TensorInfo("F16", s) for k, s in shapes.items()}, {})
        assert (found.kind, found.role, found.family, found.label) == ("latentsync-unet", "model", "latentsync",
                                                                       "LatentSync 1.6 UNet")
        assert found.params == 1_267_944_644
    assert family("latentsync") is FAMILY


def test_check_model_names_a_converted_file_in_the_released_layout(tmp_path, capsys):
    """A safetensors file with the 1.6 manifest's 1246 tensors in fp16 (as `omnisync convert --dtype fp16` writes
    it): only the header is real, the 2.5 GB of data is a sparse hole, since check-model reads the header alone."""
    header, offset = {}, 0
    for k, s in _manifest_shapes().items():
        nbytes = 2 * math.prod(s)
        header[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "omnisync", "kind": "latentsync_unet", "source_file": "latentsync_unet.pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "latentsync_unet.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    assert main(["check-model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LatentSync 1.6 UNet: model of the latentsync family, 1.27 B parameters" in out


class _Payload:
    """An object whose unpickling would create a file: the test checks it never does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cli_convert_takes_upstreams_pickle_and_refuses_one_with_code(pickles, tmp_path, capsys):
    from omnisync_core.model.latentsync_unet import load_latentsync_unet

    src = tmp_path / "latentsync_unet.pt"
    shutil.copy(pickles["unet"], src)
    assert main(["convert", str(src), "--expect", "latentsync_unet"]) == 0
    assert "LatentSync UNet: model of the latentsync family" in capsys.readouterr().out
    loaded = load_latentsync_unet(src.with_suffix(".safetensors"))
    for k, v in pickles["module"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"global_step": 1, "state_dict": pickles["module"].state_dict(), "hook": _Payload(marker)}, bad)
    assert main(["convert", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was refused" in err[0]
    assert not marker.exists() and not bad.with_suffix(".safetensors").exists()


def test_download_plan_and_conversion_hook(pickles, tmp_path, capsys):
    plan = download_plan("latentsync-1.6", tmp_path)
    assert [(r.repo, r.path, t.relative_to(tmp_path).as_posix()) for r, t in plan] == [
        ("ByteDance/LatentSync-1.6", "latentsync_unet.pt", "diffusion_models/latentsync_unet.pt"),
        ("ByteDance/LatentSync-1.6", "whisper/tiny.pt", "audio_encoders/tiny.pt"),
        ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors",
         "vae/sd-vae-ft-mse.safetensors")]             # diffusers' generic name would clash in a shared vae/
    assert main(["download", "latentsync-1.6", "--models-dir", str(tmp_path), "--dry-run"]) == 0
    assert "ByteDance/LatentSync-1.6/whisper/tiny.pt" in capsys.readouterr().out and not any(tmp_path.iterdir())

    vae = SDVAE("tiny")
    sources = {"latentsync_unet.pt": pickles["unet"], "whisper/tiny.pt": pickles["whisper"]}

    def fake_fetch(repo, path, cache_dir):                  # stands in for the hub: no network in tests
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        local = Path(cache_dir) / Path(path).name
        if path in sources:
            shutil.copy(sources[path], local)
        else:
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(local))
        return str(local)

    # the released names: a tiny UNet is refused as "latentsync-1.6", so pretend-download checks the hook's
    # strictness; a file already converted is kept as it is
    with pytest.raises(Exception, match="LatentSync UNet"):
        download("latentsync-1.6", tmp_path, say=lambda line: None, fetch=fake_fetch)
    converted = tmp_path / "diffusion_models" / "latentsync_unet.safetensors"
    save_file({"kept": torch.zeros(1)}, str(converted))
    got = download("latentsync-1.6", tmp_path, say=lambda line: None, fetch=fake_fetch)
    names = [p.relative_to(tmp_path).as_posix() for p in got]
    assert names == ["diffusion_models/latentsync_unet.safetensors",
                     "audio_encoders/latentsync_whisper_tiny.safetensors", "vae/sd-vae-ft-mse.safetensors"]
    assert all(p.is_file() for p in got) and not list(tmp_path.rglob(".*.download"))
    assert recognise(got[1]).role == "audio_encoder" and recognise(got[2]).kind == "sd-vae"


# ---------------------------------------------------------------- 2. the audio features

def test_streaming_whisper_features_equal_the_whole_track_past_30_s(models):
    """The job's features, 30 s windows encoded as the windows ask for them (two kept in memory), are the whole-track
    features: the same windows and kept ranges over the same whole-track log-mel, so no seam every 30 s. Float
    tolerance: the mel of a window is taken from a slice of the track (the STFT's frames are the same sums)."""
    from omnisync_core.model.loading import load_whisper

    encoder = load_whisper(models / "audio_encoders" / "latentsync_whisper_tiny.safetensors")
    speech = speech_tone(45.0, seed=1)
    whole = latentsync_audio_features(speech, encoder)
    track = LatentSyncAudioTrack(speech, encoder)
    assert track.num_tokens == whole.shape[0] == 45 * 50
    for a, b in ((0, 40), (1480, 1520), (2200, 2250), (0, 2250)):            # the 30 s boundary is token 1500
        # measured equal here; the tolerance allows the encoder's batch of windows to block differently
        torch.testing.assert_close(track.tokens(a, b), whole[a:b].float(), atol=2e-4, rtol=1e-4)
    assert len(track._cache) <= 2


# ---------------------------------------------------------------- 3. the window

def test_a_window_is_16_frames_and_a_short_one_is_padded(models):
    """16 frames in, 16 out; 9 frames are padded to 16 by playing them back and forth and give 9; more than 16 are
    refused. The UNet's GroupNorm and temporal attention span the window, so 8 frames alone differ from the same 8
    frames at the start of a 16-frame window (same seed, same noise frame)."""
    gen = _generator(models, steps=2)
    assert gen(_window(gen, 16)).shape == (16, SIZE, SIZE, 3)
    assert pad_index(9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 7, 6, 5, 4, 3, 2, 1]
    assert gen(_window(gen, 9)).shape == (9, SIZE, SIZE, 3)
    with pytest.raises(InputError, match="at most 16 frames"):
        gen.encode(_window(gen, 17))
    crops = face_crops(16)
    full = gen(_window(gen, 16, crops=crops))
    alone = gen(_window(gen, 8, crops=crops[:8]))
    assert (full[:8] - alone).abs().max() > 1e-3


def test_outside_the_mouth_the_crop_is_the_source_bit_for_bit(models):
    """Every crop pixel where the blend weight is 0 (outside LatentSync's mouth mask, warped into our crop) is the
    source crop exactly (torch.where keeps it); inside, the mouth changed. With and without face points (the
    fallback geometry from the mouth and the face width)."""
    gen = _generator(models, steps=2)
    for points in (True, False):
        window = _window(gen, 12, points=points)
        state = gen.sample(gen.encode(window), window)
        weight = gen.blend_weight(state)
        out = gen.decode(state, window)
        outside = weight == 0
        assert outside.any() and (~outside).any()
        assert torch.equal(out[outside], window.crops[outside])
        assert not torch.equal(out[~outside], window.crops[~outside])


def test_alignment_points_from_face_mesh_and_fallback():
    """The 3 points are the brows and the nose (image-left brow first), moved to OpenCV's pixel convention and
    rounded as upstream rounds them; frames without points take the template's proportions."""
    points = _points(2)
    pts = alignment_points(points, torch.zeros(2, 2), torch.ones(2))
    want = points[:, [point_index("right_brow"), point_index("left_brow"), point_index("nose")]].double() - 0.5
    assert torch.equal(pts, want.round())
    mouth, width = torch.tensor([[32.0, 42.0]]), torch.tensor([32.0])
    fallback = alignment_points(None, mouth, width)
    assert fallback.shape == (1, 3, 2) and fallback[0, 0, 0] < fallback[0, 2, 0] < fallback[0, 1, 0]
    assert fallback[0, 0, 1] == fallback[0, 1, 1] < fallback[0, 2, 1]


# ---------------------------------------------------------------- 4. guidance and its options

def test_guidance_modes_deepcache_and_batched_cfg(models):
    """cfg (upstream's 1.5 against zero audio), ds-cfg (DS-CFG's map instead of the scale) and none all run and
    differ; DeepCache off recomputes the deep features every step, so it differs from the cached default (it is an
    approximation, not a reformulation); CFG in one batch of two equals two passes to float tolerance (the same
    convolutions at batch 1 and 2 may block differently, and four DDIM steps carry the difference on)."""
    window = _window(_generator(models), 16)
    out = {}
    for name, options in (("cfg", {}), ("ds-cfg", {"guidance": "ds-cfg"}), ("none", {"guidance": "none"}),
                          ("no-cache", {"extra": {"deep_cache": False}}),
                          ("two-pass", {"extra": {"batch_cfg": False}})):
        out[name] = _generator(models, steps=4, **options)(window)
    assert not torch.equal(out["cfg"], out["none"]) and not torch.equal(out["cfg"], out["ds-cfg"])
    assert (out["cfg"] - out["no-cache"]).abs().max() > 0
    torch.testing.assert_close(out["two-pass"], out["cfg"], atol=1e-4, rtol=0)      # measured 2.4e-5 here
    with pytest.raises(InputError, match="guidance must be one of"):
        _generator(models, guidance="sometimes")


def test_progress_counts_every_ddim_step(models):
    """DDIM starts from noise and runs all its steps (no tau), so the progress bars count ``steps`` per window,
    exactly as many as the sampler reports."""
    assert FAMILY.steps_per_window(GenerationOptions()) == 20
    assert FAMILY.steps_per_window(GenerationOptions(steps=3, tau=0.5)) == 3
    seen = []
    fam, files = resolve_files("latentsync_unet.safetensors", str(models))
    gen = FAMILY.load(files, FAMILY.memory_plan(torch.device("cpu")), GenerationOptions(steps=3),
                      step_callback=lambda i, n, x: seen.append((i, n)))
    window = _window(gen, 4)
    gen.sample(gen.encode(window), window)
    assert len(seen) == FAMILY.steps_per_window(GenerationOptions(steps=3)) and seen[-1][1] == 3


# ---------------------------------------------------------------- 5. whole jobs

def _frames(n: int) -> torch.Tensor:
    return (talking_pattern(n) * 255).round().to(torch.uint8)


def test_job_on_frames_in_memory_keeps_29_97_fps_and_runs_16_frame_windows(models):
    """lipsync_frames at 29.97 fps: LatentSync's windows (16 frames back to back, the last one shorter), the input's
    frame count and exact rate, and every pixel outside the crop untouched."""
    from omnisync_core.face.crop import _footprint

    gen = _generator(models, steps=2)
    fps, n = Fraction(30000, 1001), 21
    frames = _frames(n)
    speech = speech_tone(n / float(fps), seed=5)
    options = LipSyncOptions(crop_size=SIZE, box=BOX, overlap=0, window=FAMILY.window_length(fps))
    result = lipsync_frames(frames, speech[None], SR, fps, gen, options=options)
    assert result.num_frames == n and result.fps == fps
    plan = plan_lipsync(AudioTrack.from_samples(speech[None], SR), TensorFrames(frames, fps), None,
                        replace(options, window_rule=gen.window_rule))
    assert [(w.start, w.stop) for w in plan.windows] == [(0, 16), (16, 21)]
    inside = torch.zeros(frames.shape[:3], dtype=torch.bool)
    for t in range(n):
        x0, y0, x1, y1 = _footprint(plan.params.frame_from_crop[t], SIZE, plan.params.frame_hw, pad=0)
        inside[t, y0:y1, x0:x1] = True
    source = frames.float() / 255.0
    assert torch.equal(result.frames[~inside], source[~inside])
    assert not torch.equal(result.frames[inside], source[inside])
    with pytest.raises(InputError, match="at most 16 frames"):
        FAMILY.window_length(fps, 17)


def test_cli_runs_latentsync_from_a_models_folder_at_29_97_fps(models, tmp_path, capsys):
    """`omnisync lipsync --models-dir` finds the SD VAE and Whisper by content and runs the family's own windows
    (no --window or --overlap given: 19 frames are 2 windows, 16 + 3); the output keeps the clip's frame count and
    exact 29.97 fps."""
    fps, n = Fraction(30000, 1001), 19
    clip = tmp_path / "in.mp4"
    with VideoWriter(clip, fps, crf=18) as writer:
        writer.write(_frames(n))
    wav = write_wav(tmp_path / "speech.wav", speech_tone(n / float(fps), seed=5).numpy(), SR)
    out = tmp_path / "out.mp4"
    assert main(["lipsync", "--video", str(clip), "--audio", str(wav), "--out", str(out), "--models-dir",
                 str(models), "--model", "latentsync_unet.safetensors", "--steps", "2", "--crop-size", str(SIZE),
                 "--detector", "none", "--box", ",".join(map(str, BOX)), "--length-policy", "video",
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "LatentSync" in text and "demo model" not in text
    assert f"wrote {out}: {n} frames at 29.970 fps" in text and " in 2 windows with " in text
    info = probe_video(out)
    assert info.num_frames == n and info.fps == fps
