"""Tiny random-initialised OmniSync models for the frames and ComfyUI tests (no weights, no network)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.model.bundle import save_bundle
from omnisync_core.model.dit import OmniSyncDiT, get_config
from omnisync_core.model.pixel_codec import PixelCodec

TINY_DEFAULTS = {"crop_size": 64, "window": 9, "overlap": 2, "steps": 4, "tau": 0.92, "audio_before": 1,
                 "audio_after": 1}


def tiny_parts(seed: int = 0):
    """(dit, codec, whisper) with every weight non-zero, so audio and source latents change the output. The
    codec is the demo model's: the parameter-free pixel codec (4x4 pixels per latent cell, every frame kept)."""
    torch.manual_seed(seed)
    whisper = WhisperEncoder(WhisperEncoderConfig(d_model=64, n_heads=2, n_layers=1)).eval()
    vae = PixelCodec(spatial_factor=4, temporal_factor=1, scale=0.5).eval()
    z = vae.config.z_dim
    dit = OmniSyncDiT(get_config("tiny", audio_dim=64, in_dim=z, out_dim=z, temporal_compression=1))
    dit.init_new_weights()
    for module in dit.modules():
        if hasattr(module, "weight") and module.weight is not None and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.02)
    dit.set_text_context(torch.randn(1, dit.config.text_len, dit.config.text_dim))
    return dit.eval(), vae, whisper


def write_tiny_bundle(path: Path, seed: int = 0, defaults: dict | None = None) -> Path:
    dit, vae, whisper = tiny_parts(seed)
    return save_bundle(path, dit, vae, whisper, dict(TINY_DEFAULTS if defaults is None else defaults))


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter moved by ``scale`` x N(0, 1) noise (seeded), so no weight is the zero of an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


_HF_NAMES = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
             "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
             "mlp_ln": "final_layer_norm"}


def hf_whisper(sd: dict) -> dict:
    """Our Whisper encoder's state dict -> a whole Hugging Face WhisperModel layout (encoder + a decoder tensor),
    as Comfy-Org's whisper_large_v3_fp16.safetensors is."""
    out = {}
    for key, value in sd.items():
        if key == "positional_embedding":
            key = "embed_positions.weight"
        elif key.startswith("ln_post."):
            key = "layer_norm." + key.split(".", 1)[1]
        elif key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            part, leaf = rest.rsplit(".", 1)
            key = f"layers.{n}.{_HF_NAMES[part]}.{leaf}"
        out["model.encoder." + key] = value.contiguous()
    out["model.decoder.embed_tokens.weight"] = torch.randn(8, sd["conv1.weight"].shape[0])
    return out


