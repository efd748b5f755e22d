"""The ComfyUI nodes, in-process against a real ComfyUI checkout ($COMFYUI_PATH; skipped without it): schemas and
tooltips, model folders, the loader, the one-node and granular lip sync (they agree exactly), the streaming video
node, progress, Cancel, lazy AUDIO mappings and integer PCM."""

from __future__ import annotations

import os
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from comfy_helpers import InProcessComfy, requires_comfyui, temp_root
from tiny_models import chirp, talking_pattern, write_tiny_bundle

pytestmark = requires_comfyui

RATE = 22050
NODE_IDS = ["OmniSyncModelLoader", "OmniSyncAudioEncode", "OmniSyncFaceCrop", "OmniSyncNoiseInit", "OmniSyncSampler",
            "OmniSyncDecode", "OmniSyncPasteBack", "OmniSyncLipSync", "OmniSyncLipSyncVideo"]
DEFAULTS = {"crop_size": 32, "window": 9, "overlap": 2, "steps": 4, "tau": 0.92, "shift": 5.0, "audio_before": 1,
            "audio_after": 1}
FACE = dict(length_policy="pingpong", detector="none", face_index=-1, box="40,24,88,72", crop_size=0, crop_margin=0.3)


class LazyAudio(Mapping):
    """What VideoHelperSuite passes: a Mapping that decodes on access, not a dict."""

    def __init__(self, waveform, rate):
        self._data = {"waveform": waveform, "sample_rate": rate}
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return 2


@pytest.fixture(scope="module")
def cf():
    root = temp_root("omnisync-nodes-")
    instance = InProcessComfy(root)
    write_tiny_bundle(root / "models" / "omnisync" / "tiny.safetensors", defaults=DEFAULTS)
    return instance


@pytest.fixture(scope="module")
def model(cf):
    return cf.run("OmniSyncModelLoader", model="tiny.safetensors", vae="from bundle",
                     audio_encoder="from bundle", precision="auto", download="")[0]


def lipsync_inputs(**overrides):
    base = dict(seed=3, steps=0, guidance="ds-cfg", tau=0.0, window=0, overlap=-1, color_match=False, **FACE)
    base.update(overrides)
    return base


def test_every_node_is_described_and_every_input_has_a_tooltip(cf):
    assert cf.pack.__all__ == ["comfy_entrypoint"]
    assert not hasattr(cf.pack, "NODE_CLASS_MAPPINGS")
    for node_id in NODE_IDS:
        cls = cf.node(node_id)
        schema = cls.GET_SCHEMA()
        assert schema.category == "OmniSync" and len(schema.description) > 40, node_id
        for item in schema.inputs:
            assert item.tooltip and len(item.tooltip) > 10, (node_id, item.id)
        for item in schema.outputs:
            assert item.tooltip, (node_id, item.id)
        info = cls.GET_NODE_INFO_V1()
        assert info["description"] == schema.description
    types = {o.io_type for n in NODE_IDS for o in cf.node(n).GET_SCHEMA().outputs}
    assert {"OMNISYNC_MODEL", "OMNISYNC_AUDIO_EMBEDS", "OMNISYNC_FACE_TRACK", "OMNISYNC_LATENTS"} <= types


def test_model_folders_and_loader_choices(cf, model):
    fp = cf.folder_paths
    paths, extensions = fp.folder_names_and_paths["omnisync"]
    assert paths[0] == str(cf.root / "models" / "omnisync")           # the extra path is kept, first
    assert paths[1] == os.path.join(fp.models_dir, "omnisync") and extensions == {".safetensors"}
    options = cf.node("OmniSyncModelLoader").GET_SCHEMA().inputs[0].options
    assert options[0] == "omnisync_demo (bundled)" and "tiny.safetensors" in options
    assert model.name == "tiny" and model.defaults["crop_size"] == 32 and model.dtype == torch.float32
    assert set(model.patchers) == {"dit", "vae", "audio"}


