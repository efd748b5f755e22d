"""The HuMo family: recognition (ComfyUI layout and the released key list), the noised source kept outside the
lower face at every step, fps mapping both ways, the guidance combination, and a whole job through the pipeline,
all on tiny random models (HuMo DiT, Wan VAE, Whisper) on the CPU."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from omnisync_core.audio.track import AudioTrack
from omnisync_core.errors import InputError
from omnisync_core.families import family, recognise, recognise_tensors
from omnisync_core.families.base import GenerationOptions, ModelFiles
from omnisync_core.families.files import resolve_files
from omnisync_core.families import v2v
from omnisync_core.families.humo import FAMILY, HumoFamily, HumoGenerator
from omnisync_core.face.crop import _footprint
from omnisync_core.frames import lipsync_frames
from omnisync_core.timeline import valid_window_length
from omnisync_core.io import VideoWriter, probe_video
from omnisync_core.job import WindowInput
from omnisync_core.model.humo import HumoDiT
from omnisync_core.model.loading import TensorInfo
from omnisync_core.pipeline import LipSyncOptions, LipSyncPipeline
from omnisync_core.plan import plan_lipsync
from omnisync_core.sampling import flow_sigmas, truncate_sigmas
from omnisync_core.sources import TensorFrames

from conftest import write_wav
from tiny_models import face_crops, speech_tone, write_tiny_humo

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."
SIZE = 64
SR = 16000


# ---------------------------------------------------------------- tiny files in their real layouts

@pytest.fixture(scope="module")
def humo_files(tmp_path_factory):
    return write_tiny_humo(tmp_path_factory.mktemp("humo"))


def _files(humo_files) -> ModelFiles:
    fam, files = resolve_files(str(humo_files["model"]), given={"vae": str(humo_files["vae"]),
                                                                "audio_encoder": str(humo_files["audio_encoder"])})
    assert fam is FAMILY
    files.prompt_embeds = humo_files["prompt_embeds"]
    return files


def _generator(humo_files, **options) -> HumoGenerator:
    opts = GenerationOptions(**{"steps": 6, **options})
    return FAMILY.load(_files(humo_files), FAMILY.memory_plan(torch.device("cpu")), opts)


def _window(gen: HumoGenerator, n: int, fps, start: int = 0, seed: int = 7) -> WindowInput:
    features = gen.audio_features(AudioTrack.from_samples(speech_tone(2.0), SR), fps)
    frames = torch.arange(start, start + n)
    mouth = torch.tensor([[SIZE * 0.5, SIZE * 0.62]]).expand(n, 2).clone()
    width = torch.full((n,), SIZE * 0.45)
    return WindowInput(face_crops(n), frames, fps, features.window(frames), mouth, width, None, seed,
                       torch.ones(n, dtype=torch.bool))


# ---------------------------------------------------------------- 1. recognition

def test_recognises_comfy_layout_and_released_manifest(humo_files):
    found = recognise(humo_files["model"])
    assert (found.kind, found.role, found.family) == ("humo", "model", "humo")
    assert found.label.startswith("HuMo") and found.params == sum(p.numel() for p in HumoDiT("tiny").parameters())
    assert family("humo") is FAMILY and isinstance(FAMILY, HumoFamily)
    doc = json.loads((FIXTURES / "manifests" / "humo_1.7B_fp16.json").read_text())
    tensors = {PREFIX + k: TensorInfo("F16", tuple(s)) for k, s in doc["tensors"].items()}
    real = recognise_tensors(tensors, {})
    assert (real.label, real.family, real.params) == ("HuMo 1.7B", "humo", 1_741_569_088)
    assert recognise_tensors({k: tuple(s) for k, s in doc["tensors"].items()}, {}).label == "HuMo 1.7B"
    big = json.loads((FIXTURES / "manifests" / "humo_17B_fp16.json").read_text())["tensors"]
    assert recognise_tensors({k: tuple(s) for k, s in big.items()}, {}).label == "HuMo 17B"
    # the companions, in their real layouts
    assert recognise(humo_files["vae"]).kind == "wan-vae"
    assert recognise(humo_files["audio_encoder"]).role == "audio_encoder"
    assert [c.role for c in FAMILY.companions] == ["vae", "audio_encoder", "text_encoder"]
    assert not FAMILY.companions[2].required
    assert FAMILY.window_length(Fraction(25)) == 97 and FAMILY.trained_fps == 25


def test_needs_text_conditioning(humo_files):
    files = _files(humo_files)
    files.prompt_embeds = None
    with pytest.raises(InputError, match="--text-encoder.*--prompt-embeds"):
        FAMILY.load(files, FAMILY.memory_plan(torch.device("cpu")), GenerationOptions(steps=2))
    # ComfyUI conditioning instead: a (positive, negative) pair of tensors
    c = HumoDiT("tiny").config
    files.conditioning = (torch.randn(1, 4, c.text_dim), [[torch.randn(1, 3, c.text_dim), {}]])
    gen = FAMILY.load(files, FAMILY.memory_plan(torch.device("cpu")), GenerationOptions(steps=2))
    assert gen.positive.shape == (1, 4, c.text_dim) and gen.negative.shape == (1, 3, c.text_dim)
    assert set(gen.parts) == {"dit", "vae", "audio"}
    assert set(gen.stage_parts) == {"audio", "encode", "sample", "decode"}


# ---------------------------------------------------------------- 2. the noised source outside the mask

def test_outside_the_mask_is_the_noised_source_at_every_step(humo_files):
    gen = _generator(humo_files)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    assert state.reference.shape == (1, 16, 1, SIZE // 8, SIZE // 8)
    run = truncate_sigmas(flow_sigmas(6, float(gen.options.shift)), float(gen.options.tau))
    mask = v2v.lower_face_mask(window.mouth_xy, window.face_width, SIZE, tuple(state.z_src.shape[-2:]),
                               dilation=float(gen.options.mask_dilation))
    keep = (mask > 0.5).view(1, 1, *mask.shape).expand_as(state.z_src)
    assert keep.any() and not keep.all()
    seen = []

    def spy(step, total, x):
        sigma = float(run[step])
        noised = (1.0 - sigma) * state.z_src + sigma * state.noise
        outside = ~keep
        assert torch.equal(x[outside], noised[outside]), f"step {step}: the latent left the source outside"
        assert not torch.allclose(x[keep], noised[keep]), f"step {step}: nothing changed inside the mask"
        seen.append((step, total))

    out = gen.sample(state, window, step_callback=spy)
    assert [s for s, _ in seen] == list(range(1, len(run))) and seen[-1][1] == len(run) - 1 >= 3
    assert gen.last_stats.steps == len(run) - 1
    crops = gen.decode(out, window)
    assert crops.shape == window.crops.shape and crops.dtype == torch.float32 and crops.device.type == "cpu"
    assert 0 <= float(crops.min()) and float(crops.max()) <= 1


# ---------------------------------------------------------------- 3. fps

def test_fps_maps_to_25_and_back(humo_files):
    gen = _generator(humo_files, steps=3)
    ntsc = _window(gen, 13, Fraction(30000, 1001), start=20)
    tm = v2v.time_map(13, ntsc.fps, 25)
    assert tm.model_frames == 11
    state = gen.encode(ntsc)
    assert state.model_frames == 11 and state.z_src.shape[2] == (valid_window_length(11) - 1) // 4 + 1
    assert ntsc.audio.shape[0] == state.z_src.shape[2]
    out = gen(ntsc)
    assert out.shape == ntsc.crops.shape
    # 25 fps maps identically: the latent is that of the crops themselves, one model frame per frame
    from omnisync_core.generator import encode_window
    same = _window(gen, 9, Fraction(25))
    state25 = gen.encode(same)
    z, noise = encode_window(gen.vae, same.crops, same.seed)
    assert state25.model_frames == 9 and torch.equal(state25.z_src, z) and torch.equal(state25.noise, noise)
    assert torch.equal(v2v.time_map(9, Fraction(25), 25).back, torch.arange(9))
    assert gen(same).shape == same.crops.shape
    unknown = _window(gen, 9, None)          # a window of no known rate: taken as it is
    assert gen(unknown).shape == unknown.crops.shape


# ---------------------------------------------------------------- guidance

class _PassSpy(torch.nn.Module):
    """A DiT stand-in whose velocity says which pass it is: 1 neg, 2 pos_t, 3 pos_ta, 4 pos_tia."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma, text, audio=None, reference=None):
        text_pos = (text[:, :1, :1] > 0).float().view(-1, 1, 1, 1, 1)      # positive text: +1 rows
        has_audio = (audio.abs().flatten(1).amax(1) > 0).float().view(-1, 1, 1, 1, 1)
        has_ref = (reference.abs().flatten(1).amax(1) > 0).float().view(-1, 1, 1, 1, 1)
        return (1 + text_pos + has_audio + has_ref).expand(x.shape[0], *x.shape[1:]).to(x.dtype)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode, audio_term", [("none", 1.0), ("cfg", 7.5), ("ds-cfg", None)])
