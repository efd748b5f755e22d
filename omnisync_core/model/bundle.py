"""One-file OmniSync models: the DiT, the VAE and the Whisper encoder in a single safetensors file, with their
configs and the inference defaults they were trained for (crop size, window, audio context, sampler).

Keys are prefixed ``dit.``, ``vae.`` and ``audio.``; metadata holds ``kind = "bundle"``, one JSON config per
part and ``defaults``. Large models may instead ship as three separate checkpoints (see loading.py).
The ``vae`` part may be a parameter-free :class:`~omnisync_core.model.pixel_codec.PixelCodec` (its config says
``"codec": "pixel"`` and it has no tensors), as in the bundled demo model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import InputError
from ..audio.whisper import WhisperEncoder, sinusoids
from .dit import DiTConfig, OmniSyncDiT
from .loading import (CheckpointError, _config_dict, load_dit, load_vae, load_whisper, read_safetensors, save_model)
from .pixel_codec import PixelCodec
from .vae import WanVAE

PARTS = ("dit", "vae", "audio")
DEMO_MODEL = Path(__file__).resolve().parent / "weights" / "omnisync_demo.safetensors"


@dataclass
class ModelBundle:
    """The three models and the defaults that go with them."""

    dit: OmniSyncDiT
    vae: "WanVAE | PixelCodec"
    audio_encoder: WhisperEncoder
    defaults: dict[str, Any] = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "ModelBundle":
        for module in (self.dit, self.vae, self.audio_encoder):
            module.to(device=device, dtype=dtype)
        return self


def _vae_config(vae) -> dict:
    if isinstance(vae, PixelCodec):
        return {"codec": "pixel", **vae.config.to_dict()}
    return _config_dict(vae.config)


def _is_sinusoidal(table: torch.Tensor) -> bool:
    return torch.allclose(table.float().cpu(), sinusoids(*table.shape), atol=2e-3)


def save_bundle(path, dit: OmniSyncDiT, vae: "WanVAE | PixelCodec", audio_encoder: WhisperEncoder,
                defaults: Optional[dict] = None, extra_metadata: Optional[dict] = None,
                dtype: Optional[torch.dtype] = None) -> Path:
    """Write the three models to one safetensors file, atomically. ``dtype`` (e.g. ``torch.float16``) stores
    the DiT and audio encoder weights at that precision (a small download); they load back in float32."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in zip(PARTS, (dit, vae, audio_encoder)):
        for key, value in module.state_dict().items():
            if prefix == "audio" and key == "positional_embedding" and _is_sinusoidal(value):
                continue       # Whisper's fixed encoder positions: load_whisper recomputes them
            cast = dtype is not None and prefix != "vae" and value.is_floating_point()
            tensors[f"{prefix}.{key}"] = value.to(dtype) if cast else value
    metadata = {"dit_config": json.dumps(_config_dict(dit.config)), "vae_config": json.dumps(_vae_config(vae)),
                "audio_config": json.dumps(_config_dict(audio_encoder.config))}
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
    """Load a bundle written by :func:`save_bundle`. The VAE and audio encoder load in float32 (or the VAE's
    stored dtype); the DiT takes ``dtype`` (default float32, whatever precision the file stores)."""
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
                   device=device, dtype=dtype or torch.float32)
    vae_config = _part_config(metadata, "vae", name)
    if vae_config.get("codec") == "pixel":
        if parts["vae"]:
            raise CheckpointError(f"{name} declares a parameter-free pixel codec but stores VAE tensors.")
        try:
            vae = PixelCodec({k: v for k, v in vae_config.items() if k != "codec"}).to(device)
        except (TypeError, InputError) as e:
            raise CheckpointError(f"{name} has an unusable pixel codec config: {e}") from None
    else:
        vae = load_vae(parts["vae"], device=device, config=vae_config)
    audio = load_whisper(parts["audio"], device=device, dtype=torch.float32,
                         config=_part_config(metadata, "audio", name))
    try:
        defaults = json.loads(metadata.get("defaults", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{name} has unreadable defaults in its metadata.") from None
    return ModelBundle(dit, vae, audio, defaults)
