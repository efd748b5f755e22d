"""Wan2.1 I2V + InfiniteTalk DiT: parity with upstream InfiniteTalk (fixture made by running its WanModel), the guidance
passes as one batch, the released checkpoints' key/shape lists, loading base + patch from safetensors, and fp8."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnisync_core.errors import InputError
from omnisync_core.model.dit import WeightsError
from omnisync_core.model.loading import CheckpointMismatchError, read_header
from omnisync_core.model.quant import FP8Linear
from omnisync_core.model.wan_i2v import (
    WAN_I2V_PRESETS, WanI2VDiT, audio_windows, infinitetalk_patch_config_from_shapes, infinitetalk_patch_label,
    is_infinitetalk_key, is_infinitetalk_patch, is_wan_i2v, linear_weight_names, load_wan_i2v, to_comfy_fp8_scaled,
    wan_i2v_config, wan_i2v_config_from_shapes, wan_i2v_label, wan_i2v_param_count, wan_i2v_shapes,
)

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."
# fp32 on both sides; the differences are op order and RoPE angles (upstream rotates in float64, we in complex64).
# Measured max |diff| 7.2e-7 at outputs of magnitude ~3.3.
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fx():
    return load_file(FIXTURES / "infinitetalk" / "wan_i2v_tiny.safetensors")


def weights(fx):
    return {k[4:]: v for k, v in fx.items() if k.startswith("dit.")}


@pytest.fixture(scope="module")
def model(fx):
    return load_wan_i2v(weights(fx))


def passes(fx):
    """(name, text, audio windows, sigma) of each upstream pass; None audio = upstream's zero-feature null audio."""
    s0, s1 = fx["in.sigma"]
    a, zero = fx["in.audio"], torch.zeros_like(fx["in.audio"])
    return [("cond", fx["in.text_pos"], a, s0), ("drop_text", fx["in.text_neg"], a, s0),
            ("uncond", fx["in.text_neg"], None, s0), ("drop_audio", fx["in.text_pos"], zero, s0),
            ("cond_s2", fx["in.text_pos"], a, s1), ("cond_late", fx["in.text_pos"], fx["in.audio_late"], s0)]


def test_fixture_weights_are_the_tiny_preset(fx):
    shapes = {k: tuple(v.shape) for k, v in weights(fx).items()}
    assert shapes == wan_i2v_shapes("tiny")
    assert wan_i2v_config_from_shapes(shapes) == WAN_I2V_PRESETS["tiny"]


@pytest.mark.parametrize("index", range(6))
def test_matches_upstream_pass_by_pass(fx, model, index):
    name, text, audio, sigma = passes(fx)[index]
    with torch.no_grad():
        v = model(fx["in.x"], sigma, text, fx["in.clip"], fx["in.y"], audio)
    assert v.shape == fx[f"out.{name}"].shape == (1, 16, 3, 6, 8)
    torch.testing.assert_close(v, fx[f"out.{name}"], atol=ATOL, rtol=0)


def test_audio_proj_and_windows_match_upstream(fx, model):
    """audio_proj's tokens (latent frame 0 and the later frames' 8-feature windows) and multitalk.py's windowing."""
    with torch.no_grad():
        torch.testing.assert_close(model.audio_tokens(fx["in.audio"]), fx["out.tokens"], atol=1e-6, rtol=0)
        torch.testing.assert_close(model.audio_tokens(torch.zeros_like(fx["in.audio"])), fx["out.tokens_null"],
                                   atol=1e-6, rtol=0)
    assert torch.equal(audio_windows(fx["in.features"], 0, 9)[None], fx["in.audio"])
    assert torch.equal(audio_windows(fx["in.features"], 3, 9)[None], fx["in.audio_late"])  # clamped at the end


def test_guidance_passes_as_one_batch(fx, model):
    """All passes in one batch: per-item text (zero-padded to a common length), audio (zeros = null) and sigma."""
    ps = passes(fx)
    length = max(p[1].shape[1] for p in ps)
    text = torch.cat([torch.nn.functional.pad(p[1], (0, 0, 0, length - p[1].shape[1])) for p in ps])
    audio = torch.cat([torch.zeros_like(fx["in.audio"]) if p[2] is None else p[2] for p in ps])
    sigma = torch.stack([p[3] for p in ps])
    x = fx["in.x"].expand(len(ps), -1, -1, -1, -1)
    with torch.no_grad():
        v = model(x, sigma, text, fx["in.clip"], fx["in.y"], audio)
    torch.testing.assert_close(v, torch.cat([fx[f"out.{p[0]}"] for p in ps]), atol=ATOL, rtol=0)


