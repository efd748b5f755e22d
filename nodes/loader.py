"""OmniSync Model Loader: any model family's checkpoint and its companions -> OMNISYNC_MODEL. An OmniSync bundle
(or DiT + VAE + Whisper) loads at once under ComfyUI's model management; the other families (HuMo, LatentSync,
InfiniteTalk) are resolved here, file by file, and load when first used."""

from __future__ import annotations

from comfy_api.latest import io

from ..omnisync_core.errors import InputError
from ..omnisync_core.families import family_of, recognise
from ..omnisync_core.families.base import OFFLOAD_MODES
from ..omnisync_core.families.files import resolve_files
from ..omnisync_core.model.bundle import load_bundle
from ..omnisync_core.families.omnisync import DEMO_NOTICE, is_demo
from ..omnisync_core.model.loading import load_dit, load_vae, load_whisper, read_header, read_safetensors
from ._comfy import (AUTO, FROM_BUNDLE, MODEL_FOLDER, FamilyModel, OmniSyncModel, _precision, download_model,
                     model_choices, model_index, part_choices, release_family_models, resolve_model, resolve_part)
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
            description="Loads a lip-sync model of any supported family: an OmniSync bundle or DiT (models/omnisync; "
                        "the bundled demo needs no download), HuMo 1.7B, LatentSync 1.6 or Wan2.1 I2V + InfiniteTalk "
                        "(models/diffusion_models). Companions left at 'from bundle' / 'auto' are found by their "
                        "contents in models/vae, audio_encoders, text_encoders, clip_vision and model_patches. "
                        "Weights are read from safetensors only. Text: wire positive/negative CONDITIONING from "
                        "ComfyUI's own text encoder, or let the loader encode the prompt with the umT5 file.",
            inputs=[
                io.Combo.Input("model", options=model_choices(), default=model_choices()[0],
                               tooltip="The lip-sync checkpoint: the bundled demo (trained on synthetic cartoon "
                                       "faces: not for real footage), an OmniSync model from models/omnisync, or a "
                                       "HuMo / LatentSync / Wan2.1 I2V checkpoint from models/diffusion_models."),
                io.Combo.Input("vae", options=part_choices("vae"), default=FROM_BUNDLE,
                               tooltip="The VAE from models/vae (Wan2.1's, or LatentSync's SD VAE). 'from bundle': "
                                       "the bundle's own, or for other families the right one found in models/vae "
                                       "by its contents."),
                io.Combo.Input("audio_encoder", options=part_choices("audio_encoders"), default=FROM_BUNDLE,
                               tooltip="The audio encoder from models/audio_encoders (Whisper or wav2vec2). 'from "
                                       "bundle': the bundle's own, or for other families the right one found by its "
                                       "contents."),
                io.Combo.Input("precision", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Precision of the diffusion transformer. auto: bf16 (or fp16) on a GPU that "
                                       "supports it, fp32 on the CPU. The VAE and audio encoder stay in fp32."),
                io.String.Input("download", default="", optional=True,
                                tooltip="Optional: owner/repo/file.safetensors on the Hugging Face Hub to download "
                                        "into models/omnisync (once) and load instead of 'model'. Leave empty to "
                                        "never touch the network."),
                io.Combo.Input("text_encoder", options=part_choices("text_encoders", AUTO), default=AUTO,
                               optional=True,
                               tooltip="umT5-xxl from models/text_encoders (umt5_xxl_fp16 or _fp8_e4m3fn_scaled), for "
                                       "families that take a prompt (HuMo, InfiniteTalk) when no CONDITIONING is "
                                       "wired. auto: found by its contents."),
                io.Combo.Input("clip_vision", options=part_choices("clip_vision", AUTO), default=AUTO, optional=True,
                               tooltip="CLIP vision ViT-H (clip_vision_h) from models/clip_vision, for InfiniteTalk. "
                                       "auto: found by its contents."),
                io.Combo.Input("patch", options=part_choices("model_patches", AUTO), default=AUTO, optional=True,
                               tooltip="A model patch from models/model_patches: InfiniteTalk's audio adapter for a "
                                       "Wan2.1 I2V model. auto: found by its contents."),
                io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="none", optional=True,
                               tooltip="GPU memory of the families that load on use: none (fastest), model (each "
                                       "model on the GPU only for its stage), sequential (also the transformer "
                                       "block by block: the slowest, for 8 GB cards; families that support it)."),
                io.Boolean.Input("fp8", default=False, optional=True,
                                 tooltip="Store the big transformer's weights in float8 with scales (about half the "
                                         "VRAM of bf16; families that support it, e.g. InfiniteTalk 14B). A "
                                         "fp8_scaled file is used as it is."),
                io.Int.Input("swap_blocks", default=0, min=0, max=64, optional=True,
                             tooltip="Keep this many transformer blocks in host RAM and stream them to the GPU as "
                                     "they run (families that support it, e.g. InfiniteTalk 14B). 0 = none."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="Prompt for families that take one, encoded with the umT5 text encoder when "
                                        "no CONDITIONING is wired. Empty: the family's own (HuMo's talking-person "
                                        "prompt)."),
                io.String.Input("negative_prompt", default="", multiline=True, optional=True,
                                tooltip="Negative prompt for families that take one. Empty: Wan's default."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Optional umT5 text conditioning from ComfyUI's own text encoder "
                                              "(Load CLIP type wan + CLIP Text Encode), for HuMo / InfiniteTalk."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional negative text conditioning, with positive."),
            ],
            outputs=[OmniSyncModelType.Output(display_name="model",
                                              tooltip="The loaded model, for the other OmniSync nodes.")],
        )

    @classmethod
    def execute(cls, model: str, vae: str, audio_encoder: str, precision: str, download: str = "",
                text_encoder: str = AUTO, clip_vision: str = AUTO, patch: str = AUTO, offload: str = "none",
                fp8: bool = False, swap_blocks: int = 0, prompt: str = "", negative_prompt: str = "",
                positive=None, negative=None) -> io.NodeOutput:
        path = download_model(download) if download and download.strip() else resolve_model(model)
        family = family_of(recognise(path))
        if family.name != "omnisync":
            given = {"vae": ("vae", vae), "audio_encoder": ("audio_encoders", audio_encoder),
                     "text_encoder": ("text_encoders", text_encoder), "clip_vision": ("clip_vision", clip_vision),
                     "patch": ("model_patches", patch)}
            loaded = _family_model(path, given, precision, offload, fp8, swap_blocks, prompt, negative_prompt,
                                   positive, negative)
            return io.NodeOutput(loaded)
        if positive is not None or negative is not None:
            raise InputError(f"{path.name} is an OmniSync model, which takes no text: disconnect positive and "
                             f"negative")
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


