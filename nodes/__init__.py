"""ComfyUI V3 nodes: thin conversions between ComfyUI types and omnisync_core calls.

Loader -> Audio Encode -> Face Crop -> Progressive Noise Init -> DS-CFG Sampler -> Decode -> Paste Back, plus the
one-node Lip Sync (IMAGE in, IMAGE out) and Lip Sync (Video), which streams a file to a file in constant memory.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import audio, evaluate, face, lipsync, loader, sampling
from ._comfy import register_model_folders

register_model_folders()

NODE_LIST: list[type[io.ComfyNode]] = [*loader.NODES, *audio.NODES, *face.NODES[:1], *sampling.NODES,
                                       *face.NODES[1:], *lipsync.NODES, *evaluate.NODES]


class OmniSyncExtension(ComfyExtension):
    """The OmniSync node pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> ComfyExtension:
    return OmniSyncExtension()