def test_loader_errors_are_clear_and_download_is_opt_in(cf, tmp_path):
    errors = cf.core("errors")
    demo = cf.core("model.bundle").DEMO_MODEL
    if not Path(demo).is_file():
        with pytest.raises(errors.InputError, match="demo model is not installed"):
            cf.run("OmniSyncModelLoader", model="omnisync_demo (bundled)", vae="from bundle",
                      audio_encoder="from bundle", precision="auto", download="")
    with pytest.raises(errors.InputError, match="owner/repo/file.safetensors"):
        cf.run("OmniSyncModelLoader", model="tiny.safetensors", vae="from bundle", audio_encoder="from bundle",
                  precision="auto", download="just-a-name.ckpt")
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"                                    # no network in tests
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    with pytest.raises(errors.InputError, match="could not download"):
        cf.run("OmniSyncModelLoader", model="tiny.safetensors", vae="from bundle", audio_encoder="from bundle",
                  precision="auto", download="nobody/nothing/missing.safetensors")
    pickle = cf.root / "models" / "omnisync" / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, pickle)
    try:
        with pytest.raises(errors.InputError, match="(?i)pickle|safetensors"):
            cf.run("OmniSyncModelLoader", model="evil.safetensors", vae="from bundle",
                      audio_encoder="from bundle", precision="auto", download="")
    finally:
        pickle.unlink()


def test_lip_sync_node_aligns_length_audio_and_fps(cf, model):
    import comfy.model_management as mm

    frames = talking_pattern(10)
    pcm = (chirp(0.8) * 32767).round().to(torch.int16).unsqueeze(0)      # int16 PCM [1, 2, N], as core video decode
    audio = LazyAudio(pcm, RATE)
    fps = float(Fraction(30000, 1001))
    images, out_audio, count, out_fps = cf.run("OmniSyncLipSync", model=model, images=frames, audio=audio,
                                                  fps=fps, **lipsync_inputs()).args
    aligner = cf.core("audio.align").FrameAligner(Fraction(30000, 1001))
    resampled = cf.core("audio.resample").to_whisper_rate(pcm[0].float().mean(0) / 32768, RATE)
    expected = aligner.num_frames(resampled.shape[0], 16000)
    assert count == expected == images.shape[0] == 24 and out_fps == fps
    assert images.shape[1:] == frames.shape[1:] and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert out_audio["sample_rate"] == RATE and out_audio["waveform"].dtype == torch.float32
    assert out_audio["waveform"].shape == (1, 2, aligner.num_samples(expected, RATE))
    assert set(audio.reads) == {"waveform", "sample_rate"}
    # the model went through ComfyUI's model management
    assert any(p is model.patchers["dit"] for p in mm.loaded_models())


def test_granular_nodes_equal_the_one_node(cf, model):
    import comfy.utils

    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: calls.append((value, total)))
    try:
        _granular(cf, model, calls)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def _granular(cf, model, calls):
    def reported() -> bool:                  # the node drove ComfyUI's progress bar to its end
        done = bool(calls) and calls[-1][0] == calls[-1][1]
        calls.clear()
        return done

    frames = talking_pattern(12)
    audio = {"waveform": chirp(0.6, channels=1).unsqueeze(0), "sample_rate": RATE}
    whole = cf.run("OmniSyncLipSync", model=model, images=frames, audio=audio, fps=25.0, **lipsync_inputs())
    calls.clear()
    embeds, audio_frames = cf.run("OmniSyncAudioEncode", model=model, audio=audio, fps=25.0).args
    assert reported()
    crops, track, count = cf.run("OmniSyncFaceCrop", model=model, images=frames, audio_embeds=embeds,
                                    **FACE).args
    assert reported()
    assert count == audio_frames == 15 and crops.shape == (15, 32, 32, 3)
    latents = cf.run("OmniSyncNoiseInit", model=model, crops=crops, face_track=track, tau=0.0, seed=3,
                        window=0, overlap=-1)[0]
    assert reported()
    assert latents.tau == pytest.approx(0.92) and len(latents.windows) == 2
    sampled = cf.run("OmniSyncSampler", model=model, latents=latents, audio_embeds=embeds, face_track=track,
                        steps=0, guidance="ds-cfg", omega_peak=4.5, omega_base=1.0, gamma=1.5, s_ratio=0.15,
                        floor=1.0, cfg_scale=4.5)[0]
    assert reported()
    edited = cf.run("OmniSyncDecode", model=model, latents=sampled)[0]
    assert reported()
    images, out_audio, n, fps = cf.run("OmniSyncPasteBack", images=frames, crops=edited, face_track=track,
                                          feather=0.1, color_match=False).args
    assert reported()
    assert torch.allclose(images, whole[0], atol=1e-6)
    assert torch.equal(out_audio["waveform"], whole[1]["waveform"]) and n == whole[2] == 15 and fps == 25.0
    assert (edited - crops).abs().mean() > 1e-3                          # the model edited the mouth region