def test_audio_tokens_and_scale(fx, model):
    """Precomputed tokens give the same result; audio_scale 1 is exact; scale 0 is the Wan base without the adapter."""
    x, y, clip, text, audio, s = fx["in.x"], fx["in.y"], fx["in.clip"], fx["in.text_pos"], fx["in.audio"], 0.7
    base_sd = {k: v for k, v in weights(fx).items() if not is_infinitetalk_key(k)}
    base = load_wan_i2v(base_sd)
    assert not base.config.audio and not hasattr(base, "audio_proj")
    with torch.no_grad():
        v = model(x, s, text, clip, y, audio)
        assert torch.equal(model(x, s, text, clip, y, audio_tokens=model.audio_tokens(audio)), v)
        assert torch.equal(model(x, s, text, clip, y, audio, audio_scale=1.0), v)
        plain = base(x, s, text, clip, y)
        assert torch.equal(model(x, s, text, clip, y, audio, audio_scale=0.0), plain)
        two = model(x.expand(2, -1, -1, -1, -1), s, text, clip, y, audio, audio_scale=torch.tensor([1.0, 0.0]))
    # a batch of 2 may take other (bit-different) matmul paths than a batch of 1, and which depends on the thread
    # count: fp32 round-off only (seen: 1.1e-6 on outputs of about 1 with one thread)
    torch.testing.assert_close(two, torch.cat([v, plain]), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_one_clear_error(fx, model):
    good = dict(x=fx["in.x"], sigma=0.5, text=fx["in.text_pos"], clip_features=fx["in.clip"], y=fx["in.y"],
                audio=fx["in.audio"])
    for bad in (dict(x=torch.zeros(1, 16, 3, 5, 8)), dict(text=torch.zeros(1, 17, 32)), dict(text=None),
                dict(clip_features=torch.zeros(1, 257, 1280)), dict(y=torch.zeros(1, 16, 3, 6, 8)),
                dict(audio=torch.zeros(1, 8, 5, 3, 8)), dict(audio=torch.zeros(1, 9, 5, 12, 768)),
                dict(sigma=torch.zeros(3))):
        with pytest.raises(InputError):
            model(**(good | bad))
    with pytest.raises(InputError, match="no InfiniteTalk adapter"):
        WanI2VDiT(wan_i2v_config("tiny", audio=False))(**good)


# ---------------------------------------------------------------- the released checkpoints' layouts

def manifest(name):
    doc = json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())
    return doc, {k: tuple(v) for k, v in doc["tensors"].items()}


def test_base_layout_is_wan21_i2v_14b():
    """Key/shape list of the official shards / Comfy-Org's repack (upstream WanModel on the meta device = ComfyUI)."""
    doc, shapes = manifest("wan21_i2v_14b")
    assert len(shapes) == doc["num_tensors"] == 1303
    assert wan_i2v_shapes("wan2.1-i2v-14b") == shapes
    assert wan_i2v_param_count("wan2.1-i2v-14b") == doc["num_params"] == 16_394_878_784
    for keys in (shapes, {PREFIX + k: s for k, s in shapes.items()}):
        assert is_wan_i2v(keys) and not is_infinitetalk_patch(keys)
        cfg = wan_i2v_config_from_shapes(keys)
        assert cfg == WAN_I2V_PRESETS["wan2.1-i2v-14b"] and wan_i2v_label(cfg) == "Wan2.1 I2V 14B"
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)