def test_guidance_combines_the_four_passes(humo_files, mode, audio_term, batched):
    gen = _generator(humo_files, guidance=mode, extra={"batch_passes": batched})
    gen.dit = _PassSpy(gen.dit.config)
    gen.positive = torch.ones(1, 3, gen.dit.config.text_dim)
    gen.negative = -torch.ones(1, 3, gen.dit.config.text_dim)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    window.audio = window.audio + 1.0                       # no all-zero latent window
    mask, mouth, width = gen._mask_and_mouths(window, v2v.time_map(9, 25, 25), tuple(state.z_src.shape[-2:]), 9)
    weight = gen._audio_weight(mouth, width, tuple(state.z_src.shape[-2:]))
    v = gen._velocity(window.audio.to(torch.float32), state.reference + 1.0, weight)
    sigma = torch.tensor(0.9)
    out = v(state.z_src, sigma, True)
    # neg 1, pos_t 2, pos_ta 3, pos_tia 4: v = 1 + s_t (2 - 1) + W (3 - 2) + s_i (4 - 3)
    w = weight(0.9) if audio_term is None else audio_term
    want = 1 + 7.0 + w + 4.0
    torch.testing.assert_close(out, torch.as_tensor(want).expand_as(out).float())
    if audio_term is None:                                  # DS-CFG: peaks at the mouth, 1 far from it
        early, late = weight(float(gen.options.tau)), weight(0.3)
        assert float(early.max()) > 3.0 and float(early.min()) == 1.0 and float(late.max()) < float(early.max())


