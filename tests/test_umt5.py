"""umT5 encoder: parity with transformers' UMT5EncoderModel through files in ComfyUI's two layouts (fp16 names,
scaled fp8), fp8 weights kept as fp8, the released files' key/shape manifests, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from omnisync_core.model.dit import WeightsError
from omnisync_core.model.loading import CheckpointError, CheckpointMismatchError, read_header
from omnisync_core.model.quant import FP8Linear, dequantize_fp8, quantize_fp8, to_scaled_fp8
from omnisync_core.text import (
    SPIECE_KEY, UMT5_PRESETS, UMT5Encoder, UMT5Tokenizer, load_umt5, umt5_config_from_shapes, umt5_expected_shapes,
)
from test_text_tokenizer import train_spiece

transformers = pytest.importorskip("transformers")
MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"
LINEARS = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> bytes:
    return train_spiece(tmp_path_factory.mktemp("spiece"))


def hf_reference(seed: int = 0) -> torch.nn.Module:
    """transformers' UMT5EncoderModel with the tiny preset's shapes; norms and position biases randomised too."""
    cfg = UMT5_PRESETS["tiny"]
    hc = transformers.UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
                                 num_heads=cfg.num_heads, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=cfg.num_buckets,
                                 relative_attention_max_distance=cfg.max_distance, is_encoder_decoder=False)
    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(2 * torch.randn_like(p))
    return model


def comfy_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A HF UMT5EncoderModel state dict under ComfyUI's names: ComfyUI's T5 has no tied encoder.embed_tokens."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def batch(tok: UMT5Tokenizer, length: int = 24):
    return tok(["The quick brown fox", "A person is talking to the camera and the fox jumps over the dog"],
               max_length=length)


def kept_close(ours, ref, mask, rtol=1e-5):
    """Rows of real tokens agree within ``rtol`` of the output's scale (fp32: different summation orders)."""
    keep = mask.bool()
    err = (ours[keep].float() - ref[keep].float()).abs().max().item()
    assert err <= rtol * ref[keep].abs().max().item(), err


def test_matches_transformers_through_comfyui_fp16_layout(spiece, tmp_path):
    ref = hf_reference()
    sd = comfy_layout(ref)
    path = tmp_path / "umt5_tiny.safetensors"
    save_file({**sd, SPIECE_KEY: UMT5Tokenizer(spiece).to_tensor()}, str(path))
    model, tok = load_umt5(path)
    assert set(model.state_dict()) == set(sd) and model.config == UMT5_PRESETS["tiny"]
    ids, mask = batch(tok)
    assert not mask.all()  # the first prompt is padded
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, mask)
    assert got.dtype == torch.float32
    kept_close(got, want, mask)


