"""OmniSync Audio Encode: AUDIO + fps -> per-frame Whisper embeddings of the whole track."""

from __future__ import annotations

from comfy_api.latest import io

from ..omnisync_core.frames import embed_audio
from ._comfy import OmniSyncModel, Progress, read_audio, read_fps
from .sockets import CATEGORY, AudioEmbedsType, OmniSyncModelType


class OmniSyncAudioEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncAudioEncode",
            display_name="OmniSync Audio Encode",
            category=CATEGORY,
            description="Encodes speech with the model's Whisper encoder over the whole track (in overlapping 30 s "
                        "windows, so there is no seam every 30 s) and lines the features up with the video frames "
                        "at the given frame rate, exactly, for any length.",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader."),
                io.Audio.Input("audio", tooltip="The speech the mouth should follow (any sample rate, mono or "
                                                "stereo)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=1000.0, step=0.001,
                               tooltip="Frame rate of the video (connect Get Video Components' fps). 29.97 and "
                                       "23.976 are taken as 30000/1001 and 24000/1001."),
            ],
            outputs=[
                AudioEmbedsType.Output(display_name="audio_embeds",
                                       tooltip="Per-frame audio features for Face Crop and the DS-CFG Sampler."),
                io.Int.Output(display_name="frame_count", tooltip="How many video frames the audio lasts."),
            ],
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, audio, fps: float) -> io.NodeOutput:
        samples, rate = read_audio(audio)
        progress = Progress()
        model.load("audio")
        embeds = embed_audio(samples, rate, model.generator(), read_fps(fps), progress=progress.counter)
        model.offload("audio")
        return io.NodeOutput(embeds, embeds.num_frames)


NODES = [OmniSyncAudioEncode]