def test_batched_passes_equal_one_by_one(humo_files):
    """The four guidance passes in one batch give the velocities of four separate forwards."""
    gen = _generator(humo_files)
    window = _window(gen, 9, Fraction(25))
    state = gen.encode(window)
    weight = lambda sigma: 7.5                              # noqa: E731
    x = 0.5 * state.z_src + 0.5 * state.noise
    one = gen._velocity(window.audio, state.reference, weight)(x, torch.tensor(0.5), True)
    gen.options.extra["batch_passes"] = False
    many = gen._velocity(window.audio, state.reference, weight)(x, torch.tensor(0.5), True)
    assert one.abs().max() > 0
    torch.testing.assert_close(one, many, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("offload, swap", [("none", 1), ("sequential", 0)])
def test_block_swap_and_sequential_offload_equal_the_plain_path(humo_files, offload, swap):
    """Block swap (the first N blocks from host memory) and sequential offload (every block, one at a time) run the
    same blocks on copies of the same weights: forced through the copy path on the CPU they give the plain path's
    window to float tolerance (functional_call on cloned tensors may pick other kernels' blocking)."""
    from omnisync_core.model.block_swap import BlockSwap

    window = _window(_generator(humo_files, steps=3), 9, Fraction(25))
    ref = _generator(humo_files, steps=3)(window)
    plan = FAMILY.memory_plan(torch.device("cpu"), offload=offload, swap_blocks=swap)
    gen = FAMILY.load(_files(humo_files), plan, GenerationOptions(steps=3))
    n = gen.dit.config.num_layers if offload == "sequential" else swap
    assert gen.dit.block_swap.num_swapped == n and "dit" not in gen.parts
    gen.dit.block_swap = BlockSwap(gen.dit.blocks, n, torch.device("cpu"), place=False, force=True)
    torch.testing.assert_close(gen(window), ref, atol=1e-5, rtol=0)
    assert gen.dit.block_swap.fetches > 0
    with pytest.raises(InputError, match="swapped blocks"):
        FAMILY.load(_files(humo_files), FAMILY.memory_plan(torch.device("cpu"), swap_blocks=99),
                    GenerationOptions(steps=3))


# ---------------------------------------------------------------- 4. a whole job

def _video(path: Path, frames: torch.Tensor, fps) -> Path:
    with VideoWriter(path, fps, crf=18) as writer:
        writer.write(frames)
    return path


def _frames(n: int, h: int = 96, w: int = 128) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float32).view(-1, 1, 1)
    y = torch.linspace(0, 1, h).view(1, -1, 1)
    x = torch.linspace(0, 1, w).view(1, 1, -1)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.02 * t))
    g = 0.5 + 0.4 * torch.cos(2 * math.pi * (y - 0.015 * t))
    b = 0.3 + 0.6 * torch.exp(-(((x - 0.5) * w) ** 2 + ((y - 0.5) * h) ** 2) / (2 * 20.0 ** 2)).expand(n, -1, -1)
    rgb = torch.stack([r.expand(n, h, w), g.expand(n, h, w), b], -1)
    return (rgb * 255).round().to(torch.uint8)


