"""In-memory lip sync (omnisync_core.frames): the staged functions the granular ComfyUI nodes call give exactly
what the one-call lipsync_frames gives, which matches the file pipeline; lengths, audio and fps are exact."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from omnisync_core.audio import FrameAligner, SAMPLE_RATE, to_whisper_rate
from omnisync_core.errors import AudioError, InputError
from omnisync_core.frames import (aligned_audio, audio_channels, crop_plan, decode_latents, embed_audio,
                                  fps_fraction, init_latents, lipsync_frames, paste_plan, plan_faces,
                                  sample_latents)
from omnisync_core.generator import OmniSyncGenerator, SamplerOptions
from omnisync_core.io import VideoReader, VideoWriter, probe_video
from omnisync_core.pipeline import LipSyncOptions, LipSyncPipeline, PassThroughGenerator
from omnisync_core.sampling import seeded_noise
from tiny_models import TINY_DEFAULTS, chirp, talking_pattern, tiny_parts

RATE = 22050


@pytest.fixture(scope="module")
def models():
    return tiny_parts(0)


def options(**overrides) -> LipSyncOptions:
    base = dict(window=TINY_DEFAULTS["window"], overlap=TINY_DEFAULTS["overlap"], crop_size=32, seed=5,
                box=(40, 24, 88, 72))
    base.update(overrides)
    return LipSyncOptions(**base)


def generator(models, steps=4, tau=0.92):
    dit, vae, whisper = models
    return OmniSyncGenerator(dit, vae, SamplerOptions(steps=steps, tau=tau), audio_encoder=whisper, audio_before=1,
                             audio_after=1)


def test_fps_fraction_snaps_host_floats_to_exact_rates():
    assert fps_fraction(30000 / 1001) == Fraction(30000, 1001)
    assert fps_fraction(24000 / 1001) == Fraction(24000, 1001)
    assert fps_fraction(25.0) == 25 and fps_fraction(12.5) == Fraction(25, 2)
    assert fps_fraction(23.976) == Fraction(24000, 1001) and fps_fraction(29.97) == Fraction(30000, 1001)
    assert fps_fraction(59.94) == Fraction(60000, 1001) and fps_fraction(29.9) == Fraction(299, 10)
    assert fps_fraction(24.0) == 24 and fps_fraction(30.0) == 30 and fps_fraction(23.5) == Fraction(47, 2)
    assert fps_fraction("30000/1001") == Fraction(30000, 1001)
    with pytest.raises(InputError):
        fps_fraction(0.0)


def test_audio_channels_normalises_host_layouts():
    pcm = (torch.linspace(-1, 1, 200) * 32767).round().to(torch.int16)
    samples, rate = audio_channels(torch.stack([pcm, -pcm]).unsqueeze(0), 16000.0)
    assert samples.dtype == torch.float32 and samples.shape == (2, 200) and rate == 16000
    assert torch.allclose(samples[0], pcm.float() / 32768) and torch.allclose(samples[1], -pcm.float() / 32768)
    assert audio_channels(torch.zeros(50), 8000)[0].shape == (1, 50)
    with pytest.raises(AudioError):
        audio_channels(torch.zeros(2, 1, 10), 8000)
    with pytest.raises(AudioError):
        audio_channels(torch.zeros(1, 0), 8000)
    with pytest.raises(AudioError):
        audio_channels(torch.full((1, 10), float("nan")), 8000)
    padded = aligned_audio(torch.ones(2, 100), 1000, 5, Fraction(25))
    assert padded.shape == (2, 200) and padded[:, 100:].abs().sum() == 0


@pytest.mark.parametrize("policy", ["pingpong", "trim", "video"])
def test_pass_through_keeps_frames_and_aligns_length_and_audio(policy):
    frames = talking_pattern(10)
    audio = chirp(0.9)                                  # 22.5 frames at 25 fps -> 23 frames
    result = lipsync_frames(frames, audio.unsqueeze(0), RATE, 25.0, PassThroughGenerator(),
                            options=options(length_policy=policy))
    speech = to_whisper_rate(audio.mean(0), RATE)
    audio_frames = FrameAligner(25).num_frames(speech.shape[0], SAMPLE_RATE)
    expected = {"pingpong": audio_frames, "trim": 10, "video": 10}[policy]
    assert result.num_frames == expected and result.fps == 25
    assert result.audio.shape == (2, FrameAligner(25).num_samples(expected, RATE))
    assert torch.equal(result.audio[:, :min(result.audio.shape[1], audio.shape[1])],
                       audio[:, :result.audio.shape[1]])
    index = torch.arange(expected)
    if policy == "pingpong":
        index = torch.where(index % 18 < 10, index % 18, 18 - index % 18)
    # crop -> paste back of an unchanged crop: near-identical inside the crop, exact outside it
    diff = (result.frames - frames[index]).abs()
    assert diff.max() < 0.02 and diff.mean() < 1e-3
    assert torch.equal(result.frames[:, :, :16], frames[index][:, :, :16])


def test_staged_functions_equal_lipsync_frames(models):
    dit, vae, whisper = models
    frames = talking_pattern(13)
    audio = chirp(0.6, channels=1)
    opts = options()
    whole = lipsync_frames(frames, audio, RATE, 25.0, generator(models), options=opts)
    assert whole.num_frames == 15 and whole.windows == 2

    gen = generator(models)
    embeds = embed_audio(audio, RATE, gen, 25.0)
    assert embeds.num_frames == 15 and embeds.fps == 25
    plan = plan_faces(frames, embeds, None, opts)
    crops = crop_plan(frames, plan)
    assert crops.shape == (15, 32, 32, 3) and plan.editable.all()
    latents = init_latents(crops, gen, plan, opts.window, opts.overlap, tau=0.92, seed=opts.seed)
    assert [len(w.window) for w in latents.windows] == [9, 8] and not latents.sampled
    with pytest.raises(InputError, match="not been sampled"):
        decode_latents(latents, gen)
    first = latents.windows[0].state
    assert first.z_src.shape == first.noise.shape and first.z is None
    sampled = sample_latents(latents, gen, embeds, plan)
    assert sampled.sampled and not latents.sampled
    edited = decode_latents(sampled, gen)
    out = paste_plan(frames, edited, plan)
    assert torch.allclose(out, whole.frames, atol=1e-6)
    assert torch.equal(plan.output_audio().read_all(), whole.audio)
    # the model really edits the face: the crops changed, the frame outside the crop did not
    assert (edited - crops).abs().mean() > 1e-3
    assert torch.equal(out[:, :, :16], frames[plan.index][:, :, :16])
    # the noise of a window depends on the seed and the window's start only
    other = init_latents(crops, gen, plan, opts.window, opts.overlap, tau=0.92, seed=opts.seed + 7)
    second = other.windows[1]
    assert torch.equal(second.state.noise, seeded_noise(second.state.z_src.shape, opts.seed + 7 + second.window.start))
    assert not torch.equal(other.windows[0].state.noise, latents.windows[0].state.noise)


def test_sampler_checks_its_inputs(models):
    dit, vae, whisper = models
    frames = talking_pattern(9)
    audio = chirp(0.36, channels=1)
    embeds = embed_audio(audio, RATE, generator(models), 25.0)
    plan = plan_faces(frames, embeds, None, options())
    latents = init_latents(crop_plan(frames, plan), generator(models), plan, 9, 2, tau=0.5, seed=0)
    with pytest.raises(InputError, match="tau"):
        sample_latents(latents, generator(models, tau=0.92), embeds, plan)
    wrong = embed_audio(audio, RATE, generator(models), 30.0)
    with pytest.raises(InputError, match="fps"):
        sample_latents(latents, generator(models, tau=0.5), wrong, plan)
    with pytest.raises(InputError, match="made for 9 frames"):
        crop_plan(frames[:5], plan)


def test_matches_the_file_pipeline(tmp_path, models):
    """lipsync_frames on the decoded frames of a file gives the file pipeline's output (up to the codec)."""
    dit, vae, whisper = models
    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, 25, crf=0) as writer:
        writer.write((talking_pattern(12) * 255).round().to(torch.uint8))
    audio = chirp(0.52, channels=1)
    from conftest import write_wav
    wav = write_wav(tmp_path / "speech.wav", audio[0].numpy(), RATE)
    opts = options()
    out = tmp_path / "out.mp4"
    report = LipSyncPipeline(generator(models), None, None, opts).run(str(clip), str(wav), str(out))
    with VideoReader(clip) as reader:
        source = reader.read_all()
    from omnisync_core.audio import load_audio
    wave = load_audio(wav)
    result = lipsync_frames(source, wave.samples, wave.sample_rate, 25.0, generator(models), options=opts)
    assert result.num_frames == report.frames == probe_video(out).num_frames
    # the random model draws noise-like texture that the codec cannot keep: compare both through the same codec
    again = tmp_path / "again.mp4"
    with VideoWriter(again, 25) as writer:
        writer.write((result.frames * 255).round().to(torch.uint8))
    with VideoReader(out) as first, VideoReader(again) as second:
        a, b = first.read_all().float() / 255, second.read_all().float() / 255
    assert 10 * torch.log10(1 / (a - b).pow(2).mean()) > 40
