"""The family layer: recognition from headers (the real files' key and shape manifests, our bundles, companions),
finding files in a ComfyUI models folder, the opt-in download plan, and the shared video-to-video tools."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from omnisync_core.cli import main
from omnisync_core.errors import InputError
from omnisync_core.families import UnknownModelError, families, family, recognise, recognise_tensors
from omnisync_core.families.download import download, download_plan
from omnisync_core.families.files import resolve_files
from omnisync_core.families.v2v import SourceReinjection, lower_face_mask, model_frame0, time_map
from omnisync_core.generator import latent_groups
from omnisync_core.face.types import point_index
from omnisync_core.model.bundle import DEMO_MODEL
from omnisync_core.model.loading import TensorInfo

MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"


def _manifest(name: str, part: str = "tensors") -> dict[str, TensorInfo]:
    entries = json.loads((MANIFESTS / name).read_text())[part]
    out = {}
    for key, value in entries.items():
        if isinstance(value, dict):
            out[key] = TensorInfo(value.get("dtype", "F16"), tuple(value["shape"]))
        elif value and isinstance(value[0], str):
            out[key] = TensorInfo(value[0], tuple(value[1]))
        else:
            out[key] = TensorInfo("F16", tuple(value))
    return out


@pytest.mark.parametrize("name, part, label, role", [
    ("infinitetalk_single.json", "tensors", "InfiniteTalk adapter for Wan2.1 I2V 14B", "patch"),
    ("latentsync_1.6_unet.json", "tensors", "LatentSync 1.6 UNet", "model"),
    ("latentsync_sd_vae.json", "diffusers", "Stable Diffusion VAE", "vae"),
    ("umt5_xxl_fp16.json", "tensors", "umT5-xxl", "text_encoder"),
    ("umt5_xxl_fp8_e4m3fn_scaled.json", "tensors", "umT5-xxl", "text_encoder"),
    ("wan21_i2v_14b.json", "tensors", "Wan2.1 I2V 14B", "model"),
    ("whisper_large_v3_fp16.json", "tensors", "Whisper large-v3 encoder", "audio_encoder"),
])
def test_real_layouts_are_recognised(name, part, label, role):
    found = recognise_tensors(_manifest(name, part), {}, name)
    assert found.label.startswith(label) and found.role == role


@pytest.mark.parametrize("name, label", [("humo_1.7B_fp16.json", "HuMo 1.7B"), ("humo_17B_fp16.json", "HuMo 17B")])
def test_humo_layouts_are_recognised(name, label):
    if "humo" not in families():
        pytest.skip("the humo family module is not in this checkout")
    found = recognise_tensors(_manifest(name), {}, name)
    assert (found.label, found.family, found.role) == (label, "humo", "model")
    assert 1.7e9 < found.params < 1.8e9 if "1.7B" in label else found.params > 1.6e10


def test_demo_is_the_omnisync_family_and_says_what_it_is(capsys):
    found = recognise(DEMO_MODEL)
    assert (found.family, found.label, found.role) == ("omnisync", "OmniSync demo", "model")
    fam, files = resolve_files(None, default_model=DEMO_MODEL)
    assert fam is family("omnisync") and files.companions == {}
    assert "synthetic cartoon faces" in fam.notice_for(files) and "humo" in fam.notice_for(files).lower()
    assert fam.defaults_for(files)["crop_size"] == 64          # the bundle's own defaults win
    assert main(["check-model", str(DEMO_MODEL)]) == 0
    assert "OmniSync demo: model of the omnisync family, 9.14 M parameters" in capsys.readouterr().out


def test_unknown_file_gets_one_line_naming_the_families(tmp_path, capsys):
    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(UnknownModelError):
        recognise(tmp_path / "foo.safetensors")
    assert main(["check-model", str(tmp_path / "foo.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "OmniSync (omnisync)" in err and "foo.safetensors" in err


def _tiny_whisper(path: Path) -> Path:
    from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig

    torch.manual_seed(0)
    save_file(WhisperEncoder(WhisperEncoderConfig(d_model=64, n_heads=2, n_layers=1)).state_dict(), str(path))
    return path


def _tiny_wan_vae(path: Path) -> Path:
    from omnisync_core.model.vae import WanVAE, WanVAEConfig

    save_file({k: v.contiguous() for k, v in WanVAE(WanVAEConfig(dim=8)).state_dict().items()},
              str(path))
    return path


def _tiny_dit(path: Path) -> Path:
    from omnisync_core.model.dit import OmniSyncDiT, get_config
    from omnisync_core.model.loading import save_model

    torch.manual_seed(0)
    dit = OmniSyncDiT(get_config("tiny", audio_dim=64))
    dit.set_text_context(torch.randn(1, dit.config.text_len, dit.config.text_dim))
    return save_model(dit, path, kind="dit")


def test_models_dir_finds_companions_by_content_not_name(tmp_path):
    models = tmp_path / "models"
    for folder in ("diffusion_models", "vae", "audio_encoders"):
        (models / folder).mkdir(parents=True)
    _tiny_dit(models / "diffusion_models" / "my_dit.safetensors")
    _tiny_wan_vae(models / "vae" / "renamed_vae.safetensors")
    _tiny_whisper(models / "audio_encoders" / "speech.safetensors")
    (models / "vae" / "broken.safetensors").write_bytes(b"not a header")       # skipped, not fatal
    notes = []
    fam, files = resolve_files("my_dit.safetensors", str(models), notes=notes)
    assert fam.name == "omnisync" and files.recognition.label == "OmniSync DiT"
    assert files.companions == {"vae": models / "vae" / "renamed_vae.safetensors",
                                "audio_encoder": models / "audio_encoders" / "speech.safetensors"}
    with pytest.raises(InputError, match="OmniSync DiT needs wan_2.1_vae.safetensors"):
        resolve_files(str(models / "diffusion_models" / "my_dit.safetensors"))
    with pytest.raises(InputError, match="is Whisper"):
        resolve_files("my_dit.safetensors", str(models), {"vae": str(models / "audio_encoders" / "speech.safetensors")})
    _tiny_whisper(tmp_path / "secret.safetensors")
    with pytest.raises(Exception, match="outside the models folder"):
        resolve_files("../../secret.safetensors", str(models))


def test_lipsync_cli_runs_a_dit_found_in_models_dir(tmp_path, capsys):
    from conftest import write_wav
    from tiny_models import chirp, talking_pattern

    from omnisync_core.io import VideoWriter, probe_video

    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "vae").mkdir()
    (models / "audio_encoders").mkdir()
    _tiny_dit(models / "diffusion_models" / "dit.safetensors")
    _tiny_wan_vae(models / "vae" / "vae.safetensors")
    _tiny_whisper(models / "audio_encoders" / "whisper.safetensors")
    video, audio, out = tmp_path / "in.mp4", tmp_path / "in.wav", tmp_path / "out.mp4"
    with VideoWriter(video, Fraction(30000, 1001)) as writer:
        writer.write(talking_pattern(7, 64, 64))
    write_wav(audio, chirp(0.3, 16000, 1)[0].numpy(), 16000)
    assert main(["lipsync", "--video", str(video), "--audio", str(audio), "--out", str(out), "--models-dir",
                 str(models), "--model", "dit.safetensors", "--steps", "2", "--window", "5", "--overlap", "1",
                 "--crop-size", "32", "--detector", "none", "--length-policy", "video", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "with OmniSync DiT (cpu, float32)" in text and "demo model" not in text
    info = probe_video(out)
    assert info.num_frames == 7 and Fraction(info.fps) == Fraction(30000, 1001)


def test_download_is_a_plan_until_asked_and_keeps_what_is_there(tmp_path, capsys):
    plan = download_plan("humo-1.7b", tmp_path)
    assert [t.relative_to(tmp_path).parts[0] for _, t in plan] == ["diffusion_models", "audio_encoders", "vae",
                                                                   "text_encoders"]
    assert main(["download", "humo-1.7b", "--models-dir", str(tmp_path), "--dry-run"]) == 0
    assert "humo_1.7B_fp16.safetensors" in capsys.readouterr().out and not any(tmp_path.iterdir())
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "wan_2.1_vae.safetensors").write_bytes(b"kept")
    asked = []

    def fake_fetch(repo, path, cache_dir):                  # stands in for the hub: no network in tests
        asked.append(path)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        local = Path(cache_dir) / Path(path).name
        local.write_bytes(b"x")
        return str(local)

    got = download("humo-1.7b", tmp_path, say=lambda line: None, fetch=fake_fetch)
    assert len(got) == 4 and all(p.is_file() for p in got) and len(asked) == 3
    assert (tmp_path / "vae" / "wan_2.1_vae.safetensors").read_bytes() == b"kept"
    assert not list(tmp_path.rglob(".*.download"))
    with pytest.raises(InputError, match="known: humo-1.7b"):
        download_plan("nothing", tmp_path)


def test_window_length_follows_the_trained_span():
    class Trained(type(family("omnisync"))):
        trained_fps, trained_window = Fraction(25), 97

    fam = Trained()
    assert fam.window_length(Fraction(25)) == 97
    assert fam.window_length(Fraction(30000, 1001)) == 113
    assert fam.window_length(Fraction(50)) == 193 and fam.window_length(Fraction(12)) == 45
    assert fam.window_length(Fraction(25), requested=33) == 33


def test_time_map_keeps_frame_count_and_is_identity_at_the_trained_rate():
    same = time_map(97, Fraction(25), 25)
    assert torch.equal(same.source, torch.arange(97)) and torch.equal(same.back, torch.arange(97))
    ntsc = time_map(113, Fraction(30000, 1001), 25)
    assert ntsc.model_frames == 94 and ntsc.back.shape[0] == 113
    assert int(ntsc.back.max()) == 93 and int(ntsc.source.max()) <= 112
    values = torch.arange(113.0)
    round_trip = ntsc.to_window(ntsc.to_model(values))
    assert (round_trip - values).abs().max() <= 1        # each frame maps to a model frame at most one frame away
    assert model_frame0(30, Fraction(30), 25) == 25 and model_frame0(0, Fraction(30), 25) == 0


def _points(n: int, jaw=(20.0, 44.0), nose=30.0, chin=56.0, y=40.0) -> torch.Tensor:
    points = torch.zeros(n, 16, 2)
    points[:, point_index("right_jaw")] = torch.tensor([jaw[0], y])
    points[:, point_index("left_jaw")] = torch.tensor([jaw[1], y])
    points[:, point_index("nose_tip")] = torch.tensor([32.0, nose])
    points[:, point_index("chin")] = torch.tensor([32.0, chin])
    return points


def test_lower_face_mask_covers_the_mouth_not_the_eyes_and_grows_with_dilation():
    n, mouth, width = 5, torch.tensor([[32.0, 45.0]] * 5), torch.full((5,), 40.0)
    mask = lower_face_mask(mouth, width, 64, (16, 16), _points(n), dilation=0.0)
    assert mask.shape == (2, 16, 16)                      # latent frame 0 alone, then frames 1-4
    assert mask[0, 45 // 4, 32 // 4] == 1 and mask[0, 20 // 4, 32 // 4] == 0 and mask[0, 2, 2] == 0
    wider = lower_face_mask(mouth, width, 64, (16, 16), _points(n), dilation=0.3)
    assert bool((wider >= mask).all()) and wider.sum() > mask.sum()
    moving = _points(n)
    moving[4, :, 1] += 8.0                                 # the last frame's face moved down: the union covers it
    union = lower_face_mask(mouth, width, 64, (16, 16), moving, dilation=0.0)
    assert union[1].sum() > mask[1].sum() and torch.equal(union[0], mask[0])
    no_points = lower_face_mask(mouth, width, 64, (16, 16), None)
    assert no_points[0, 45 // 4, 32 // 4] == 1 and no_points[0, 2, 2] == 0
    assert torch.equal(latent_groups(9), torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2]))


def test_reinjection_equals_the_noised_source_outside_the_mask_at_every_step():
    from omnisync_core.sampling import flow_sigmas, sample, truncate_sigmas

    torch.manual_seed(0)
    z_src, noise = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 2, 8, 8)
    mask = torch.zeros(2, 8, 8)
    mask[:, 3:6, 2:6] = 1
    project = SourceReinjection(z_src, noise, mask)
    sigmas = flow_sigmas(6, 3.0)
    seen = []

    def velocity(x, sigma, with_audio):
        return torch.sin(3 * x) + 0.5                      # anything: the projection must hold regardless

    def check(step, total, x):
        seen.append(x.clone())

    x, stats = sample(velocity, z_src, noise, sigmas, 0.9, callback=check, project=project)
    run = [float(s) for s in truncate_sigmas(sigmas, 0.9)]
    outside = (mask == 0).view(1, 1, 2, 8, 8).expand_as(z_src)
    for step, latent in enumerate(seen):
        expect = project.noised_source(run[step + 1]) if step + 1 < len(run) else z_src
        assert torch.equal(latent[outside], expect[outside])
        assert not torch.allclose(latent[~outside], expect[~outside])
    assert torch.equal(x[outside], z_src[outside])         # sigma 0 at the end: exactly the source there


def test_download_list_names_every_family_download(capsys):
    assert main(["download", "--list"]) == 0
    text = capsys.readouterr().out
    assert "humo-1.7b: HuMo (Apache-2.0), 4 files" in text and "humo_1.7B_fp16.safetensors (3.48 GB)" in text
    assert main(["download", "humo-1.7b"]) == 2                    # no folder to put the files in: one line
    assert "--models-dir" in capsys.readouterr().err


def test_index_of_several_folders_per_role(tmp_path):
    """ComfyUI may keep a role's files in several places (extra_model_paths.yaml): the index reads them all, says
    which subfolder each came from, and ranks the usual folder and file name first."""
    from omnisync_core.families.base import Companion
    from omnisync_core.families.files import ModelIndex
    from omnisync_core.model.vae import WanVAE

    state = {k: v.contiguous() for k, v in WanVAE("tiny").state_dict().items()}
    first, second, other = tmp_path / "a" / "vae", tmp_path / "b" / "vae", tmp_path / "c" / "checkpoints"
    for folder, name in ((first, "some_vae.safetensors"), (second, "wan_2.1_vae.safetensors"),
                         (other, "wan_2.1_vae.safetensors")):
        folder.mkdir(parents=True)
        save_file(state, str(folder / name))
    (first / "junk.safetensors").write_bytes(b"not a safetensors file")
    index = ModelIndex.from_folders({"vae": [first, second], "checkpoints": [other]}, "ComfyUI's models")
    assert set(index.folder.values()) == {"vae", "checkpoints"} and list(index.skipped) == [first / "junk.safetensors"]
    ranked = index.candidates(Companion("vae", ("wan-vae",), "wan_2.1_vae.safetensors"))
    assert ranked == [second / "wan_2.1_vae.safetensors", first / "some_vae.safetensors",
                      other / "wan_2.1_vae.safetensors"]
