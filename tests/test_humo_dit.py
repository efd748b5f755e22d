"""HumoDiT: parity with upstream HuMo (fixture made by running Phantom-video/HuMo's WanModel), the guidance passes as
one batch, the released checkpoints' key/shape lists, and loading ComfyUI-layout safetensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnisync_core.errors import InputError
from omnisync_core.model.dit import Attention, WeightsError
from omnisync_core.model.humo import (
    HUMO_PRESETS, HumoDiT, humo_config, humo_config_from_shapes, humo_label, humo_param_count, humo_shapes, is_humo,
    load_humo,
)
from omnisync_core.model.loading import CheckpointMismatchError

FIXTURES = Path(__file__).parent / "fixtures"
T = 3                                    # video latent frames in the fixture (+ 1 reference frame)
PREFIX = "model.diffusion_model."
# fp32 on both sides; the differences are op order and RoPE angles (upstream fp32, ours fp64 then complex64).
# Measured max |diff| 7.2e-7 at outputs of magnitude ~2.7.
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURES / "humo" / "humo_tiny.safetensors")


@pytest.fixture(scope="module")
def model(fx):
    return load_humo({k[4:]: v for k, v in fx.items() if k.startswith("dit.")})


def manifest(name):
    doc = json.loads((FIXTURES / "manifests" / f"humo_{name}_fp16.json").read_text())
    return doc, {k: tuple(v) for k, v in doc["tensors"].items()}


def passes(fx):
    """forward_tia's passes (generate_1_7B.py): (name, reference frame, text, audio, sigma) as the fixture ran them."""
    ref, zero_ref = fx["in.reference"], torch.zeros_like(fx["in.reference"])
    audio, zero_audio = fx["in.audio"], torch.zeros_like(fx["in.audio"])
    s0, s1 = fx["in.sigma"]
    tp, tn = fx["in.text_pos"], fx["in.text_neg"]
    return [("neg", zero_ref, tn, zero_audio, s0), ("pos_t", zero_ref, tp, zero_audio, s0),
            ("pos_ta", zero_ref, tp, audio, s0), ("pos_tia", ref, tp, audio, s0), ("pos_tia_s2", ref, tp, audio, s1)]


def test_fixture_weights_are_the_tiny_preset(fx):
    weights = {k[4:]: tuple(v.shape) for k, v in fx.items() if k.startswith("dit.")}
    assert weights == humo_shapes("tiny")
    assert humo_config_from_shapes(weights) == HUMO_PRESETS["tiny"]


@pytest.mark.parametrize("index", range(5))
def test_matches_upstream_pass_by_pass(fx, model, index):
    """Each guidance pass alone: x = the latent's video frames, the reference (or zeros) appended by the model."""
    name, ref, text, audio, sigma = passes(fx)[index]
    with torch.no_grad():
        v = model(fx["in.latent"][:, :, :T], sigma, text, audio, ref)
    want = fx[f"out.{name}"][:, :, :T]          # upstream also returns the (discarded) reference frame
    assert v.shape == want.shape == (1, 16, T, 6, 8)
    torch.testing.assert_close(v, want, atol=ATOL, rtol=0)


def test_guidance_passes_as_one_batch(fx, model):
    """All five passes in one batch: per-item text (zero-padded to a common length), audio, reference and sigma."""
    ps = passes(fx)
    length = max(p[2].shape[1] for p in ps)
    text = torch.cat([torch.nn.functional.pad(p[2], (0, 0, 0, length - p[2].shape[1])) for p in ps])
    x = fx["in.latent"][:, :, :T].expand(len(ps), -1, -1, -1, -1)
    sigma, audio, ref = torch.stack([p[4] for p in ps]), torch.cat([p[3] for p in ps]), torch.cat([p[1] for p in ps])
    with torch.no_grad():
        v = model(x, sigma, text, audio, ref)
    want = torch.cat([fx[f"out.{p[0]}"][:, :, :T] for p in ps])
    torch.testing.assert_close(v, want, atol=ATOL, rtol=0)


def test_null_audio_forms(fx, model):
    """Zero windows for the reference frames may be left to the model; audio=None is HuMo's null audio (zeros)."""
    x, ref, text, audio, s = fx["in.latent"][:, :, :T], fx["in.reference"], fx["in.text_pos"], fx["in.audio"], 0.7
    with torch.no_grad():
        full = model(x, s, text, audio, ref)
        video_only = model(x, s, text, audio[:, :T], ref)
        null = model(x, s, text, None, torch.zeros_like(ref))
    torch.testing.assert_close(video_only, full, atol=0, rtol=0)
    torch.testing.assert_close(null, fx["out.pos_t"][:, :, :T], atol=ATOL, rtol=0)


