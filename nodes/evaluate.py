"""OmniSync Evaluate: lip-sync metrics of frames in the graph (frames + audio + optional source and ground truth ->
metrics as text and a picture of the mouth against the speech), to compare settings side by side."""

from __future__ import annotations

import os

from comfy_api.latest import io

from ..omnisync_core.errors import InputError
from ._comfy import Progress, read_audio
from .sockets import CATEGORY


def _weights(path: str, what: str):
    path = (path or "").strip()
    if not path:
        return None
    if not os.path.isfile(path):
        raise InputError(f"{what} weights not found: {path}")
    return path


class OmniSyncEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncEvaluate",
            display_name="OmniSync Evaluate",
            category=CATEGORY,
            description="Measures a lip sync the way papers do and shows it the way an artist looks: does the mouth "
                        "open with the speech (mouth-audio correlation; LSE-C/LSE-D with SyncNet weights), does "
                        "anything outside the mouth change (PSNR/SSIM against the source), does it shake (mouth "
                        "jitter, seam error), how close is it to a ground truth (LMD), does it keep the identity "
                        "(CSIM with ArcFace weights) and does it pass the success rule. Returns the numbers as text "
                        "and a picture: mouth opening against the speech envelope over a strip of mouth crops.",
            inputs=[
                io.Image.Input("images", tooltip="The lip-synced frames to measure (e.g. from OmniSync Lip Sync)."),
                io.Audio.Input("audio", tooltip="The speech the mouth should follow (the driving audio)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=1000.0, step=0.001,
                               tooltip="Frame rate of the frames."),
                io.Image.Input("source_images", optional=True,
                               tooltip="The frames before lip sync (same size): enables the fidelity metrics, "
                                       "jitter against the source and the mouth strip."),
                io.Image.Input("ground_truth", optional=True,
                               tooltip="Frames of the same face really saying this audio, when you have them: "
                                       "enables LMD and PSNR/SSIM of the face against the truth."),
                io.Int.Input("window", default=0, min=0, max=1024, optional=True,
                             tooltip="Frames per window the lip sync used (0 = unknown: no seam error)."),
                io.Int.Input("overlap", default=0, min=0, max=512, optional=True,
                             tooltip="Frames shared by neighbouring windows, for the seam error."),
                io.String.Input("syncnet_path", default="", optional=True,
                                tooltip="Optional SyncNet weights (.safetensors converted from syncnet_v2.model "
                                        "with omnisync eval --convert-syncnet) for LSE-C / LSE-D."),
                io.String.Input("arcface_path", default="", optional=True,
                                tooltip="Optional ArcFace IResNet weights (.safetensors, arcface_torch names) for "
                                        "CSIM."),
            ],
            outputs=[
                io.String.Output(display_name="metrics", tooltip="Every metric with its unit and direction, the "
                                                                  "success rule, and notes on what was skipped."),
                io.Image.Output(display_name="plots", tooltip="Mouth opening against the speech envelope, above "
                                                              "the mouth strip (source, output, 4x difference)."),
            ],
        )

    @classmethod
    def execute(cls, images, audio, fps: float, source_images=None, ground_truth=None, window: int = 0,
                overlap: int = 0, syncnet_path: str = "", arcface_path: str = "") -> io.NodeOutput:
        from ..omnisync_core.eval.single import evaluate_frames
        from ..omnisync_core.face.analyze import FaceAnalyzer

        progress = Progress(1)
        samples, rate = read_audio(audio)
        syncnet = arcface = None
        if _weights(syncnet_path, "SyncNet"):
            from ..omnisync_core.eval.syncnet import load_syncnet

            syncnet = load_syncnet(syncnet_path.strip())
        if _weights(arcface_path, "ArcFace"):
            from ..omnisync_core.eval.identity import load_arcface

            arcface = load_arcface(arcface_path.strip())
        progress.check()
        windows = (int(window), int(overlap)) if window >= 5 else None
        result = evaluate_frames(images, samples, rate, fps, source=source_images, truth=ground_truth,
                                 analyzer=FaceAnalyzer(), syncnet=syncnet, arcface=arcface, windows=windows)
        progress.bar.update_absolute(1, 1)
        return io.NodeOutput(result.text, (result.image.float() / 255.0).unsqueeze(0))


NODES = [OmniSyncEvaluate]