def _write_clip(path: Path, frames: torch.Tensor, fps) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in (frames * 255).round().to(torch.uint8).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _count_frames(path) -> tuple[int, bool]:
    import av

    with av.open(str(path)) as container:
        has_audio = bool(container.streams.audio)
        return sum(1 for _ in container.decode(video=0)), has_audio


def test_video_node_streams_to_the_output_folder(cf, model):
    from comfy_api.latest import InputImpl

    import comfy.utils

    clip = _write_clip(cf.root / "input" / "clip.mp4", talking_pattern(14), 25)
    audio = {"waveform": chirp(0.7).unsqueeze(0), "sample_rate": RATE}
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None, **_: calls.append(
        (value, total)))
    try:
        result = cf.run("OmniSyncLipSyncVideo", model=model, video=InputImpl.VideoFromFile(str(clip)),
                           audio=audio, filename_prefix="video/test", **lipsync_inputs())
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    video, out_audio, count, fps = result.args
    saved = result.ui.as_dict()["images"][0]
    path = cf.root / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and path.suffix == ".mp4" and Path(video.get_stream_source()) == path
    frames, has_audio = _count_frames(path)
    assert frames == count == 18 and has_audio and fps == 25.0
    assert out_audio["waveform"].shape == (1, 2, 18 * RATE // 25)
    assert video.get_dimensions() == (128, 96)
    assert [p.name for p in path.parent.iterdir() if "partial" in p.name or p.name.startswith(".")] == []
    assert calls and calls[-1][0] == calls[-1][1]                          # the bar ran and finished
    # a VIDEO that is not a file on disk (frames in memory) goes through a temporary file that is removed after
    components = InputImpl.VideoFromComponents(comfy_api_components(talking_pattern(6), 25))
    again = cf.run("OmniSyncLipSyncVideo", model=model, video=components, audio=audio,
                      filename_prefix="video/test", **lipsync_inputs(length_policy="trim"))
    assert again.args[2] == 6 and list((cf.root / "temp").glob("*.mp4")) == []


def comfy_api_components(frames, fps):
    from comfy_api.latest import Types

    return Types.VideoComponents(images=frames, audio=None, frame_rate=Fraction(fps))


def test_cancel_stops_between_steps_and_leaves_no_file(cf, model):
    from comfy_api.latest import InputImpl

    import comfy.model_management as mm
    import comfy.utils

    clip = _write_clip(cf.root / "input" / "cancel.mp4", talking_pattern(9), 25)
    audio = {"waveform": chirp(1.0).unsqueeze(0), "sample_rate": RATE}
    seen = []

    def hook(value, total, preview, node_id=None, **_):
        seen.append(value)
        if len(seen) == 3:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    before = set((cf.root / "output").rglob("*"))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            cf.run("OmniSyncLipSyncVideo", model=model, video=InputImpl.VideoFromFile(str(clip)), audio=audio,
                      filename_prefix="video/cancel", **lipsync_inputs())
        with pytest.raises(mm.InterruptProcessingException):
            mm.interrupt_current_processing(False)
            seen.clear()
            cf.run("OmniSyncLipSync", model=model, images=talking_pattern(9), audio=audio, fps=25.0,
                      **lipsync_inputs())
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert set((cf.root / "output").rglob("*")) == before


# ------------------------------------------------------------------------------------------- the HuMo family

HUMO = dict(steps=2, guidance="auto", tau=0.0, window=9, overlap=2, color_match=False, seed=3,
            **{**FACE, "crop_size": 64})


@pytest.fixture(scope="module")
def humo(cf):
    """Tiny random HuMo files in ComfyUI's folders (added the way extra_model_paths.yaml adds them), a umT5 with
    its sentencepiece model embedded, and the loader's model for them."""
    from test_text_tokenizer import train_spiece
    from tiny_models import write_tiny_humo

    models = cf.root / "humo_models"
    (cf.root / "spiece").mkdir(exist_ok=True)
    files = write_tiny_humo(models, train_spiece(cf.root / "spiece"))
    for folder in ("diffusion_models", "vae", "audio_encoders", "text_encoders"):
        cf.folder_paths.add_model_folder_path(folder, str(models / folder))
    return files


def _humo_loader(cf, **inputs):
    base = dict(model="humo_tiny.safetensors", vae="from bundle", audio_encoder="from bundle", precision="fp32",
                download="", text_encoder="auto", clip_vision="auto", patch="auto", offload="none", fp8=False,
                swap_blocks=0, prompt="", negative_prompt="")
    return cf.run("OmniSyncModelLoader", **{**base, **inputs})[0]


def test_loader_offers_and_resolves_the_humo_family(cf, humo, capsys):
    schema = cf.node("OmniSyncModelLoader").define_schema()
    choices = next(i for i in schema.inputs if i.id == "model").options
    assert "humo_tiny.safetensors" in choices and choices[0] == "omnisync_demo (bundled)"
    loaded = _humo_loader(cf)
    assert loaded.family.name == "humo" and loaded.files.recognition.label.startswith("HuMo")
    assert {r: p.name for r, p in loaded.files.companions.items()} == {
        "vae": "wan_tiny_vae.safetensors", "audio_encoder": "whisper_tiny_hf.safetensors",
        "text_encoder": "umt5_tiny.safetensors"}
    assert "HuMo" in capsys.readouterr().out
    errors = cf.core("errors")
    with pytest.raises(errors.InputError, match="takes no text"):
        cf.run("OmniSyncModelLoader", model="tiny.safetensors", vae="from bundle", audio_encoder="from bundle",
               precision="auto", download="", positive=[[torch.zeros(1, 4, 32), {}]],
               negative=[[torch.zeros(1, 4, 32), {}]])
    with pytest.raises(errors.InputError, match="both positive and negative"):
        _humo_loader(cf, positive=[[torch.zeros(1, 4, 32), {}]])


@pytest.mark.filterwarnings("ignore:No face was found")
def test_humo_runs_in_one_node_granular_and_streaming_at_29_97_fps(cf, humo):
    """The one-node lip sync with HuMo keeps a 29.97 fps clip's frame count and rate (HuMo runs at 25 fps inside)
    and every pixel outside the crop; the granular stages give the same frames; the streaming node writes the
    file; a second run with other settings reuses the loaded weights."""
    model = _humo_loader(cf)
    fps = float(Fraction(30000, 1001))
    frames = talking_pattern(11)
    audio = {"waveform": chirp(11 / fps, channels=1).unsqueeze(0), "sample_rate": RATE}
    images, out_audio, count, out_fps = cf.run("OmniSyncLipSync", model=model, images=frames, audio=audio, fps=fps,
                                               length_policy="video",
                                               **{k: v for k, v in HUMO.items() if k != "length_policy"}).args
    assert count == images.shape[0] == 11 and out_fps == fps
    changed = (images != frames).any(-1).any(0)
    assert changed.any() and not (changed & ~_crop_footprint(cf, frames)).any()
    loaded = cf.pack.nodes._comfy._LOADED
    generator = next(iter(loaded.values()))
    # granular, same settings: the same frames, from the same loaded generator
    embeds, _ = cf.run("OmniSyncAudioEncode", model=model, audio=audio, fps=fps).args
    crops, track, n = cf.run("OmniSyncFaceCrop", model=model, images=frames, audio_embeds=embeds,
                             **{**FACE, "crop_size": 64, "length_policy": "video"}).args
    latents = cf.run("OmniSyncNoiseInit", model=model, crops=crops, face_track=track, tau=0.0, seed=3, window=9,
                     overlap=2)[0]
    sampled = cf.run("OmniSyncSampler", model=model, latents=latents, audio_embeds=embeds, face_track=track,
                     steps=2, guidance="auto", omega_peak=4.5, omega_base=1.0, gamma=1.5, s_ratio=0.15, floor=1.0,
                     cfg_scale=4.5)[0]
    edited = cf.run("OmniSyncDecode", model=model, latents=sampled)[0]
    pasted = cf.run("OmniSyncPasteBack", images=frames, crops=edited, face_track=track, feather=0.1,
                    color_match=False)[0]
    assert n == 11 and torch.allclose(pasted, images, atol=1e-5)
    assert next(iter(loaded.values())) is generator and generator.options.steps == 2
    # streaming, other steps: the file has the clip's frames; the weights were not loaded again
    from comfy_api.latest import InputImpl

    clip = _write_clip(cf.root / "input" / "humo.mp4", frames, Fraction(30000, 1001))
    result = cf.run("OmniSyncLipSyncVideo", model=model, video=InputImpl.VideoFromFile(str(clip)), audio=audio,
                    filename_prefix="video/humo", length_policy="video",
                    **{k: v for k, v in {**HUMO, "steps": 3}.items() if k != "length_policy"})
    saved = result.ui.as_dict()["images"][0]
    written, has_audio = _count_frames(cf.root / "output" / saved["subfolder"] / saved["filename"])
    assert written == result.args[2] == 11 and has_audio and result.args[3] == fps
    assert next(iter(loaded.values())) is generator and generator.options.steps == 3


def _crop_footprint(cf, frames):
    """Pixels any frame's crop can touch (the paste-back's support), from the job's own plan."""
    core = cf.core("plan")
    options = cf.core("pipeline").LipSyncOptions(crop_size=64, box=[40.0, 24.0, 88.0, 72.0], window=9, overlap=2,
                                                 length_policy="video")
    track = cf.core("audio.track").AudioTrack.from_samples(chirp(frames.shape[0] / 29.97, channels=1), RATE)
    source = cf.core("sources").TensorFrames(frames, Fraction(30000, 1001))
    plan = core.plan_lipsync(track, source, None, options)
    footprint = torch.zeros(frames.shape[1:3], dtype=torch.bool)
    for t in range(plan.num_frames):
        x0, y0, x1, y1 = cf.core("face.crop")._footprint(plan.params.frame_from_crop[t], 64, plan.frame_hw, pad=0)
        footprint[y0:y1, x0:x1] = True
    return footprint


def test_humo_takes_comfyui_conditioning(cf, humo):
    """positive / negative CONDITIONING wired into the loader become HuMo's text features, in place of the umT5
    file's encoding of the prompt."""
    g = torch.Generator().manual_seed(11)
    pos, neg = torch.randn(1, 6, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    model = _humo_loader(cf, positive=[[pos, {"pooled_output": None}]], negative=[[neg, {}]])
    generator = model.generator()
    assert torch.equal(generator.positive, pos) and torch.equal(generator.negative, neg)
    errors = cf.core("errors")
    wrong = _humo_loader(cf, positive=[[torch.zeros(1, 4, 48), {}]], negative=[[torch.zeros(1, 4, 48), {}]])
    with pytest.raises(errors.InputError, match="48-wide"):
        wrong.generator()


# ------------------------------------------------------------------------------------- the LatentSync family

@pytest.fixture(scope="module")
def latentsync(cf):
    """Tiny random LatentSync files (UNet3D, Whisper, SD VAE) in ComfyUI's folders."""
    from tiny_models import write_tiny_latentsync

    models = cf.root / "latentsync_models"
    files = write_tiny_latentsync(models)
    for folder in ("diffusion_models", "vae", "audio_encoders"):
        cf.folder_paths.add_model_folder_path(folder, str(models / folder))
    return files


@pytest.mark.filterwarnings("ignore:No face was found")
def test_latentsync_runs_in_one_node_and_granular_with_its_16_frame_windows(cf, latentsync):
    """LatentSync through the nodes: the loader finds its VAE and Whisper, window 0 / overlap -1 take its 16-frame
    windows back to back (the last one padded), a 29.97 fps clip keeps its frame count and rate, no pixel outside
    the crop changes, and the granular stages give the one-node's frames."""
    model = _humo_loader(cf, model="latentsync_tiny.safetensors")
    assert model.family.name == "latentsync" and model.window_rule == "any"
    assert {r: p.name for r, p in model.files.companions.items()} == {
        "vae": "sd_vae_tiny.safetensors", "audio_encoder": "latentsync_whisper_tiny.safetensors"}
    fps = float(Fraction(30000, 1001))
    frames = talking_pattern(21)
    audio = {"waveform": chirp(21 / fps, channels=1).unsqueeze(0), "sample_rate": RATE}
    settings = dict(steps=2, guidance="auto", tau=0.0, window=0, overlap=-1, color_match=False, seed=3,
                    **{**FACE, "crop_size": 64, "length_policy": "video"})
    images, _, count, out_fps = cf.run("OmniSyncLipSync", model=model, images=frames, audio=audio, fps=fps,
                                       **settings).args
    assert count == images.shape[0] == 21 and out_fps == fps
    changed = (images != frames).any(-1).any(0)
    assert changed.any() and not (changed & ~_crop_footprint(cf, frames)).any()
    embeds, _ = cf.run("OmniSyncAudioEncode", model=model, audio=audio, fps=fps).args
    crops, track, _ = cf.run("OmniSyncFaceCrop", model=model, images=frames, audio_embeds=embeds,
                             **{**FACE, "crop_size": 64, "length_policy": "video"}).args
    latents = cf.run("OmniSyncNoiseInit", model=model, crops=crops, face_track=track, tau=0.0, seed=3, window=0,
                     overlap=-1)[0]
    assert [(w.start, w.stop) for w in latents.plan.windows] == [(0, 16), (16, 21)]
    sampled = cf.run("OmniSyncSampler", model=model, latents=latents, audio_embeds=embeds, face_track=track,
                     steps=2, guidance="auto", omega_peak=4.5, omega_base=1.0, gamma=1.5, s_ratio=0.15, floor=1.0,
                     cfg_scale=4.5)[0]
    edited = cf.run("OmniSyncDecode", model=model, latents=sampled)[0]
    pasted = cf.run("OmniSyncPasteBack", images=frames, crops=edited, face_track=track, feather=0.1,
                    color_match=False)[0]
    assert torch.allclose(pasted, images, atol=1e-5)


# ----------------------------------------------------------------------------------- the InfiniteTalk family

@pytest.fixture(scope="module")
def infinitetalk(cf):
    """Tiny random InfiniteTalk files (Wan I2V base, adapter patch, CLIP vision, wav2vec2, Wan VAE) in ComfyUI's
    folders."""
    from tiny_models import write_tiny_infinitetalk

    models = cf.root / "infinitetalk_models"
    files = write_tiny_infinitetalk(models)
    for folder in ("diffusion_models", "model_patches", "clip_vision", "vae", "audio_encoders"):
        cf.folder_paths.add_model_folder_path(folder, str(models / folder))
    return files


@pytest.mark.filterwarnings("ignore:No face was found")
def test_infinitetalk_runs_from_its_base_patch_and_comfyui_conditioning(cf, infinitetalk):
    """InfiniteTalk through the nodes: the loader pairs the Wan I2V base with its adapter from model_patches and
    finds CLIP vision, wav2vec2 and the VAE; the text comes from ComfyUI's CONDITIONING; a 29.97 fps clip keeps its
    frame count and rate and every pixel outside the crop."""
    g = torch.Generator().manual_seed(12)
    pos, neg = torch.randn(1, 6, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    model = _humo_loader(cf, model="wan_i2v_tiny_fp16.safetensors", positive=[[pos, {}]], negative=[[neg, {}]])
    assert model.family.name == "infinitetalk"
    found = {r: p.name for r, p in model.files.companions.items() if r != "text_encoder"}   # HuMo's umT5 may be
    assert found == {                                                                   # there: not needed here
        "patch": "infinitetalk_tiny_fp16.safetensors", "clip_vision": "clip_tiny.safetensors",
        "audio_encoder": "wav2vec2_tiny.safetensors", "vae": "wan_tiny_vae.safetensors"}
    fps = float(Fraction(30000, 1001))
    frames = talking_pattern(11)
    audio = {"waveform": chirp(11 / fps, channels=1).unsqueeze(0), "sample_rate": RATE}
    images, _, count, out_fps = cf.run("OmniSyncLipSync", model=model, images=frames, audio=audio, fps=fps,
                                       length_policy="video",
                                       **{k: v for k, v in HUMO.items() if k != "length_policy"}).args
    assert count == images.shape[0] == 11 and out_fps == fps
    changed = (images != frames).any(-1).any(0)
    assert changed.any() and not (changed & ~_crop_footprint(cf, frames)).any()
