"""ComfyUI entry point of the OmniSync node pack (V3 API: comfy_entrypoint only)."""

try:
    import comfy_api.latest  # noqa: F401  (present whenever ComfyUI loads this pack)
except ImportError:
    # Imported outside ComfyUI, e.g. by pytest collecting the repository root: there are no nodes to offer.
    __all__ = []
else:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
