"""One-file OmniSync models: the DiT, the VAE and the Whisper encoder in a single safetensors file, with their
configs and the inference defaults they were trained for (crop size, window, audio context, sampler).

Keys are prefixed ``dit.``, ``vae.`` and ``audio.``; metadata holds ``kind = "bundle"``, one JSON config per
part and ``defaults``. Large models may instead ship as three separate checkpoints (see loading.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..audio.whisper import WhisperEncoder
from .dit import DiTConfig, OmniSyncDiT
from .loading import (CheckpointError, _config_dict, load_dit, load_vae, load_whisper, read_safetensors, save_model)
from .vae import WanVAE

PARTS = ("dit", "vae", "audio")
DEMO_MODEL = Path(__file__).resolve().parent / "weights" / "omnisync_demo.safetensors"


@dataclass
class ModelBundle:
    """The three models and the defaults that go with them."""

    dit: OmniSyncDiT
    vae: WanVAE
    audio_encoder: WhisperEncoder
    defaults: dict[str, Any] = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "ModelBundle":
        for module in (self.dit, self.vae, self.audio_encoder):
            module.to(device=device, dtype=dtype)
        return self


def save_bundle(path, dit: OmniSyncDiT, vae: WanVAE, audio_encoder: WhisperEncoder,
                defaults: Optional[dict] = None, extra_metadata: Optional[dict] = None) -> Path:
    """Write the three models to one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in zip(PARTS, (dit, vae, audio_encoder)):
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    metadata = {f"{prefix}_config": json.dumps(_config_dict(module.config))
                for prefix, module in zip(PARTS, (dit, vae, audio_encoder))}
    metadata["defaults"] = json.dumps(defaults or {})
    metadata.update(extra_metadata or {})
    return save_model(tensors, path, kind="bundle", config={}, extra_metadata=metadata)


def _part_config(metadata: dict, part: str, name: str) -> dict:
    try:
        config = json.loads(metadata[f"{part}_config"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{name} has no readable {part} config in its metadata.") from None
    return config


def load_bundle(path, device=None, dtype=None) -> ModelBundle:
    """Load a bundle written by :func:`save_bundle`. The VAE and audio encoder stay in float32 unless ``dtype``
    is given; the DiT takes ``dtype``."""
    name = Path(path).name
    state, metadata = read_safetensors(path)
    if metadata.get("format") != "omnisync" or metadata.get("kind") != "bundle":
        raise CheckpointError(f"{name} is not an OmniSync model bundle (it has no 'bundle' metadata).")
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise CheckpointError(f"{name} has a tensor outside the dit/vae/audio parts: {key}")
        parts[prefix][rest] = tensor
    dit = load_dit(parts["dit"], preset=DiTConfig.from_dict(_part_config(metadata, "dit", name)),
                   device=device, dtype=dtype)
    vae = load_vae(parts["vae"], device=device, config=_part_config(metadata, "vae", name))
    audio = load_whisper(parts["audio"], device=device, config=_part_config(metadata, "audio", name))
    try:
        defaults = json.loads(metadata.get("defaults", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{name} has unreadable defaults in its metadata.") from None
    return ModelBundle(dit, vae, audio, defaults)