def write_tiny_humo(root: Path, spiece: bytes | None = None) -> dict:
    """Tiny random HuMo files in their real layouts under a ComfyUI ``models/`` folder ``root``: the DiT in
    ComfyUI's key names (diffusion_models/humo_tiny.safetensors), a Wan VAE (vae/), a Whisper in Hugging Face's
    layout (audio_encoders/), a prompt-embeddings file (root/prompt.safetensors) and, given a sentencepiece model,
    a tiny umT5 with it embedded as Comfy-Org's files carry it (text_encoders/umt5_tiny.safetensors)."""
    from safetensors.torch import save_file

    from omnisync_core.model.humo import HumoDiT
    from omnisync_core.model.vae import WanVAE
    from omnisync_core.text.prompt import save_prompt_embeds

    def save(tensors: dict, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    torch.manual_seed(0)
    dit = randomize(HumoDiT("tiny"), 1)
    files = {"model": save({"model.diffusion_model." + k: v for k, v in dit.state_dict().items()},
                           root / "diffusion_models" / "humo_tiny.safetensors")}
    files["vae"] = save(randomize(WanVAE("tiny"), 2, 0.02).state_dict(), root / "vae" / "wan_tiny_vae.safetensors")
    c = dit.config
    whisper = randomize(WhisperEncoder(WhisperEncoderConfig(n_mels=128, d_model=c.whisper_dim, n_heads=1,
                                                            n_layers=4)), 3)
    files["audio_encoder"] = save(hf_whisper(whisper.state_dict()),
                                  root / "audio_encoders" / "whisper_tiny_hf.safetensors")
    g = torch.Generator().manual_seed(4)
    pos, neg = torch.zeros(2, 1, c.text_len, c.text_dim)
    pos[:, :7], neg[:, :5] = torch.randn(1, 7, c.text_dim, generator=g), torch.randn(1, 5, c.text_dim, generator=g)
    files["prompt_embeds"] = save_prompt_embeds(root / "prompt.safetensors", pos, neg, prompt="a person talking",
                                                negative_prompt="blur", encoder_name="random", lengths=(7, 5))
    if spiece is not None:
        from omnisync_core.text.tokenizer import SPIECE_KEY, UMT5Tokenizer
        from omnisync_core.text.umt5 import UMT5Encoder

        umt5 = randomize(UMT5Encoder("tiny"), 5)
        files["text_encoder"] = save({**umt5.state_dict(), SPIECE_KEY: UMT5Tokenizer(spiece).to_tensor()},
                                     root / "text_encoders" / "umt5_tiny.safetensors")
    return files


def write_tiny_latentsync(root: Path) -> dict:
    """Tiny random LatentSync files under a ComfyUI ``models/`` folder ``root``, in the layouts ``omnisync convert``
    and diffusers write: the UNet3D (diffusion_models/latentsync_tiny.safetensors, LatentSync crop 64 px), a
    24-wide Whisper with its config in the metadata (audio_encoders/) and an SD VAE with factor 8 (vae/)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from omnisync_core.model.latentsync_unet import LatentSyncUNet
    from omnisync_core.model.sd_vae import SDVAE, SDVAEConfig

    def save(module: torch.nn.Module, path: Path, metadata: dict | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata)
        return path

    torch.manual_seed(0)
    unet = randomize(LatentSyncUNet("tiny"), 1)
    config = WhisperEncoderConfig(n_mels=80, d_model=unet.config.cross_attention_dim, n_heads=2, n_layers=4)
    whisper = randomize(WhisperEncoder(config), 3, 0.2)
    vae = randomize(SDVAE(SDVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)), 2, 0.02)
    return {"model": save(unet, root / "diffusion_models" / "latentsync_tiny.safetensors"),
            "audio_encoder": save(whisper, root / "audio_encoders" / "latentsync_whisper_tiny.safetensors",
                                  {"format": "omnisync", "config": json.dumps(dataclasses.asdict(config))}),
            "vae": save(vae, root / "vae" / "sd_vae_tiny.safetensors")}


def write_tiny_infinitetalk(root: Path) -> dict:
    """Tiny random InfiniteTalk files under a ComfyUI ``models/`` folder ``root``, as Comfy-Org ships them: the
    Wan I2V base in ComfyUI's key names, fp16 (diffusion_models/), the adapter alone with bare keys
    (model_patches/), CLIP vision, wav2vec2 (``wav2vec2.`` keys), the Wan VAE, and a prompt-embeddings file
    (root/prompt.safetensors)."""
    from safetensors.torch import save_file

    from omnisync_core.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
    from omnisync_core.model.clip_vision import CLIPVision, CLIPVisionConfig
    from omnisync_core.model.vae import WanVAE
    from omnisync_core.model.wan_i2v import WanI2VDiT, is_infinitetalk_key
    from omnisync_core.text.prompt import save_prompt_embeds

    def save(tensors: dict, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    dit = randomize(WanI2VDiT("tiny"), 1)
    sd = dit.state_dict()
    c = dit.config
    clip = randomize(CLIPVision(CLIPVisionConfig(hidden_size=c.clip_dim, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=32, image_size=56, projection_dim=8)), 2)
    # the tiny DiT's adapter takes 3 layers x 8 (WAN_I2V_PRESETS["tiny"]); the base's conv stack (320 samples)
    w2v = randomize(Wav2Vec2(Wav2Vec2Config(hidden_size=8, num_hidden_layers=3, num_attention_heads=1,
                                            intermediate_size=16, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                            num_conv_pos_embedding_groups=2)), 3)
    files = {
        "model": save({"model.diffusion_model." + k: v.half() for k, v in sd.items() if not is_infinitetalk_key(k)},
                      root / "diffusion_models" / "wan_i2v_tiny_fp16.safetensors"),
        "patch": save({k: v.half() for k, v in sd.items() if is_infinitetalk_key(k)},
                      root / "model_patches" / "infinitetalk_tiny_fp16.safetensors"),
        "clip_vision": save(clip.state_dict(), root / "clip_vision" / "clip_tiny.safetensors"),
        "audio_encoder": save({"wav2vec2." + k: v for k, v in w2v.state_dict().items()},
                              root / "audio_encoders" / "wav2vec2_tiny.safetensors"),
        "vae": save(randomize(WanVAE("tiny"), 4, 0.02).state_dict(), root / "vae" / "wan_tiny_vae.safetensors")}
    g = torch.Generator().manual_seed(5)
    pos, neg = torch.zeros(2, 1, c.text_len, c.text_dim)
    pos[:, :7], neg[:, :5] = torch.randn(1, 7, c.text_dim, generator=g), torch.randn(1, 5, c.text_dim, generator=g)
    files["prompt_embeds"] = save_prompt_embeds(root / "prompt.safetensors", pos, neg, prompt="a person talking",
                                                negative_prompt="blur", encoder_name="random", lengths=(7, 5))
    return files


def talking_pattern(frames: int, height: int = 96, width: int = 128, blob_radius: float = 20.0) -> torch.Tensor:
    """A smooth, codec-friendly moving picture with a face-sized blob in the middle, float 0..1 [T, H, W, 3] (a
    ComfyUI IMAGE)."""
    t = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)
    y = torch.linspace(0, 1, height).view(1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, -1)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.02 * t))
    g = 0.5 + 0.4 * torch.cos(2 * math.pi * (y - 0.015 * t))
    blob = torch.exp(-(((x - 0.5) * width) ** 2 + ((y - 0.5) * height) ** 2) / (2 * blob_radius ** 2))
    b = 0.3 + 0.6 * blob.expand(frames, -1, -1)
    return torch.stack([r.expand(frames, height, width), g.expand(frames, height, width), b], -1)


def chirp(seconds: float, rate: int = 22050, channels: int = 2) -> torch.Tensor:
    """A voiced-sounding test signal [C, N] (a vibrato tone with harmonics and an amplitude envelope)."""
    t = torch.arange(int(round(seconds * rate)), dtype=torch.float64) / rate
    f0 = 140 + 30 * torch.sin(2 * math.pi * 3 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    voice = sum(torch.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t)) * 0.3
    return torch.stack([voice * (0.8 + 0.2 * c) for c in range(channels)]).float()


def speech_tone(seconds: float, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """A mono test signal ``[N]``: a 180 Hz tone with a 3 Hz syllable envelope and a little seeded noise."""
    t = torch.arange(int(seconds * rate)) / rate
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.sin(2 * math.pi * 180 * t) * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t))
            + 0.02 * torch.randn(t.shape, generator=g)).float()


def face_crops(n: int, size: int = 64) -> torch.Tensor:
    """``n`` smooth, slowly moving square crops ``[n, size, size, 3]`` in 0..1 with a bright blob low in the middle
    (where a mouth would be)."""
    t = torch.arange(n, dtype=torch.float32).view(-1, 1, 1)
    y = torch.linspace(0, 1, size).view(1, -1, 1)
    x = torch.linspace(0, 1, size).view(1, 1, -1)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.05 * t))
    g = 0.5 + 0.4 * torch.cos(2 * math.pi * (y - 0.03 * t))
    b = (0.3 + 0.5 * torch.exp(-((x - 0.5) ** 2 + (y - 0.6) ** 2) / 0.02)).expand(n, -1, -1)
    return torch.stack([r.expand(n, size, size), g.expand(n, size, size), b], -1)
