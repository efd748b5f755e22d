"""Pickle -> safetensors conversion of LatentSync's checkpoints: weights-only loading refuses code, the keys are
checked strictly against the family, the file is written atomically with its provenance, describe() names it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from omnisync_core.model.convert import (
    WHISPER_TINY_DIMS, convert_pickle, describe, whisper_checkpoint_shapes,
)
from omnisync_core.model.latentsync_unet import LatentSyncUNet, latentsync_unet_shapes, load_latentsync_unet
from omnisync_core.model.loading import CheckpointError, CheckpointMismatchError, load_whisper, read_header

MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"
SMALL_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_vocab=51865,
                  n_text_ctx=16, n_text_state=64, n_text_head=2, n_text_layer=1)


def _random(shapes: dict, dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def _whisper_pt(tmp_path: Path, dims=SMALL_DIMS, drop=None) -> Path:
    """A checkpoint in OpenAI's format, as checkpoints/whisper/tiny.pt is: {"dims", "model_state_dict"}, fp16."""
    sd = _random(whisper_checkpoint_shapes(dims), torch.float16)
    if drop:
        sd.pop(drop)
    path = tmp_path / "tiny.pt"
    torch.save({"dims": dict(dims), "model_state_dict": sd}, path)
    return path


def _unet_pt(tmp_path: Path, extra_key=None) -> Path:
    """The format of latentsync_unet.pt (scripts/train_unet.py L454-459) with the tiny architecture."""
    sd = LatentSyncUNet("tiny").state_dict()
    if extra_key:
        sd[extra_key] = torch.zeros(3)
    path = tmp_path / "latentsync_unet.pt"
    torch.save({"global_step": 1234, "state_dict": sd}, path)
    return path


def test_whisper_tiny_key_list_matches_upstream():
    manifest = json.loads((MANIFESTS / "latentsync_whisper_tiny.json").read_text())
    assert manifest["dims"] == WHISPER_TINY_DIMS
    assert {k: list(v) for k, v in whisper_checkpoint_shapes(WHISPER_TINY_DIMS).items()} == manifest["tensors"]


def test_whisper_checkpoint_converts_to_a_loadable_encoder(tmp_path):
    src = _whisper_pt(tmp_path)
    out = convert_pickle(src, expect="whisper")
    assert out == tmp_path / "tiny.safetensors" and not (tmp_path / "tiny.safetensors.partial").exists()
    _, meta = read_header(out)
    assert meta["format"] == "omnisync" and meta["kind"] == "whisper" and meta["source_file"] == "tiny.pt"
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert json.loads(meta["whisper_dims"]) == SMALL_DIMS
    enc = load_whisper(out)
    assert (enc.config.d_model, enc.config.n_heads, enc.config.n_layers) == (64, 2, 2)   # heads from the dims
    orig = torch.load(src, weights_only=True)["model_state_dict"]
    for k, v in enc.state_dict().items():
        assert torch.equal(v, orig["encoder." + k])
    assert v.dtype == torch.float16
    assert describe(src).kind == "whisper" and "multilingual" in describe(src).summary
    assert describe(out).kind == "whisper"


def test_whisper_checks_are_strict(tmp_path):
    with pytest.raises(CheckpointError, match="not Whisper tiny multilingual"):
        convert_pickle(_whisper_pt(tmp_path), expect="whisper-tiny")
    with pytest.raises(CheckpointMismatchError, match="decoder.ln.bias"):
        convert_pickle(_whisper_pt(tmp_path, drop="decoder.ln.bias"))
    assert not list(tmp_path.glob("*.safetensors*"))
    with pytest.raises(CheckpointError, match="not a latentsync_unet"):
        convert_pickle(_whisper_pt(tmp_path), expect="latentsync_unet")


def test_unet_checkpoint_converts_and_loads(tmp_path):
    src = _unet_pt(tmp_path)
    out = convert_pickle(src, tmp_path / "conv" / "unet.safetensors", dtype=torch.float16)
    info, meta = read_header(out)
    assert meta["kind"] == "latentsync_unet" and meta["global_step"] == "1234"
    assert len(info) == len(latentsync_unet_shapes("tiny")) and all(i.dtype == "F16" for i in info.values())
    model = load_latentsync_unet(out)
    orig = torch.load(src, weights_only=True)["state_dict"]
    with safe_open(str(out), "pt") as f:
        for k in ("conv_in.weight", "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
                  "attention_blocks.1.pos_encoder.pe"):
            assert torch.equal(f.get_tensor(k), orig[k].half())
    assert model.config == LatentSyncUNet("tiny").config
    assert describe(out).kind == "latentsync_unet" and describe(src).kind == "latentsync_unet"


def test_unet_checks_are_strict(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="extra.weight"):
        convert_pickle(_unet_pt(tmp_path, extra_key="extra.weight"))
    with pytest.raises(CheckpointMismatchError):       # the tiny model is not the 1.6 release
        convert_pickle(_unet_pt(tmp_path), expect="latentsync-1.6")
    assert not list(tmp_path.glob("*.safetensors*"))


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    def __init__(self):
        self.weights = torch.zeros(2)


def test_pickles_with_code_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv_in.weight": torch.zeros(1)}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        convert_pickle(evil)
    with pytest.raises(CheckpointError, match="refused"):
        describe(evil)
    custom = tmp_path / "custom.pt"
    torch.save({"state_dict": _Custom()}, custom)
    with pytest.raises(CheckpointError, match="refused"):
        convert_pickle(custom)
    raw = tmp_path / "raw.pt"          # a bare (non-zip) pickle is not even opened by the unpickler
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointError):
        convert_pickle(raw)
    assert not marker.exists()
    assert not list(tmp_path.glob("*.safetensors*"))


def test_describe_rejects_unknown(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    assert describe(path).kind is None
    with pytest.raises(CheckpointError, match="neither"):
        convert_pickle(path)