def test_adapter_layout_is_infinitetalk_single():
    """The 330 adapter keys (MeiGen's file and Comfy-Org's model patch share the names), 2.49 B parameters."""
    doc, shapes = manifest("infinitetalk_single")
    assert len(shapes) == doc["num_tensors"] == 330 and all(is_infinitetalk_key(k) for k in shapes)
    full = wan_i2v_shapes("infinitetalk-14b")
    assert {k: s for k, s in full.items() if is_infinitetalk_key(k)} == shapes
    assert wan_i2v_param_count("infinitetalk-14b", "adapter") == doc["num_params"] == 2_487_168_000
    assert wan_i2v_param_count("infinitetalk-14b") == 18_882_046_784
    assert is_infinitetalk_patch(shapes) and not is_wan_i2v(shapes)
    patch = infinitetalk_patch_config_from_shapes(shapes)
    assert patch.apply(WAN_I2V_PRESETS["wan2.1-i2v-14b"]) == WAN_I2V_PRESETS["infinitetalk-14b"]
    assert infinitetalk_patch_label(patch) == "InfiniteTalk adapter for Wan2.1 I2V 14B (2.49 B params)"
    merged = manifest("wan21_i2v_14b")[1] | shapes
    assert wan_i2v_config_from_shapes(merged) == WAN_I2V_PRESETS["infinitetalk-14b"]
    assert wan_i2v_label(WAN_I2V_PRESETS["infinitetalk-14b"]) == "Wan2.1 I2V 14B + InfiniteTalk"


def test_fp8_scaled_layout_rule():
    """Comfy-Org's fp8_scaled layout (the manifest's second list): our writer's rule on the 14B's keys, and the writer
    itself on the tiny model (same key kinds and dtypes)."""
    doc, shapes = manifest("wan21_i2v_14b")
    fp8 = {k: (v["dtype"], tuple(v["shape"])) for k, v in doc["fp8_scaled_tensors"].items()}
    with torch.device("meta"):
        linears = set(linear_weight_names(WanI2VDiT("wan2.1-i2v-14b")))
    want = {"scaled_fp8": ("F8_E4M3", (0,))}
    for k, s in shapes.items():
        if k in linears:
            want |= {k: ("F8_E4M3", s), k[:-6] + "scale_weight": ("F32", ()), k[:-6] + "scale_input": ("F32", ())}
        else:
            want[k] = ("F16", s)
    assert fp8 == want and len(linears) == 488
    torch.manual_seed(0)
    tiny = {k: v for k, v in WanI2VDiT(wan_i2v_config("tiny", audio=False)).state_dict().items()}
    out = to_comfy_fp8_scaled(tiny)
    st = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.float16: "F16"}
    kinds = lambda d: {(k.rsplit(".", 1)[-1] if "." in k else k, st[v.dtype], len(v.shape)) for k, v in d.items()}
    big = {(k.rsplit(".", 1)[-1] if "." in k else k, dt, len(s)) for k, (dt, s) in fp8.items()}
    assert kinds(out) == big


def test_not_wan_i2v_is_refused():
    _, shapes = manifest("wan21_i2v_14b")
    t2v = {k: s for k, s in shapes.items() if "img" not in k}
    assert not is_wan_i2v(t2v)
    with pytest.raises(WeightsError, match="Wan text-to-video"):
        wan_i2v_config_from_shapes(t2v)
    with pytest.raises(WeightsError, match="audio_proj.proj1"):
        infinitetalk_patch_config_from_shapes(shapes)
    humo = json.loads((FIXTURES / "manifests" / "humo_17B_fp16.json").read_text())["tensors"]
    assert not is_wan_i2v(humo) and not is_infinitetalk_patch(humo)     # HuMo 17B: 36 channels, no CLIP path


# ---------------------------------------------------------------- loading safetensors

def tiny_files(tmp_path: Path, fx, shards: int = 1, drop=None, dtype=torch.float16):
    """The tiny base in ComfyUI's layout (fp16, prefix) split into `shards` files, and the adapter patch (bare keys)."""
    sd = {k: v.to(dtype) for k, v in weights(fx).items()}
    if drop:
        del sd[drop]
    base = sorted(k for k in sd if not is_infinitetalk_key(k))
    paths = []
    for i in range(shards):
        p = tmp_path / f"base_{i}.safetensors"
        save_file({PREFIX + k: sd[k].contiguous() for k in base[i::shards]}, str(p))
        paths.append(p)
    patch = tmp_path / "wan2.1_infiniteTalk_single_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if is_infinitetalk_key(k)}, str(patch))
    return paths, patch


