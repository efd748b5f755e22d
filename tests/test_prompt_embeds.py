"""Prompt features the Wan way (zero rows after the tokens) and the prompt-embeddings file cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from omnisync_core.text import (
    HUMO_DEFAULT_PROMPT, SPIECE_KEY, TEXT_LEN, WAN_DEFAULT_NEGATIVE_PROMPT, PromptEmbedsError, UMT5Encoder,
    UMT5Tokenizer, encode_prompt_file, encode_prompt_pair, encode_prompts, load_prompt_embeds, save_prompt_embeds,
)
from test_text_tokenizer import train_spiece

pytest.importorskip("sentencepiece")
PROMPTS = ["A person is talking to the camera.", "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny umT5 (norms and position biases randomised) and a trained tokenizer, also as a ComfyUI-layout
    file."""
    folder = tmp_path_factory.mktemp("umt5")
    tok = UMT5Tokenizer(train_spiece(folder))
    torch.manual_seed(0)
    model = UMT5Encoder("tiny").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(2 * torch.randn_like(p))
    path = folder / "umt5_tiny.safetensors"
    save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, SPIECE_KEY: tok.to_tensor()},
              str(path))
    return model, tok, path


def test_wan_padding_convention(tiny):
    model, tok, _ = tiny
    features, lengths = encode_prompts(model, tok, PROMPTS)
    assert features.shape == (2, TEXT_LEN, model.config.d_model) and features.dtype == torch.float32
    assert lengths.tolist() == [len(tok.encode(p)) for p in PROMPTS] and lengths[0] != lengths[1]
    ids, mask = tok(PROMPTS)  # Wan's own way: all 512 positions through the encoder with the padding mask
    with torch.no_grad():
        wan = model(ids, mask)
    for i, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(features[i, n:]) == 0  # exactly zero beyond the length
        with torch.no_grad():
            alone = model(torch.tensor([tok.encode(PROMPTS[i])]))[0]  # the prompt alone, no padding at all
        scale = alone.abs().max()
        # fp32, different widths -> different summation orders: agreement to ~1e-6 of the scale
        assert (features[i, :n] - alone).abs().max() <= 1e-5 * scale
        assert (wan[i, :n] - alone).abs().max() <= 1e-5 * scale


def test_pair_file_round_trip(tiny, tmp_path):
    model, tok, _ = tiny
    embeds = encode_prompt_pair(model, tok, PROMPTS[0], PROMPTS[1], encoder_name="umt5_tiny.safetensors")
    assert embeds.positive.shape == embeds.negative.shape == (1, TEXT_LEN, model.config.d_model)
    assert embeds.lengths == tuple(len(tok.encode(p)) for p in PROMPTS)
    out = tmp_path / "sub" / "prompt.safetensors"
    assert save_prompt_embeds(out, embeds.positive, embeds.negative, prompt=PROMPTS[0],
                              negative_prompt=PROMPTS[1], encoder_name="umt5_tiny.safetensors") == out
    assert [p.name for p in out.parent.iterdir()] == ["prompt.safetensors"]  # no .partial left behind
    back = load_prompt_embeds(out)
    assert torch.equal(back.positive, embeds.positive) and torch.equal(back.negative, embeds.negative)
    assert (back.prompt, back.negative_prompt, back.encoder_name) == (PROMPTS[0], PROMPTS[1], "umt5_tiny.safetensors")
    assert back.lengths == embeds.lengths
    # only the token rows are stored (the padding is rebuilt on load)
    stored = out.stat().st_size
    assert stored < 4 * model.config.d_model * (sum(embeds.lengths) + 64) + 4096


def test_encode_prompt_file_end_to_end(tiny, tmp_path):
    model, tok, path = tiny
    seen = []
    out = encode_prompt_file(path, tmp_path / "p.safetensors", PROMPTS[0], "", device="cpu",
                             progress=lambda stage, done, total: seen.append((stage, done, total)))
    back = load_prompt_embeds(out)
    assert back.negative_prompt == WAN_DEFAULT_NEGATIVE_PROMPT  # HuMo: an empty negative prompt means the default
    assert back.encoder_name == "umt5_tiny.safetensors"
    direct = encode_prompt_pair(model, tok, PROMPTS[0], WAN_DEFAULT_NEGATIVE_PROMPT)
    assert (back.positive - direct.positive).abs().max() <= 1e-6 * direct.positive.abs().max()
    assert (back.negative - direct.negative).abs().max() <= 1e-6 * direct.negative.abs().max()
    assert {s for s, _, _ in seen} == {"load-text-encoder", "encode-prompt"} and seen[-1] == ("encode-prompt", 1, 1)
    default = load_prompt_embeds(encode_prompt_file(path, tmp_path / "d.safetensors", None, None, device="cpu"))
    assert default.prompt == HUMO_DEFAULT_PROMPT


def test_wrong_files_give_one_clear_error(tiny, tmp_path):
    model, tok, path = tiny
    cases = {
        "missing.safetensors": None,
        "text.safetensors": b"hello, this is not a tensor file",
        "pickle.pt": b"\x80\x04\x95 pickled",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    cases_paths = [tmp_path / n for n in cases] + [path]  # path: a umT5 weights file, not prompt embeddings
    good = encode_prompt_pair(model, tok, PROMPTS[0], PROMPTS[1])
    ok = save_prompt_embeds(tmp_path / "ok.safetensors", good.positive, good.negative, prompt="a",
                            negative_prompt="b", encoder_name="x")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ok.read_bytes()[:-100])
    cases_paths.append(truncated)
    for p in cases_paths:
        with pytest.raises(PromptEmbedsError) as info:
            load_prompt_embeds(p)
        assert "\n" not in str(info.value) and p.name in str(info.value), str(info.value)
    with pytest.raises(PromptEmbedsError, match="not an OmniSync prompt-embeddings file"):
        load_prompt_embeds(path)
    with pytest.raises(PromptEmbedsError, match="differ in shape"):
        save_prompt_embeds(tmp_path / "x.safetensors", good.positive, good.negative[:, :10], prompt="a",
                           negative_prompt="b", encoder_name="x")
    assert not (tmp_path / "x.safetensors").exists()
