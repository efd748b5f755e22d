"""The OmniSync models: the DiT (Wan2.1 backbone + audio), the Wan2.1 VAE, and their key maps."""

from .dit import DIT_PRESETS, DiTConfig, OmniSyncDiT, WeightsError, get_config, num_params
from .vae import WanVAE, WanVAEConfig

__all__ = ["DIT_PRESETS", "DiTConfig", "OmniSyncDiT", "WanVAE", "WanVAEConfig", "WeightsError", "get_config",
           "num_params"]
