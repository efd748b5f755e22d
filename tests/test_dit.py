"""OmniSyncDiT: diffusers' WanTransformer3DModel as the backbone oracle, zero-init, frame locality, precision."""

import pytest
import torch

from omnisync_core.errors import InputError
from omnisync_core.model.dit import (
    DIT_PRESETS, DiTConfig, OmniSyncDiT, WeightsError, get_config, latent_audio_index, num_params,
)
from omnisync_core.model.wan_keys import diffusers_to_wan, normalize_wan_state_dict, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")

# backbone shared by the oracle and OmniSync configs: 2 heads x 20 (unequal RoPE bands t/h/w = 8/6/6)
TINY = dict(dim=40, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, text_len=8, audio_dim=24, audio_window=3)
T_LAT, H_LAT, W_LAT = 3, 6, 8
F_VIDEO = 4 * (T_LAT - 1) + 1


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP stalls on a shared, busy CPU (40x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.05):
    """Overwrite every parameter with noise (norm weights around 1) so nothing is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return module


def wan_oracle(seed=0):
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=20, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6)
    return randomize(ref, seed).eval()


def inputs(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, T_LAT, H_LAT, W_LAT, generator=g)
    return dict(
        x=x, sigma=torch.rand(b, generator=g), text=torch.randn(b, TINY["text_len"], TINY["text_dim"], generator=g),
        source=torch.randn(x.shape, generator=g), audio=torch.randn(b, F_VIDEO, TINY["audio_window"],
                                                                      TINY["audio_dim"], generator=g))


def base_model(seed=0):
    """A random Wan2.1 T2V backbone (no audio, 16 input channels)."""
    cfg = DiTConfig(**TINY, enable_audio=False, source_concat=False)
    return randomize(OmniSyncDiT(cfg), seed).eval()


def test_backbone_matches_diffusers_wan():
    ref = wan_oracle()
    model = OmniSyncDiT(DiTConfig(**TINY, enable_audio=False, source_concat=False)).eval()
    model.load_state_dict(diffusers_to_wan(ref.state_dict()), strict=True)
    inp = inputs()
    with torch.no_grad():
        want = ref(inp["x"], inp["sigma"] * 1000, inp["text"], return_dict=False)[0]
        got = model(inp["x"], inp["sigma"], text=inp["text"])
    err = (want - got).abs().max().item()
    print(f"max abs err vs diffusers WanTransformer3DModel: {err:.3g} (output std {want.std():.3g})")
    assert want.std() > 0.05 and err <= 1e-4


def test_wan_keys_agree_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = wan_oracle().state_dict()
    wan = diffusers_to_wan(sd)
    assert set(wan) == set(base_model().state_dict())
    back = convert_wan_transformer_to_diffusers(dict(wan))  # diffusers' own Wan -> diffusers renaming
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    assert wan_to_diffusers(wan).keys() == sd.keys()
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    assert normalize_wan_state_dict(prefixed).keys() == wan.keys()
    i2v = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=20, in_channels=36, text_dim=32,
                                          ffn_dim=64, num_layers=1, image_dim=24, added_kv_proj_dim=40).state_dict()
    wan_i2v = diffusers_to_wan(i2v)
    assert {"blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight", "img_emb.proj.4.bias"} <= set(wan_i2v)
    assert convert_wan_transformer_to_diffusers(dict(wan_i2v)).keys() == i2v.keys() == wan_to_diffusers(wan_i2v).keys()


def test_zero_init_equals_base_then_audio_learns():
    base = base_model()
    inp = inputs()
    with torch.no_grad():
        want = base(inp["x"], inp["sigma"], text=inp["text"])
    cfg = DiTConfig(**TINY)
    model = OmniSyncDiT.from_wan_state_dict(base.state_dict(), cfg).eval()
    with torch.no_grad():
        got = model(**inp)
        null = model(inp["x"], inp["sigma"], source=inp["source"], text=inp["text"])
        bare = model(inp["x"], inp["sigma"], text=inp["text"])
    # Bit-exact by construction, not by luck: the imported model assigns the base's own tensors (same storage,
    # same kernels, same thread count) and adds exact zeros (zero output projection, split source convolution).
    assert torch.equal(got, want) and torch.equal(null, want) and torch.equal(bare, want)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = (model(**inp) - inp["x"]).pow(2).mean()
    loss.backward()
    opt.step()
    model.zero_grad()
    other = dict(inp, audio=torch.randn_like(inp["audio"]))
    with torch.no_grad():
        a, b = model(**inp), model(**other)
    assert (a - b).abs().max() > 1e-4
    assert (model(inp["x"], inp["sigma"], text=inp["text"]) - want).abs().max() > 1e-4  # source channels learnt


def test_from_wan_state_dict_is_strict():
    sd = base_model().state_dict()
    cfg = DiTConfig(**TINY)
    with pytest.raises(WeightsError, match="missing"):
        OmniSyncDiT.from_wan_state_dict({k: v for k, v in sd.items() if "blocks.1.ffn.0" not in k}, cfg)
    with pytest.raises(WeightsError, match="unexpected"):
        OmniSyncDiT.from_wan_state_dict({**sd, "blocks.0.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(WeightsError):
        OmniSyncDiT.from_wan_state_dict(sd, DiTConfig(**dict(TINY, dim=48)))
    # diffusers layout is accepted too
    diff_sd = diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=20, text_dim=32, ffn_dim=64, num_layers=2).state_dict()
    assert OmniSyncDiT.from_wan_state_dict(diff_sd, cfg).patch_embedding.weight.shape[1] == 32


def test_audio_is_frame_local():
    """Asserted at the first block's audio cross-attention output (self-attention mixes frames later):
    changing the audio of video frames 5..8 changes exactly latent frame 2's tokens there, bit-identical
    elsewhere; changing video frame 0 changes only latent frame 0."""
    torch.manual_seed(0)
    model = randomize(OmniSyncDiT(DiTConfig(**TINY)), seed=3).eval()
    captured = []
    model.blocks[0].audio_attn.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    inp = inputs(b=1)

    def per_frame(audio):
        captured.clear()
        with torch.no_grad():
            model(**dict(inp, audio=audio))
        return captured[0]  # [(B T), H*W/4, dim]

    a0 = inp["audio"]
    ref = per_frame(a0)
    assert ref.shape[0] == T_LAT
    a1 = a0.clone()
    a1[:, 5:9] += torch.randn_like(a1[:, 5:9])
    changed = (per_frame(a1) - ref).abs().amax(dim=(1, 2))
    assert changed[2] > 1e-3 and changed[0] == 0 and changed[1] == 0
    a2 = a0.clone()
    a2[:, 0] += 1.0
    changed = (per_frame(a2) - ref).abs().amax(dim=(1, 2))
    assert changed[0] > 1e-3 and changed[1] == 0 and changed[2] == 0
    assert latent_audio_index(3).tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]


def test_audio_mask_and_null_audio():
    model = randomize(OmniSyncDiT(DiTConfig(**TINY)), seed=4).eval()
    inp = inputs()
    with torch.no_grad():
        cond = model(**inp)
        null = model(**dict(inp, audio=None))
        mixed = model(**inp, audio_mask=torch.tensor([True, False]))
    assert (cond - null).abs().max() > 1e-3
    assert torch.allclose(mixed[0], cond[0], atol=1e-6) and torch.allclose(mixed[1], null[1], atol=1e-6)


def test_text_context_buffer_roundtrip():
    model = randomize(OmniSyncDiT(DiTConfig(**TINY)), seed=5).eval()
    inp = inputs(b=2)
    with pytest.raises(InputError):
        model(inp["x"], inp["sigma"])
    ctx = inp["text"][:1]
    model.set_text_context(ctx)
    with torch.no_grad():
        explicit = model(inp["x"], inp["sigma"], text=ctx.expand(2, -1, -1))
        stored = model(inp["x"], inp["sigma"])
    assert torch.equal(explicit, stored)
    sd = model.state_dict()
    assert sd["text_context"].shape == (1, TINY["text_len"], TINY["text_dim"])
    fresh = OmniSyncDiT(DiTConfig(**TINY))
    fresh.load_checked(sd)
    assert torch.equal(fresh.text_context, ctx)


def test_bad_inputs_raise_input_error():
    model = OmniSyncDiT(DiTConfig(**TINY)).eval()
    inp = inputs(b=1)
    with pytest.raises(InputError):
        model(**dict(inp, audio=inp["audio"][:, :-1]))  # wrong video frame count
    with pytest.raises(InputError):
        model(**dict(inp, x=inp["x"][:, :, :, :5]))  # odd height
    with pytest.raises(InputError):
        model(**dict(inp, text=inp["text"][..., :7]))
    with pytest.raises(InputError):
        model(**dict(inp, sigma=torch.rand(3)))


def test_half_precision_close_to_fp32():
    """bf16/fp16 autocast over fp32 weights, and bf16 weights without autocast, stay close to fp32."""
    model = randomize(OmniSyncDiT(DiTConfig(**TINY)), seed=6).eval()
    inp = inputs()
    rel = lambda y: ((y.float() - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        ref = model(**inp)
        for dt in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dt):
                low = model(**inp)
            print(f"{dt} autocast: max abs err / max abs output = {rel(low):.3g}")
            assert low.dtype == torch.float32 and rel(low) < 5e-2
        pure = randomize(OmniSyncDiT(DiTConfig(**TINY)), seed=6).eval().to(torch.bfloat16)(**inp)
    print(f"bf16 weights: max abs err / max abs output = {rel(pure):.3g}")
    assert rel(pure) < 5e-2


def test_gradient_checkpointing_same_grads():
    model = randomize(OmniSyncDiT(DiTConfig(**TINY)), seed=7).train()
    inp = inputs()

    def grads(flag):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(**inp).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5) for n in plain)
    assert plain["blocks.0.audio_attn.q.weight"].abs().max() > 0


def test_preset_parameter_counts():
    counts = {name: num_params(name) for name in DIT_PRESETS}
    for name, c in counts.items():
        print(f"{name}: total {c['total']:,}  Wan base {c['base']:,}  new (audio + source) {c['new']:,}")
    assert counts["tiny"]["total"] < 5e6
    assert 1.3e9 < counts["wan2.1-1.3b"]["base"] < 1.5e9  # Wan2.1 T2V 1.3B
    assert 1.3e9 < counts["wan2.1-1.3b"]["total"] < 1.8e9  # + ~0.29B full-width audio cross-attention
    assert 13.5e9 < counts["wan2.1-14b"]["base"] < 15e9
    assert get_config("wan2.1-14b").head_dim == 128 == get_config("wan2.1-1.3b").head_dim


def test_wan_1_3b_layout_matches_diffusers_config():
    """Every key and shape of the 1.3B preset (backbone only) equals diffusers' Wan2.1-T2V-1.3B config, renamed."""
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                              num_layers=30, text_dim=4096)
        ours = OmniSyncDiT(get_config("wan2.1-1.3b", enable_audio=False, source_concat=False))
    want = {k: tuple(v.shape) for k, v in diffusers_to_wan(ref.state_dict()).items()}
    assert want == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
