"""The InfiniteTalk family: recognition of the base and the patch (tiny files and the released key lists), the
noised source outside the lower face and the clean reference latent at every step, fps mapping both ways, the
three-pass guidance, fp8 and block swap against the plain path, the CLI end to end from a ComfyUI models folder at
29.97 fps, the download plan and the errors; all on tiny random models (Wan I2V + adapter, CLIP vision, wav2vec2,
Wan VAE) on the CPU."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from omnisync_core.audio.track import AudioTrack
from omnisync_core.audio.wav2vec2 import encode_speech
from omnisync_core.errors import InputError
from omnisync_core.families import family, recognise, recognise_tensors
from omnisync_core.families import v2v
from omnisync_core.families.base import GenerationOptions, MemoryPlan
from omnisync_core.families.files import resolve_files
from omnisync_core.families.infinitetalk import FAMILY, InfiniteTalkFamily, InfiniteTalkGenerator, default_shift
from omnisync_core.io import VideoWriter, probe_video
from omnisync_core.job import WindowInput
from omnisync_core.model.block_swap import BlockSwap
from omnisync_core.model.loading import TensorInfo
from omnisync_core.model.quant import FP8Linear
from omnisync_core.sampling import flow_sigmas, truncate_sigmas
from omnisync_core.timeline import valid_window_length

from conftest import write_wav
from tiny_models import face_crops, speech_tone, talking_pattern, write_tiny_infinitetalk

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."
SIZE = 64
SR = 16000
CPU = torch.device("cpu")


# ---------------------------------------------------------------- tiny files in their real layouts

@pytest.fixture(scope="module")
def it_files(tmp_path_factory):
    """A ComfyUI models/ folder: the base (ComfyUI prefix, fp16) in diffusion_models/, the adapter (bare keys)
    in model_patches/, CLIP vision, wav2vec2 (``wav2vec2.`` keys), the Wan VAE, and a prompt-embeddings file."""
    models = tmp_path_factory.mktemp("infinitetalk") / "models"
    return {**write_tiny_infinitetalk(models), "models": models}


def _files(it_files):
    fam, files = resolve_files(str(it_files["model"]), str(it_files["models"]))
    assert fam is FAMILY
    files.prompt_embeds = it_files["prompt_embeds"]
    return files


def _generator(it_files, plan: MemoryPlan | None = None, **options) -> InfiniteTalkGenerator:
    opts = GenerationOptions(**{"steps": 6, **options})
    return FAMILY.load(_files(it_files), plan or FAMILY.memory_plan(CPU), opts)


def _window(gen: InfiniteTalkGenerator, n: int, fps, start: int = 0, seed: int = 7) -> WindowInput:
    features = gen.audio_features(AudioTrack.from_samples(speech_tone(2.0), SR), fps)
    frames = torch.arange(start, start + n)
    mouth = torch.tensor([[SIZE * 0.5, SIZE * 0.62]]).expand(n, 2).clone()
    width = torch.full((n,), SIZE * 0.45)
    return WindowInput(face_crops(n), frames, fps, features.window(frames), mouth, width, None, seed,
                       torch.ones(n, dtype=torch.bool))


# ---------------------------------------------------------------- 1. recognition

def test_recognises_base_patch_and_the_released_manifests(it_files, capsys):
    from omnisync_core.cli import main

    base = recognise(it_files["model"])
    assert (base.kind, base.role, base.family) == ("wan-i2v", "model", "infinitetalk")
    assert "give its adapter with --patch" in base.details
    patch = recognise(it_files["patch"])
    assert (patch.kind, patch.role, patch.family) == ("infinitetalk-patch", "patch", "infinitetalk")
    assert family("infinitetalk") is FAMILY and isinstance(FAMILY, InfiniteTalkFamily)
    assert [recognise(it_files[r]).role for r in ("clip_vision", "audio_encoder", "vae")] == \
        ["clip_vision", "audio_encoder", "vae"]
    # the real files' key and shape lists (made on the meta device)
    doc = json.loads((FIXTURES / "manifests" / "wan21_i2v_14b.json").read_text())
    real = recognise_tensors({PREFIX + k: TensorInfo("F16", tuple(s)) for k, s in doc["tensors"].items()}, {})
    assert (real.label, real.family, real.params) == ("Wan2.1 I2V 14B", "infinitetalk", 16_394_878_784)
    fp8 = recognise_tensors({k: TensorInfo(v["dtype"], tuple(v["shape"]))
                             for k, v in doc["fp8_scaled_tensors"].items()}, {})
    assert fp8.label == "Wan2.1 I2V 14B" and "fp8 scaled" in fp8.details and fp8.params == 16_394_878_784
    single = json.loads((FIXTURES / "manifests" / "infinitetalk_single.json").read_text())["tensors"]
    adapter = recognise_tensors({k: TensorInfo("F16", tuple(s)) for k, s in single.items()}, {})
    assert adapter.role == "patch" and "InfiniteTalk adapter for Wan2.1 I2V 14B (2.49 B" in adapter.label
    merged = recognise_tensors({**{k: tuple(s) for k, s in doc["tensors"].items()},
                                **{k: tuple(s) for k, s in single.items()}}, {})
    assert merged.kind == "infinitetalk" and merged.label == "Wan2.1 I2V 14B + InfiniteTalk"
    # check-model names each
    for role, says in (("model", "Wan2.1 I2V"), ("patch", "InfiniteTalk adapter")):
        assert main(["check-model", str(it_files[role])]) == 0
        out = capsys.readouterr().out
        assert says in out and "infinitetalk family" in out
    assert FAMILY.window_length(Fraction(25)) == 81 and FAMILY.window_length(Fraction(30000, 1001)) == 93
    assert (default_shift(512), default_shift(480), default_shift(720)) == (7.0, 7.0, 11.0)


def test_clear_errors(it_files, tmp_path):
    # a patch given as the model
    with pytest.raises(InputError, match="a patch: give it with its flag"):
        resolve_files(str(it_files["patch"]))
    # no patch anywhere
    models = tmp_path / "models"
    for role in ("model", "clip_vision", "audio_encoder", "vae"):
        target = models / it_files[role].parent.name / it_files[role].name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(it_files[role], target)
    with pytest.raises(InputError, match=r"needs wan2.1_infiniteTalk_single_fp16.safetensors \(patch\).*--patch"):
        resolve_files(str(it_files["model"]), str(models))
    # a CLIP vision file where the patch goes
    with pytest.raises(InputError, match="needs for --patch"):
        resolve_files(str(it_files["model"]), str(it_files["models"]), {"patch": str(it_files["clip_vision"])})
    # no text conditioning
    files = _files(it_files)
    files.prompt_embeds = None
    with pytest.raises(InputError, match="--text-encoder.*--prompt-embeds"):
        FAMILY.load(files, FAMILY.memory_plan(CPU), GenerationOptions(steps=2))
    files = _files(it_files)
    with pytest.raises(InputError, match="--swap-blocks"):
        FAMILY.load(files, FAMILY.memory_plan(CPU, offload="sequential"), GenerationOptions(steps=2))
    with pytest.raises(InputError, match="guidance must be one of"):
        FAMILY.load(files, FAMILY.memory_plan(CPU), GenerationOptions(steps=2, guidance="apg"))
    gen = _generator(it_files)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    window.audio = None
    with pytest.raises(InputError, match="needs its audio windows"):
        gen.sample(state, window)
    with pytest.raises(InputError, match="not been sampled"):
        gen.decode(state, window)


# ---------------------------------------------------------------- 2. the noised source outside the mask

def test_outside_the_mask_is_the_noised_source_at_every_step(it_files):
    gen = _generator(it_files)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    lat = SIZE // 8
    assert state.z_src.shape == (1, 16, 3, lat, lat) and state.y.shape == (1, 20, 3, lat, lat)
    assert torch.equal(state.y[:, :4, 0], torch.ones(1, 4, lat, lat)) and not state.y[:, :4, 1:].any()
    # the reference's latent is that of the window's first source crop (Wan's VAE is causal)
    torch.testing.assert_close(state.y[:, 4:, :1], state.z_src[:, :, :1], atol=1e-5, rtol=0)
    assert state.clip.shape == (1, 17, gen.dit.config.clip_dim)
    run = truncate_sigmas(flow_sigmas(6, default_shift(SIZE)), float(gen.options.tau))
    mask = v2v.lower_face_mask(window.mouth_xy, window.face_width, SIZE, (lat, lat),
                               dilation=float(gen.options.mask_dilation))
    keep = (mask > 0.5).view(1, 1, *mask.shape).expand_as(state.z_src).clone()
    keep[:, :, 0] = False                                    # latent frame 0: the clean reference, below
    assert keep.any() and not keep[:, :, 1:].all()
    seen = []

    def spy(step, total, x):
        sigma = float(run[step])
        noised = (1.0 - sigma) * state.z_src + sigma * state.noise
        outside = ~keep
        outside[:, :, 0] = False
        assert torch.equal(x[outside], noised[outside]), f"step {step}: the latent left the source outside"
        assert torch.equal(x[:, :, :1], state.z_src[:, :, :1]), f"step {step}: latent frame 0 is not the reference"
        assert not torch.allclose(x[keep], noised[keep]), f"step {step}: nothing changed inside the mask"
        seen.append((step, total))

    out = gen.sample(state, window, step_callback=spy)
    assert [s for s, _ in seen] == list(range(1, len(run))) and seen[-1][1] == len(run) - 1 >= 3
    crops = gen.decode(out, window)
    assert crops.shape == window.crops.shape and crops.dtype == torch.float32 and crops.device.type == "cpu"
    assert 0 <= float(crops.min()) and float(crops.max()) <= 1


# ---------------------------------------------------------------- 3. fps and the audio features

def test_fps_maps_to_25_and_back_and_audio_is_upstreams(it_files):
    gen = _generator(it_files, steps=3)
    ntsc = _window(gen, 13, Fraction(30000, 1001), start=20)
    state = gen.encode(ntsc)
    assert state.model_frames == 11 and state.z_src.shape[2] == (valid_window_length(11) - 1) // 4 + 1
    assert ntsc.audio.shape == (valid_window_length(11), 5, 3, 8)
    assert gen(ntsc).shape == ntsc.crops.shape
    # the features are upstream's whole-clip encoding (one chunk), windows of 5 around each 25 fps frame
    speech = speech_tone(2.0)
    whole = encode_speech(gen.audio_encoder, speech)
    features = gen.audio_features(AudioTrack.from_samples(speech, SR), Fraction(25))
    assert features.num_frames == whole.shape[0] == 50
    windows = features.window(torch.arange(10, 19))
    idx = (torch.arange(10, 19)[:, None] + torch.arange(5) - 2).clamp(0, 49)
    torch.testing.assert_close(windows, whole[idx], atol=1e-5, rtol=1e-5)
    edge = features.window(torch.arange(45, 54))                  # past the end: the last feature repeats
    torch.testing.assert_close(edge[-1], whole[[49] * 5], atol=1e-5, rtol=1e-5)
    # chunked encoding of a long track: every chunk boundary is inside the track, the rows line up
    chunked = type(features)(speech, gen.audio_encoder, Fraction(25), chunk_frames=16, context=8)
    assert chunked.num_chunks == 4 and chunked.features(0, 50).shape == whole.shape
    torch.testing.assert_close(chunked.features(10, 30), chunked.features(0, 50)[10:30])


# ---------------------------------------------------------------- 4. guidance

class _PassSpy(torch.nn.Module):
    """A DiT stand-in whose velocity says which pass it is: 1 + (prompt) + 2 (audio)."""

    def __init__(self, dit):
        super().__init__()
        self.config, self.inner = dit.config, dit

    def audio_tokens(self, audio):
        return self.inner.audio_tokens(audio)

    def forward(self, x, sigma, text, clip_features, y, audio=None, *, audio_tokens=None):
        prompt = (text[:, :1, :1] > 0).float().view(-1, 1, 1, 1, 1)
        null = self.inner.audio_tokens(torch.zeros(1, 4 * (x.shape[2] - 1) + 1, 5, 3, 8))
        real = (~torch.isclose(audio_tokens, null.expand_as(audio_tokens))).flatten(1).any(1).float()
        return (1 + prompt + 2 * real.view(-1, 1, 1, 1, 1)).expand(x.shape[0], *x.shape[1:]).to(x.dtype)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode, text_scale, want", [
    ("ds-cfg", 5.0, None), ("cfg", 5.0, 1 + 5.0 * 1 + 4.0 * 2), ("none", 5.0, 3 + 5.0 * 1),
    ("cfg", 1.0, 2 + 4.0 * 2), ("none", 1.0, 4.0)])
def test_guidance_combines_the_passes(it_files, mode, text_scale, want, batched):
    gen = _generator(it_files, guidance=mode, text_scale=text_scale, extra={"batch_passes": batched})
    gen.dit = _PassSpy(gen.dit)
    gen.positive = torch.ones(1, 3, gen.dit.config.text_dim)
    gen.negative = -torch.ones(1, 3, gen.dit.config.text_dim)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    tm = v2v.time_map(9, 25, 25)
    _, mouth, width = v2v.window_mask(window, tm, tuple(state.z_src.shape[-2:]), 9, 0.15)
    weight = v2v.audio_weight(gen.options, mouth, width, tuple(state.z_src.shape[-2:]), CPU)
    out = gen._velocity(window.audio, state, weight, None)(state.z_src, torch.tensor(0.9), True)
    # uncond (neg, null) 1, drop_text (neg, audio) 3, cond (prompt, audio) 4, drop_audio (prompt, null) 2
    if want is None:
        w = weight(0.9)
        want = 1 + 5.0 * (4 - 3) + w * (3 - 1)
        assert float(weight(float(gen.options.tau)).max()) > 2.0 and float(w.min()) == 1.0 < float(w.max())
    torch.testing.assert_close(out, torch.as_tensor(want).expand_as(out).float())


def test_batched_passes_equal_one_by_one(it_files):
    """The three guidance passes in one batch give the velocities of three separate forwards (fp32, 1e-4)."""
    gen = _generator(it_files)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    weight = lambda sigma: 4.0                                  # noqa: E731
    x = 0.5 * state.z_src + 0.5 * state.noise
    first = state.z_src[:, :, :1]
    one = gen._velocity(window.audio, state, weight, first)(x, torch.tensor(0.5), True)
    gen.options.extra["batch_passes"] = False
    many = gen._velocity(window.audio, state, weight, first)(x, torch.tensor(0.5), True)
    assert one.abs().max() > 0
    torch.testing.assert_close(one, many, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- 5. memory options

def test_fp8_and_block_swap_stay_close_to_the_plain_path(it_files):
    """fp8 e4m3 weights made at load (one scale per Linear): the edited crops within 0.05 (of 1) of the fp32 path,
    mean error under 0.01; block swap (forced through the copy path on the CPU): equal to 1e-5."""
    plain = _generator(it_files, steps=3)
    window = _window(plain, 9, Fraction(25))
    ref = plain(window)
    fp8 = _generator(it_files, FAMILY.memory_plan(CPU, fp8=True), steps=3)
    assert any(isinstance(m, FP8Linear) for m in fp8.dit.modules())
    got = fp8(window)
    assert (got - ref).abs().max() < 0.05 and (got - ref).abs().mean() < 0.01
    swapped = _generator(it_files, FAMILY.memory_plan(CPU, swap_blocks=2), steps=3)
    assert swapped.dit.block_swap.num_swapped == 2 and "dit" not in swapped.parts
    swapped.dit.block_swap = BlockSwap(swapped.dit.blocks, 2, CPU, place=False, force=True)
    torch.testing.assert_close(swapped(window), ref, atol=1e-5, rtol=0)
    assert swapped.dit.block_swap.fetches > 0


# ---------------------------------------------------------------- 6. the CLI

def _video(path: Path, frames: torch.Tensor, fps) -> Path:
    with VideoWriter(path, fps, crf=18) as writer:
        writer.write(frames)
    return path


def _frames(n: int) -> torch.Tensor:
    return (talking_pattern(n) * 255).round().to(torch.uint8)


@pytest.mark.filterwarnings("ignore:No face was found")
def test_cli_runs_infinitetalk_from_a_models_folder_at_29_97_fps(it_files, tmp_path, capsys):
    """`omnisync lipsync --models-dir` finds the base, patch, CLIP vision, wav2vec2 and VAE by content; a 29.97 fps
    clip comes back with its own frame count and rate, bit-exact outside the crop."""
    from omnisync_core.cli import main
    from omnisync_core.face.crop import _footprint
    from omnisync_core.frames import lipsync_frames
    from omnisync_core.pipeline import LipSyncOptions
    from omnisync_core.plan import plan_lipsync
    from omnisync_core.sources import TensorFrames

    fps, n = Fraction(30000, 1001), 11
    clip = _video(tmp_path / "in.mp4", _frames(n), fps)
    speech = speech_tone(n / float(fps), seed=5)
    wav = write_wav(tmp_path / "speech.wav", speech.numpy(), SR)
    out = tmp_path / "out.mp4"
    assert main(["lipsync", "--video", str(clip), "--audio", str(wav), "--out", str(out),
                 "--models-dir", str(it_files["models"]), "--model", it_files["model"].name,
                 "--prompt-embeds", str(it_files["prompt_embeds"]), "--steps", "2", "--window", "9",
                 "--overlap", "2", "--crop-size", str(SIZE), "--detector", "none", "--box", "40,24,88,72",
                 "--length-policy", "video", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "with Wan2.1 I2V" in text and "demo model" not in text
    info = probe_video(out)
    assert info.num_frames == n and info.fps == fps

    # the same job on frames in memory: bit-exact outside the crop, changed inside
    gen = _generator(it_files, steps=2)
    frames = _frames(n)
    options = LipSyncOptions(window=9, overlap=2, crop_size=SIZE, box=(40, 24, 88, 72))
    result = lipsync_frames(frames, speech[None], SR, fps, gen, options=options)
    assert result.num_frames == n and result.fps == fps
    plan = plan_lipsync(AudioTrack.from_samples(speech[None], SR), TensorFrames(frames, fps), None, options)
    source = frames.float() / 255.0
    inside = torch.zeros(frames.shape[:3], dtype=torch.bool)
    for t in range(n):
        x0, y0, x1, y1 = _footprint(plan.params.frame_from_crop[t], SIZE, plan.params.frame_hw, pad=0)
        inside[t, y0:y1, x0:x1] = True
    assert inside.any() and not inside.all()
    assert torch.equal(result.frames[~inside], source[~inside])
    assert not torch.equal(result.frames[inside], source[inside])


def test_download_dry_run_plan(tmp_path, capsys):
    from omnisync_core.cli import main

    assert main(["download", "infinitetalk", "--models-dir", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    want = {"diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
            "model_patches/wan2.1_infiniteTalk_single_fp16.safetensors", "clip_vision/clip_vision_h.safetensors",
            "audio_encoders/wav2vec2-chinese-base_fp16.safetensors", "vae/wan_2.1_vae.safetensors",
            "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
    assert {line.split(" -> ")[1][len(str(tmp_path)) + 1:] for line in lines} == want
    assert not any(tmp_path.iterdir())                        # a dry run writes nothing
    # every file lands where --models-dir looks for its role
    roles = {c.role: c.folders for c in FAMILY.companions}
    for remote in FAMILY.downloads["infinitetalk"][1:]:
        assert any(remote.folder == folders[0] for folders in roles.values())