def test_load_base_shards_plus_patch(tmp_path, fx):
    paths, patch = tiny_files(tmp_path, fx, shards=2)
    assert is_infinitetalk_patch({k: i.shape for k, i in read_header(patch)[0].items()})
    m = load_wan_i2v(paths, patch)
    assert m.config == WAN_I2V_PRESETS["tiny"] and not m.training
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    m32 = load_wan_i2v(paths, patch, dtype="fp32")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    ref = weights(fx)
    assert all(torch.equal(v, ref[k].half().float()) for k, v in m32.state_dict().items())
    with torch.no_grad():
        v = m32(fx["in.x"], 0.7, fx["in.text_pos"], fx["in.clip"], fx["in.y"], fx["in.audio"])
    # fp16-rounded weights: the output moves by the weights' rounding, not more
    torch.testing.assert_close(v, fx["out.cond"], atol=2e-2, rtol=0)


@pytest.mark.parametrize("drop, says", [
    ("blocks.1.norm_x.bias", "1 missing: blocks.1.norm_x.bias"),
    ("blocks.0.cross_attn.k_img.weight", "1 missing: blocks.0.cross_attn.k_img.weight"),
])
def test_mismatch_is_one_readable_error(tmp_path, fx, drop, says):
    paths, patch = tiny_files(tmp_path, fx, drop=drop)
    with pytest.raises(CheckpointMismatchError) as err:
        load_wan_i2v(paths, patch, config="tiny")
    assert says in str(err.value) and "Wan2.1 I2V DiT (base_0.safetensors, wan2.1_infiniteTalk" in str(err.value)


def test_patch_for_another_base_is_refused(tmp_path, fx):
    paths, patch = tiny_files(tmp_path, fx)
    sd = {k: v for k, v in load_file(patch).items() if not k.startswith("blocks.1.")}
    short = tmp_path / "short_patch.safetensors"
    save_file(sd, str(short))
    with pytest.raises(WeightsError, match="1-block"):
        load_wan_i2v(paths, short)


# ---------------------------------------------------------------- fp8 weight storage

def test_fp8_scaled_round_trip(tmp_path, fx):
    """fp16 file -> Comfy-Org fp8_scaled file -> float8 weights computed in bf16, against the bf16 model.

    Tolerance: e4m3 keeps 3 mantissa bits (a weight is off by up to 1/16 of its value, ~2.5% RMS), so the velocity
    moves by a few percent of its RMS: measured 4.2% here (bf16 alone, against fp32: 0.35%); asserted < 8%."""
    sd16 = {k: v.half() for k, v in weights(fx).items()}
    fp8_sd = to_comfy_fp8_scaled(sd16)
    path = tmp_path / "wan_i2v_tiny_fp8_scaled.safetensors"
    save_file(fp8_sd, str(path))
    header = read_header(path)[0]
    assert header["scaled_fp8"].dtype == "F8_E4M3" and header["scaled_fp8"].shape == (0,)
    assert header["blocks.0.ffn.0.weight"].dtype == "F8_E4M3" and header["blocks.0.ffn.0.scale_weight"].shape == ()
    assert header["audio_proj.proj1.weight"].dtype == "F8_E4M3" and header["blocks.0.norm_x.weight"].dtype == "F16"
    m8 = load_wan_i2v(path, dtype="bf16")
    assert isinstance(m8.blocks[0].ffn[0], FP8Linear) and m8.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert isinstance(m8.audio_proj.proj1_vf, FP8Linear) and m8.patch_embedding.weight.dtype == torch.bfloat16
    m16 = load_wan_i2v(sd16, dtype="bf16")
    args = (fx["in.x"], 0.7, fx["in.text_pos"], fx["in.clip"], fx["in.y"], fx["in.audio"])
    with torch.no_grad():
        v8, v16 = m8(*args).float(), m16(*args).float()
    ref = fx["out.cond"]
    rms = lambda t: t.pow(2).mean().sqrt().item()
    assert rms(v8 - v16) / rms(v16) < 0.08 and rms(v16 - ref) / rms(ref) < 0.01
    # quantising at load gives the same layers as the file; fp8=False dequantises them
    with torch.no_grad():
        assert torch.equal(load_wan_i2v(sd16, dtype="bf16", fp8=True)(*args), m8(*args))
        m32 = load_wan_i2v(path, dtype="fp32", fp8=False)
    assert not any(isinstance(m, FP8Linear) for m in m32.modules())
    w = m8.blocks[1].cross_attn.k_img
    assert torch.equal(m32.blocks[1].cross_attn.k_img.weight, w.weight.float() * w.scale_weight)
