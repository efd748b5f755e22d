"""OmniSync Model Loader: a model bundle (or a DiT plus a VAE and a Whisper encoder) -> OMNISYNC_MODEL."""

from __future__ import annotations

from comfy_api.latest import io

from ..omnisync_core.errors import InputError
from ..omnisync_core.model.bundle import load_bundle
from ..omnisync_core.families.omnisync import DEMO_NOTICE, is_demo
from ..omnisync_core.model.loading import load_dit, load_vae, load_whisper, read_header, read_safetensors
from ._comfy import (FROM_BUNDLE, MODEL_FOLDER, OmniSyncModel, download_model, model_choices, part_choices,
                     resolve_model, resolve_part)
from .sockets import CATEGORY, OmniSyncModelType


def _is_bundle(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("kind") == "bundle"
    except Exception:       # not a safetensors file (e.g. a pickle): let the core loader say exactly why
        read_safetensors(path)
        raise


class OmniSyncModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncModelLoader",
            display_name="OmniSync Model Loader",
            category=CATEGORY,
            description="Loads an OmniSync lip-sync model: the diffusion transformer, the VAE and the Whisper audio "
                        "encoder, from one bundle file in models/omnisync or from separate files in models/omnisync, "
                        "models/vae and models/audio_encoders. The bundled demo model needs no download. Weights are "
                        "read from safetensors only; ComfyUI moves them to the GPU and back as memory requires.",
            inputs=[
                io.Combo.Input("model", options=model_choices(), default=model_choices()[0],
                               tooltip="An OmniSync bundle or DiT checkpoint (.safetensors) from models/omnisync, "
                                       "or the bundled demo model (trained on synthetic cartoon faces)."),
                io.Combo.Input("vae", options=part_choices("vae"), default=FROM_BUNDLE,
                               tooltip="The Wan2.1 VAE from models/vae, for a DiT checkpoint that is not a bundle. "
                                       "'from bundle' uses the bundle's own."),
                io.Combo.Input("audio_encoder", options=part_choices("audio_encoders"), default=FROM_BUNDLE,
                               tooltip="The Whisper encoder from models/audio_encoders, for a DiT checkpoint that is "
                                       "not a bundle. 'from bundle' uses the bundle's own."),
                io.Combo.Input("precision", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Precision of the diffusion transformer. auto: bf16 (or fp16) on a GPU that "
                                       "supports it, fp32 on the CPU. The VAE and audio encoder stay in fp32."),
                io.String.Input("download", default="", optional=True,
                                tooltip="Optional: owner/repo/file.safetensors on the Hugging Face Hub to download "
                                        "into models/omnisync (once) and load instead of 'model'. Leave empty to "
                                        "never touch the network."),
            ],
            outputs=[OmniSyncModelType.Output(display_name="model",
                                              tooltip="The loaded model, for the other OmniSync nodes.")],
        )

    @classmethod
    def execute(cls, model: str, vae: str, audio_encoder: str, precision: str, download: str = "") -> io.NodeOutput:
        path = download_model(download) if download and download.strip() else resolve_model(model)
        if _is_bundle(path):
            bundle = load_bundle(path)
            dit, codec, whisper, defaults = bundle.dit, bundle.vae, bundle.audio_encoder, bundle.defaults
            if vae != FROM_BUNDLE:
                codec = load_vae(resolve_part("vae", vae))
            if audio_encoder != FROM_BUNDLE:
                whisper = load_whisper(resolve_part("audio_encoders", audio_encoder))
        else:
            if vae == FROM_BUNDLE or audio_encoder == FROM_BUNDLE:
                raise InputError(f"{path.name} is a DiT checkpoint, not a bundle: choose its VAE (models/vae) and "
                                 f"audio encoder (models/audio_encoders) in the loader.")
            dit = load_dit(path)
            codec = load_vae(resolve_part("vae", vae))
            whisper = load_whisper(resolve_part("audio_encoders", audio_encoder))
            defaults = {}
        name = path.stem if path.parent.name != "weights" else "omnisync_demo"
        if is_demo(read_header(path)[1]):
            print(f"OmniSync: {DEMO_NOTICE}")
        return io.NodeOutput(OmniSyncModel.wrap(name, dit, codec, whisper, defaults, precision))


NODES = [OmniSyncModelLoader]
__all__ = ["OmniSyncModelLoader", "NODES", "MODEL_FOLDER"]