@pytest.mark.filterwarnings("ignore:No face was found")
def test_whole_job_through_the_pipeline(humo_files, tmp_path):
    gen = _generator(humo_files, steps=4)
    n, fps = 14, Fraction(25)
    options = LipSyncOptions(window=9, overlap=2, crop_size=SIZE, box=(40, 24, 88, 72))
    speech = speech_tone(n / float(fps), seed=3)
    wav = write_wav(tmp_path / "speech.wav", speech.numpy(), SR)
    clip = _video(tmp_path / "in.mp4", _frames(n), fps)
    out = tmp_path / "out.mp4"
    report = LipSyncPipeline(gen, face_analyzer=None, options=options).run(str(clip), str(wav), str(out))
    info = probe_video(out)
    assert report.windows == 2 and report.frames == n
    assert info.num_frames == n and info.fps == fps

    # the same job on frames in memory: bit-exact outside the crop, changed inside
    frames = _frames(n)
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


@pytest.mark.filterwarnings("ignore:No face was found")
def test_cli_runs_humo_from_a_models_folder_at_29_97_fps(humo_files, tmp_path, capsys):
    """`omnisync lipsync --models-dir` finds HuMo's companions by content in ComfyUI's subfolders; a 29.97 fps clip
    comes back with its own frame count and rate (the model runs at 25 fps inside)."""
    import shutil

    from omnisync_core.cli import main

    models = tmp_path / "models"
    for role, folder in (("model", "diffusion_models"), ("vae", "vae"), ("audio_encoder", "audio_encoders")):
        (models / folder).mkdir(parents=True)
        shutil.copy(humo_files[role], models / folder / Path(humo_files[role]).name)
    fps = Fraction(30000, 1001)
    clip = _video(tmp_path / "in.mp4", _frames(11), fps)
    wav = write_wav(tmp_path / "speech.wav", speech_tone(11 / float(fps), seed=5).numpy(), SR)
    out = tmp_path / "out.mp4"
    assert main(["lipsync", "--video", str(clip), "--audio", str(wav), "--out", str(out), "--models-dir", str(models),
                 "--model", "humo_tiny.safetensors", "--prompt-embeds", str(humo_files["prompt_embeds"]),
                 "--steps", "2", "--window", "9", "--overlap", "2", "--crop-size", str(SIZE), "--detector", "none",
                 "--box", "40,24,88,72", "--length-policy", "video", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "with HuMo" in text and "demo model" not in text
    info = probe_video(out)
    assert info.num_frames == 11 and info.fps == fps


def test_retune_gives_a_loaded_generator_new_options(humo_files):
    """What the ComfyUI nodes rely on to keep one HuMo loaded between runs: new sampling options, the family's
    defaults for the rest, the same weights."""
    gen = _generator(humo_files)
    dit = gen.dit
    assert FAMILY.retune(gen, _files(humo_files), GenerationOptions(steps=3, guidance="cfg"))
    assert (gen.options.steps, gen.options.guidance, gen.options.text_scale, gen.options.tau) == (3, "cfg", 7.0, 0.92)
    assert gen.dit is dit
    assert not FAMILY.retune(object(), _files(humo_files), GenerationOptions())
