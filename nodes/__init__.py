"""ComfyUI V3 nodes: thin conversions between ComfyUI types and omnisync_core calls."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class OmniSyncExtension(ComfyExtension):
    """The node pack. Nodes are registered here as they land (see the README's node table)."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> ComfyExtension:
    return OmniSyncExtension()
