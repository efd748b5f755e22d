"""ComfyUI entry point of the OmniSync node pack (V3 API: comfy_entrypoint only)."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