def test_fp16_file_stays_fp16_and_computes_in_fp32(spiece, tmp_path):
    """Weights are kept as stored (no fp32 copy of the model) and cast per layer to the compute dtype."""
    ref = hf_reference(1)
    sd16 = {k: v.half() for k, v in comfy_layout(ref).items()}
    path = tmp_path / "umt5_fp16.safetensors"
    save_file({**sd16, SPIECE_KEY: UMT5Tokenizer(spiece).to_tensor()}, str(path))
    seen = []
    model, tok = load_umt5(path, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert {p.dtype for p in model.parameters()} == {torch.float16} and model.compute_dtype == torch.float32
    assert seen[-1] == ("load-text-encoder", len(sd16) + 1, len(sd16) + 1)
    ref.load_state_dict({**{k: v.float() for k, v in sd16.items()}, "encoder.embed_tokens.weight": sd16[
        "shared.weight"].float()})  # the same fp16-rounded weights, in fp32
    ids, mask = batch(tok)
    with torch.no_grad():
        kept_close(model(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    bf16, _ = load_umt5(path, dtype="bf16", compute_dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        kept_close(bf16(ids, mask), model(ids, mask), mask, rtol=0.05)  # bf16 has 8 significant bits


def test_fp8_scaled_layout_matches_dequantised_reference(spiece, tmp_path):
    ref = hf_reference(2)
    sd = to_scaled_fp8(comfy_layout(ref), lambda k: k.endswith(LINEARS))
    assert sum(k.endswith(".scale_weight") for k in sd) == 7 * UMT5_PRESETS["tiny"].num_layers
    # as ComfyUI files may: a scale stored as [1], and scale_input hints the loader ignores
    sd["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = sd[
        "encoder.block.0.layer.0.SelfAttention.q.scale_weight"].reshape(1)
    sd["encoder.block.0.layer.0.SelfAttention.k.scale_input"] = torch.ones(())
    path = tmp_path / "umt5_fp8_scaled.safetensors"
    save_file({**sd, SPIECE_KEY: UMT5Tokenizer(spiece).to_tensor()}, str(path))
    assert read_header(path)[0]["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == "F8_E4M3"
    model, tok = load_umt5(path)

    linears = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(linears) == 7 * UMT5_PRESETS["tiny"].num_layers
    assert all(m.weight.dtype == FP8 and m.scale_weight.dtype == torch.float32 for m in linears)
    model.to(torch.float32)  # moving/casting the module never converts the float8 weights
    assert all(m.weight.dtype == FP8 for m in linears) and model.scaled_fp8.dtype == FP8

    deq = {k: (dequantize_fp8(v, sd[k[: -len("weight")] + "scale_weight"].reshape(()), torch.float32)
               if k.endswith(LINEARS) else v) for k, v in sd.items() if "scale" not in k and k != "scaled_fp8"}
    exact = hf_reference(2)
    ids, mask = batch(tok)
    with torch.no_grad():
        exact_out = exact(input_ids=ids, attention_mask=mask).last_hidden_state
        ref.load_state_dict({**deq, "encoder.embed_tokens.weight": deq["shared.weight"]})
        got = model(ids, mask)
        kept_close(got, ref(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    # and e4m3 (3 mantissa bits: 2^-4 relative rounding per weight) stays near the unquantised model
    keep = mask.bool()
    rel = (got[keep] - exact_out[keep]).norm() / exact_out[keep].norm()
    assert rel < 0.1, rel  # measured 0.047 with this seed


def test_quantize_fp8_and_linear():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * 0.02
    q, s = quantize_fp8(w)
    assert q.dtype == FP8 and s.shape == () and s.dtype == torch.float32
    assert s == w.abs().max() / 448 and q.float().abs().max() == 448
    # round to nearest with 3 mantissa bits: error <= 2^-4 of the value, or half the smallest subnormal step
    err = (dequantize_fp8(q, s) - w).abs()
    assert (err <= w.abs() / 16 + s * 2.0 ** -10).all()
    lin = FP8Linear.from_weight(w)
    x = torch.randn(3, 48)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, q.float() * s))  # same operations, same kernel
    assert lin.half().weight.dtype == FP8 and lin.scale_weight.dtype == torch.float32
    zero_q, zero_s = quantize_fp8(torch.zeros(4, 4))
    assert zero_s == 1 and not zero_q.float().any()


def load_manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text(encoding="utf-8"))["tensors"]


@pytest.mark.parametrize("name, fp8", [("umt5_xxl_fp16.json", None), ("umt5_xxl_fp8_e4m3fn_scaled.json", FP8)])
def test_released_layouts(name, fp8):
    tensors = load_manifest(name)
    assert tensors[SPIECE_KEY]["dtype"] == "U8" and len(tensors[SPIECE_KEY]["shape"]) == 1
    shapes = {k: tuple(v["shape"]) for k, v in tensors.items() if k != SPIECE_KEY}
    assert umt5_config_from_shapes(shapes) == UMT5_PRESETS["umt5-xxl"]
    assert umt5_expected_shapes("umt5-xxl", fp8) == shapes
    with torch.device("meta"):
        model = UMT5Encoder("umt5-xxl", fp8)
    fp8_keys = {k for k, v in model.state_dict().items() if v.dtype == FP8}
    assert fp8_keys == {k for k, v in tensors.items() if v["dtype"] == "F8_E4M3"}
    assert sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("scale_weight")) == 5_680_910_336


def test_not_umt5_is_refused_clearly():
    xxl = umt5_expected_shapes("umt5-xxl")
    t5 = {k: v for k, v in xxl.items() if "relative_attention_bias" not in k or ".block.0." in k}
    with pytest.raises(WeightsError, match="one position bias shared"):
        umt5_config_from_shapes(t5)
    v10 = {k.replace("wi_0", "wi"): v for k, v in xxl.items() if "wi_1" not in k}
    with pytest.raises(WeightsError, match="T5 v1.0"):
        umt5_config_from_shapes(v10)
    with pytest.raises(WeightsError, match="not a umT5"):
        umt5_config_from_shapes({"patch_embedding.weight": (1536, 16, 1, 2, 2)})


def test_loader_errors(spiece, tmp_path):
    sd = comfy_layout(hf_reference())
    no_tok = tmp_path / "no_tokenizer.safetensors"
    save_file(sd, str(no_tok))
    with pytest.raises(CheckpointError, match="no embedded tokenizer"):
        load_umt5(no_tok)
    broken = tmp_path / "missing_tensor.safetensors"
    save_file({**{k: v for k, v in sd.items() if not k.endswith("block.1.layer.1.DenseReluDense.wo.weight")},
               SPIECE_KEY: UMT5Tokenizer(spiece).to_tensor()}, str(broken))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"):
        load_umt5(broken)
    mixed = to_scaled_fp8(sd, lambda k: k.endswith(".q.weight"))
    path = tmp_path / "mixed.safetensors"
    save_file({**mixed, SPIECE_KEY: UMT5Tokenizer(spiece).to_tensor()}, str(path))
    with pytest.raises(CheckpointError, match="mixes Linear weight dtypes"):
        load_umt5(path)


def test_matches_wan_t5_encoder_fixture():
    """Against Wan's own T5Encoder (HuMo's copy; tests/fixtures/umt5/README.md) on a padded batch."""
    from safetensors.torch import load_file

    data = load_file(str(Path(__file__).parent / "fixtures" / "umt5" / "wan_t5_tiny.safetensors"))
    model = UMT5Encoder("tiny").eval()
    model.load_state_dict({k[len("weights."):]: v for k, v in data.items() if k.startswith("weights.")}, strict=True)
    with torch.no_grad():
        got = model(data["input_ids"], data["attention_mask"])
    kept_close(got, data["wan_output"], data["attention_mask"])
