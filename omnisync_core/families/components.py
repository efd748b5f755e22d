"""Companion files several families share (VAEs, audio and text encoders, CLIP vision, model patches), recognised
from their safetensors header alone: key names and shapes, never the file name."""

from __future__ import annotations

from math import prod
from typing import Callable, Mapping, Optional

from ..errors import OmniSyncError
from .base import Recognition


def shapes_of(tensors: Mapping) -> dict[str, tuple]:
    return {k: tuple(getattr(v, "shape", v)) for k, v in tensors.items()}


def param_count(tensors: Mapping, skip: Callable[[str], bool] = lambda k: False) -> int:
    return sum(prod(s) for k, s in shapes_of(tensors).items() if not skip(k))


def _wan_vae(tensors, metadata) -> Optional[Recognition]:
    from ..model.vae_keys import diffusers_to_wan_vae, is_diffusers_vae

    sd = shapes_of(tensors)
    if is_diffusers_vae(sd):
        sd = diffusers_to_wan_vae(sd)
    if "encoder.conv1.weight" not in sd or "decoder.head.2.weight" not in sd or "conv2.weight" not in sd:
        return None
    z = sd["conv2.weight"][0]
    label = "Wan2.1 VAE" if z == 16 else f"Wan VAE ({z} latent channels)"
    return Recognition("wan-vae", "vae", label, param_count(sd))


def _sd_vae(tensors, metadata) -> Optional[Recognition]:
    from ..model.sd_vae import is_sd_vae

    sd = shapes_of(tensors)
    if not is_sd_vae(sd):
        return None
    return Recognition("sd-vae", "vae", "Stable Diffusion VAE (sd-vae-ft-mse layout)", param_count(sd))


def _whisper(tensors, metadata) -> Optional[Recognition]:
    from ..audio.whisper import whisper_config_from_shapes, whisper_encoder_keys, whisper_preset_name

    sd = shapes_of(tensors)
    try:
        config = whisper_config_from_shapes(sd)
        encoder = whisper_encoder_keys(sd)
    except (OmniSyncError, KeyError, ValueError):
        return None
    name = whisper_preset_name(config)
    label = f"Whisper {name} encoder" if name else f"Whisper encoder ({config.n_layers} layers x {config.d_model})"
    whole = len(encoder) < len(sd)
    return Recognition(f"whisper-{name}" if name else "whisper", "audio_encoder", label,
                       param_count({k: sd[k] for k in encoder}),
                       details="the whole model: its encoder is read" if whole else "")


def _wav2vec2(tensors, metadata) -> Optional[Recognition]:
    from ..audio.wav2vec2 import is_wav2vec2, wav2vec2_config_from_shapes, wav2vec2_label

    sd = shapes_of(tensors)
    if not is_wav2vec2(sd):
        return None
    try:
        label = wav2vec2_label(wav2vec2_config_from_shapes(sd))
    except OmniSyncError:
        return None
    return Recognition("wav2vec2", "audio_encoder", label, param_count(sd))


def _umt5(tensors, metadata) -> Optional[Recognition]:
    from ..text.umt5 import umt5_config_from_shapes

    sd = shapes_of(tensors)
    try:
        config = umt5_config_from_shapes(sd)
    except OmniSyncError:
        return None
    fp8 = any(getattr(v, "dtype", "").startswith("F8") for v in tensors.values())
    label = "umT5-xxl" if (config.d_model, config.num_layers) == (4096, 24) else \
        f"umT5 ({config.num_layers} layers x {config.d_model})"
    return Recognition("umt5", "text_encoder", label, param_count(sd, lambda k: k.endswith("scale_weight")
                                                                   or k.endswith("scale_input")),
                       details="fp8 e4m3 scaled" if fp8 else "")


def _clip_vision(tensors, metadata) -> Optional[Recognition]:
    from ..model.clip_vision import clip_vision_config_from_shapes, clip_vision_label, is_clip_vision

    sd = shapes_of(tensors)
    if not is_clip_vision(sd):
        return None
    try:
        label = clip_vision_label(clip_vision_config_from_shapes(sd))
    except OmniSyncError:
        return None
    return Recognition("clip-vision", "clip_vision", label, param_count(sd))


def _infinitetalk_patch(tensors, metadata) -> Optional[Recognition]:
    from ..model.wan_i2v import (infinitetalk_patch_config_from_shapes, infinitetalk_patch_label,
                                 is_infinitetalk_patch)

    sd = shapes_of(tensors)
    if not is_infinitetalk_patch(sd):
        return None
    try:
        config = infinitetalk_patch_config_from_shapes(sd)
    except OmniSyncError:
        return None
    return Recognition("infinitetalk-patch", "patch", infinitetalk_patch_label(config), config.param_count(),
                       family="infinitetalk")


def _wan_t2v(tensors, metadata) -> Optional[Recognition]:
    from ..model.wan_keys import normalize_wan_state_dict

    sd = normalize_wan_state_dict(shapes_of(tensors))
    if not ("patch_embedding.weight" in sd and "blocks.0.cross_attn.k.weight" in sd and "head.head.weight" in sd):
        return None
    if any(k.startswith(("img_emb.", "audio_proj.")) for k in sd):
        return None
    dim = sd["patch_embedding.weight"][0]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    label = {1536: "Wan2.1 T2V 1.3B", 5120: "Wan2.1 T2V 14B"}.get(dim, f"Wan2.1 T2V ({layers} layers x {dim})")
    return Recognition("wan-t2v", "base", label, param_count(sd),
                       details="no audio layers: omnisync import-wan turns it into an OmniSync DiT to train")


RECOGNISERS: tuple[Callable[[Mapping, Mapping], Optional[Recognition]], ...] = (
    _sd_vae, _wan_vae, _whisper, _wav2vec2, _umt5, _clip_vision, _infinitetalk_patch,
    _wan_t2v)


def recognise_component(tensors: Mapping, metadata: Mapping[str, str]) -> Optional[Recognition]:
    for recognise in RECOGNISERS:
        found = recognise(tensors, metadata)
        if found is not None:
            return found
    return None


__all__ = ["RECOGNISERS", "param_count", "recognise_component", "shapes_of"]