def _family_model(path, given, precision, offload, fp8, swap_blocks, prompt, negative_prompt, positive,
                  negative) -> FamilyModel:
    """Resolve a family's files (the ones chosen, the others found in ComfyUI's folders) and its memory plan."""
    import comfy.model_management as mm

    chosen = {role: str(resolve_part(folder, name)) for role, (folder, name) in given.items()
              if name not in (AUTO, FROM_BUNDLE)}
    notes: list[str] = []
    family, files = resolve_files(str(path), given=chosen, index=model_index(), notes=notes)
    for note in notes:
        print(f"OmniSync: {note}", flush=True)
    files.prompt, files.negative_prompt = prompt.strip() or None, negative_prompt.strip() or None
    if positive is not None or negative is not None:
        if positive is None or negative is None:
            raise InputError("wire both positive and negative conditioning, or neither")
        files.conditioning = (positive, negative)
    device = mm.get_torch_device()
    plan = family.memory_plan(device, _precision(precision, device), offload=offload, fp8=bool(fp8),
                              swap_blocks=int(swap_blocks), recognition=files.recognition)
    release_family_models()             # a new choice of files: the old family model's weights go now
    print(f"OmniSync: {files.recognition.describe()}; {plan.describe()}", flush=True)
    return FamilyModel(path.stem, family, files, plan, family.defaults_for(files))


NODES = [OmniSyncModelLoader]
__all__ = ["OmniSyncModelLoader", "NODES", "MODEL_FOLDER"]