def test_bad_inputs_are_one_clear_error(model):
    x, text = torch.zeros(1, 16, T, 6, 8), torch.zeros(1, 5, 32)
    windows = torch.zeros(1, T, 8, 5, 16)
    for bad in (dict(x=torch.zeros(1, 16, T, 5, 8)), dict(text=torch.zeros(1, 17, 32)), dict(text=None),
                dict(audio=torch.zeros(1, T + 2, 8, 5, 16)), dict(audio=torch.zeros(1, T, 8, 5, 1280)),
                dict(reference=torch.zeros(1, 16, 1, 6, 6)), dict(sigma=torch.zeros(3))):
        args = dict(x=x, sigma=0.5, text=text, audio=windows, reference=None) | bad
        with pytest.raises(InputError):
            model(**args)


def test_attention_context_dim():
    """dit.Attention's k/v may read a narrower context (HuMo's 1536-wide audio tokens); the default is unchanged."""
    a = Attention(40, 2, True, 1e-6, context_dim=24)
    assert a.k.weight.shape == a.v.weight.shape == (40, 24) and a.q.weight.shape == a.o.weight.shape == (40, 40)
    assert Attention(40, 2, True, 1e-6).k.weight.shape == (40, 40)


# ---------------------------------------------------------------- the released checkpoints' layouts

@pytest.mark.parametrize("name, preset, tensors, params", [
    ("1.7B", "humo-1.7b", 1193, 1_741_569_088),
    ("17B", "humo-17b", 1583, 17_055_925_312),
])
def test_released_layout(name, preset, tensors, params):
    """Key/shape list of Comfy-Org's file (made from ComfyUI's HumoWanModel on the meta device, equal to upstream)."""
    doc, shapes = manifest(name)
    assert len(shapes) == doc["num_tensors"] == tensors
    assert humo_shapes(preset) == shapes
    assert humo_param_count(preset) == doc["num_params"] == params
    assert humo_config_from_shapes(shapes) == HUMO_PRESETS[preset]
    prefixed = {PREFIX + k: s for k, s in shapes.items()}
    assert is_humo(prefixed) and humo_config_from_shapes(prefixed) == HUMO_PRESETS[preset]
    assert humo_label(humo_config_from_shapes(prefixed)) == f"HuMo {name}"


def test_17b_patch_embedding_takes_36_channels():
    _, shapes = manifest("17B")
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert humo_config_from_shapes(shapes).in_dim == 36


def test_not_humo_is_refused():
    _, shapes = manifest("1.7B")
    wan = {k: s for k, s in shapes.items() if "audio" not in k}
    assert not is_humo(wan)
    with pytest.raises(WeightsError, match="Wan2.1 DiT without HuMo's audio layers"):
        humo_config_from_shapes(wan)


# ---------------------------------------------------------------- loading safetensors

def tiny_comfy_file(path: Path, drop=None, reshape=None) -> Path:
    """A random tiny HuMo checkpoint as ComfyUI stores it: fp16, `model.diffusion_model.` prefix."""
    torch.manual_seed(0)
    sd = {k: v.half() for k, v in HumoDiT("tiny").state_dict().items()}
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = torch.zeros(3, *sd[reshape].shape[1:], dtype=torch.float16)
    save_file({PREFIX + k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_load_comfy_layout_fp16(tmp_path):
    path = tiny_comfy_file(tmp_path / "humo_tiny_fp16.safetensors")
    m = load_humo(path)
    assert m.config == humo_config("tiny") and not m.training
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    stored = load_file(path)
    assert all(torch.equal(v, stored[PREFIX + k]) for k, v in m.state_dict().items())
    m32 = load_humo(path, dtype="fp32", config="tiny")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    x, text, audio = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 3, 32), torch.randn(1, 2, 8, 5, 16)
    with torch.no_grad():
        v16, v32 = m(x, 0.5, text, audio), m32(x, 0.5, text, audio)
    assert v16.shape == v32.shape == (1, 16, 2, 4, 4) and torch.isfinite(v16).all()


@pytest.mark.parametrize("drop, reshape, says", [
    ("blocks.1.audio_cross_attn_wrapper.norm1_audio.bias", None,
     "1 missing: blocks.1.audio_cross_attn_wrapper.norm1_audio.bias"),
    (None, "blocks.0.audio_cross_attn_wrapper.audio_cross_attn.k.weight",
     "1 wrong shape: blocks.0.audio_cross_attn_wrapper.audio_cross_attn.k.weight: got (3, 24) vs expected (40, 24)"),
])
def test_mismatch_is_one_readable_error(tmp_path, drop, reshape, says):
    path = tiny_comfy_file(tmp_path / "bad.safetensors", drop=drop, reshape=reshape)
    with pytest.raises(CheckpointMismatchError) as err:
        load_humo(path)
    assert says in str(err.value) and "HuMo DiT (bad.safetensors)" in str(err.value)
    assert len(err.value.report.missing) + len(err.value.report.mismatched) == 1 and not err.value.report.unexpected
