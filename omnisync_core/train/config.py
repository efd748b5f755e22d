"""Training configuration: a flat dataclass read from TOML or JSON, and the registry of latent codecs.

Example (TOML; relative paths are relative to the config file)::

    out_dir = "runs/demo"
    model = "tiny"                   # DiT preset: tiny, wan2.1-1.3b, wan2.1-14b
    init_from = ""                   # optional Wan2.1 T2V base or OmniSync DiT checkpoint
    codec = "wan-vae"                # a key of CODECS
    data_dirs = ["shards/synthetic"]
    window = 21                      # frames per target window (4k+1)
    batch_size = 4                   # global batch (split over processes)
    lr = 1e-5
    steps = 2000
    audio_dropout = 0.1
    distributed = "none"             # none | ddp | fsdp

    [model_overrides]
    audio_dim = 384

    [codec_options]
    path = "models/vae/wan_2.1_vae.safetensors"   # or: preset = "tiny" (random weights, for tests)

``codec = "pixel"`` trains in pixel space through the parameter-free space-to-depth PixelCodec
(``codec_options``: spatial_factor, temporal_factor, shift, scale), as the bundled demo model does.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import InputError

__all__ = ["ConfigError", "TrainConfig", "CODECS", "register_codec", "build_codec", "load_config"]


class ConfigError(InputError):
    """The training configuration is missing, malformed or inconsistent."""


@dataclass
class TrainConfig:
    """Everything a training run needs. See the module docstring for the file format."""

    # model
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    init_from: Optional[str] = None
    text_context: str = "zeros"          # "zeros" or a safetensors file holding one [1, L, text_dim] tensor
    # codec (frozen)
    codec: str = "wan-vae"
    codec_options: dict = field(default_factory=dict)
    codec_dtype: str = "fp32"
    cache_latents: bool = False
    cache_size: int = 4096
    prefetch: bool = True                # read the next step's samples in a background thread
    # data
    data_dirs: list = field(default_factory=list)
    audio_encoder: Optional[str] = None  # Whisper checkpoint: features for sample shards, and the bundle's encoder
    window: int = 21
    audio_before: int = 2
    audio_after: int = 2
    pair_threshold: float = 0.85
    pair_exclusion: int = 2
    pseudo_mode: str = "frames"
    # objective
    sigma_sampling: str = "logit-normal"  # or "uniform"
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    sigma_shift: float = 5.0
    audio_dropout: float = 0.1
    mouth_loss_weight: float = 0.0       # extra loss weight on the latent cells around the mouth (0: plain MSE)
    # optimisation
    batch_size: int = 1
    lr: float = 1e-5
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup: int = 100
    lr_schedule: str = "constant"        # or "cosine" (to 0 at `steps`)
    steps: int = 1000
    grad_clip: float = 1.0
    bf16: bool = True                    # autocast on CUDA (CPU runs fp32 unless cpu_bf16)
    cpu_bf16: bool = False
    grad_checkpointing: bool = False
    ema_decay: Optional[float] = None
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    out_dir: str = "runs/omnisync"
    resume: bool = False
    distributed: str = "none"            # none | ddp | fsdp
    device: str = "auto"
    bundle: bool = True                  # write model.safetensors (a bundle) at the end
    bundle_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError with one sentence for the first inconsistent value."""
        checks = [
            (self.window >= 5 and self.window % 4 == 1, f"window must be 4k+1 frames (5, 9, 13, ...), got {self.window}"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (0 <= self.audio_dropout <= 1, "audio_dropout must lie in [0, 1]"),
            (self.mouth_loss_weight >= 0, "mouth_loss_weight must be >= 0"),
            (0 <= self.pair_threshold <= 1, "pair_threshold must lie in [0, 1]"),
            (self.sigma_sampling in ("logit-normal", "uniform"), "sigma_sampling must be 'logit-normal' or 'uniform'"),
            (self.sigma_shift > 0, "sigma_shift must be positive"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'"),
            (self.distributed in ("none", "ddp", "fsdp"), "distributed must be 'none', 'ddp' or 'fsdp'"),
            (self.pseudo_mode in ("frames", "segment"), "pseudo_mode must be 'frames' or 'segment'"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay must lie in (0, 1) or be omitted"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
            (len(self.betas) == 2, "betas must be two numbers"),
            (self.codec_dtype in ("fp32", "bf16", "fp16"), "codec_dtype must be fp32, bf16 or fp16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Bad training config: {message}.")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_type(name: str, value: Any, annotation) -> Any:
    """Light type check of one config value against its annotation (ints are accepted for floats)."""
    hint = annotation
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    base = typing.get_origin(hint) or hint
    if base is bool and not isinstance(value, bool) or not isinstance(value, base) or \
            (base is int and isinstance(value, bool)):
        raise ConfigError(f"Bad training config: {name} must be a {getattr(base, '__name__', base)}, "
                          f"got {value!r}.")
    return value


def load_config(path_or_dict, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a ``.toml`` / ``.json`` file (or a dict); unknown keys are an error.

    Relative paths (``data_dirs``, ``out_dir``, ``init_from``, ``audio_encoder``, ``text_context`` and
    ``codec_options.path``) are resolved against the config file's folder."""
    base = None
    if isinstance(path_or_dict, dict):
        raw = dict(path_or_dict)
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise ConfigError(f"Training config not found: {path}.")
        try:
            text = path.read_text()
            raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"Training config {path.name} is not valid {path.suffix[1:].upper() or 'JSON'}: "
                              f"{e}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Training config {path.name} must hold a table/object at the top level.")
        base = path.parent
    raw.update(overrides)
    known = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"Unknown training config keys: {', '.join(unknown)}.")
    values = {k: _check_type(k, v, known[k]) for k, v in raw.items()}
    for key in ("init_from", "audio_encoder"):
        if values.get(key) == "":
            values[key] = None
    if base is not None:
        rel = lambda p: p if p in (None, "zeros") or os.path.isabs(p) else str(base / p)  # noqa: E731
        for key in ("out_dir", "init_from", "audio_encoder", "text_context"):
            if key in values:
                values[key] = rel(values[key])
        if "data_dirs" in values:
            values["data_dirs"] = [rel(str(p)) for p in values["data_dirs"]]
        if "path" in values.get("codec_options", {}):
            values["codec_options"] = {**values["codec_options"], "path": rel(values["codec_options"]["path"])}
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------ codecs

CODECS: dict[str, Callable[[dict], Any]] = {}


def register_codec(name: str, builder: Callable[[dict], Any]) -> None:
    """Make a codec available as ``codec = NAME``. ``builder(codec_options) -> codec`` where the codec has
    ``encode(video [B, 3, T, H, W] in [-1, 1]) -> z [B, C, 1 + (T - 1) // 4, h, w]`` (normalised latents) and
    ``decode(z) -> video``; it may be an nn.Module (it is frozen and moved to the training device)."""
    CODECS[name] = builder


def _wan_vae(options: dict):
    from ..model.loading import load_vae
    from ..model.vae import WanVAE

    path, preset = options.get("path"), options.get("preset")
    if path:
        return load_vae(path)
    if preset:
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(int(options.get("seed", 0)))
            return WanVAE(preset).eval()
    raise ConfigError("The wan-vae codec needs codec_options.path (a Wan2.1 VAE .safetensors) or "
                      "codec_options.preset (random weights, for tests).")


register_codec("wan-vae", _wan_vae)


def _pixel_codec(options: dict):
    from ..model.pixel_codec import PixelCodec

    try:
        return PixelCodec(options)
    except TypeError as e:
        raise ConfigError(f"Bad codec_options for the pixel codec ({e}); it takes spatial_factor, "
                          "temporal_factor, channels, shift and scale.") from None


register_codec("pixel", _pixel_codec)


def build_codec(config: TrainConfig):
    """The codec named by ``config.codec`` built from ``config.codec_options``."""
    builder = CODECS.get(config.codec)
    if builder is None:
        raise ConfigError(f"Unknown codec {config.codec!r}; registered: {', '.join(sorted(CODECS))}.")
    return builder(dict(config.codec_options))
