"""OmniSync Face Crop (IMAGE -> face crops + FACE_TRACK) and OmniSync Paste Back (edited crops -> IMAGE)."""

from __future__ import annotations

from comfy_api.latest import io

from ..omnisync_core.frames import AudioEmbeds, FacePlan, crop_plan, paste_plan, plan_faces
from ._comfy import OmniSyncModel, Progress, comfy_audio, face_analyzer
from .options import face_inputs, lipsync_options
from .sockets import CATEGORY, AudioEmbedsType, FaceTrackType, OmniSyncModelType


class OmniSyncFaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncFaceCrop",
            display_name="OmniSync Face Crop",
            category=CATEGORY,
            description="Finds and tracks the face (pure-PyTorch MediaPipe detector and Face Mesh), lays out the "
                        "output frames against the audio's length, and cuts a square crop of the face from every "
                        "output frame. Frames without a face are passed through later; a clip without any face uses "
                        "the box or the frame centre. It never fails for want of a face.",
            inputs=[
                OmniSyncModelType.Input("model", tooltip="The model from OmniSync Model Loader (its crop size)."),
                io.Image.Input("images", tooltip="The video frames (e.g. from Get Video Components)."),
                AudioEmbedsType.Input("audio_embeds", tooltip="From OmniSync Audio Encode: sets how many frames the "
                                                              "output has."),
                *face_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="crops", tooltip="The face crop of every output frame."),
                FaceTrackType.Output(display_name="face_track",
                                     tooltip="Where each crop came from, for the sampler and Paste Back."),
                io.Int.Output(display_name="frame_count", tooltip="Frames in the output."),
            ],
        )

    @classmethod
    def execute(cls, model: OmniSyncModel, images, audio_embeds: AudioEmbeds, length_policy: str, detector: str,
                face_index: int, box: str, crop_size: int, crop_margin: float) -> io.NodeOutput:
        options = lipsync_options(model, length_policy=length_policy, detector=detector, face_index=face_index,
                                  box=box, crop_size=crop_size, crop_margin=crop_margin)
        progress = Progress(images.shape[0])
        plan = plan_faces(images, audio_embeds, face_analyzer(detector, model.device), options, progress.stage)
        crops = crop_plan(images, plan)
        return io.NodeOutput(crops, plan, plan.num_frames)


class OmniSyncPasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSyncPasteBack",
            display_name="OmniSync Paste Back",
            category=CATEGORY,
            description="Pastes the edited face crops back into the frames with a feathered edge (optionally "
                        "matching colours). Pixels outside the crop and frames without a face are the source's, "
                        "untouched. Also returns the audio trimmed or padded to exactly the output's length.",
            inputs=[
                io.Image.Input("images", tooltip="The original video frames (the ones given to Face Crop)."),
                io.Image.Input("crops", tooltip="The edited crops (from OmniSync Decode)."),
                FaceTrackType.Input("face_track", tooltip="From OmniSync Face Crop."),
                io.Float.Input("feather", default=0.1, min=0.0, max=0.5, step=0.01,
                               tooltip="Width of the blend at the crop's edge, as a fraction of the crop side."),
                io.Boolean.Input("color_match", default=False,
                                 tooltip="Match the edited crop's colours to the source crop's before pasting."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The lip-synced frames."),
                io.Audio.Output(display_name="audio", tooltip="The audio, exactly as long as the frames."),
                io.Int.Output(display_name="frame_count", tooltip="Number of output frames."),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the output (for Create Video)."),
            ],
        )

    @classmethod
    def execute(cls, images, crops, face_track: FacePlan, feather: float, color_match: bool) -> io.NodeOutput:
        progress = Progress(face_track.num_frames)
        progress.check()
        out = paste_plan(images, crops, face_track, feather=feather, color_match=color_match,
                         progress=progress.counter)
        audio = comfy_audio(face_track.output_audio().read_all(), face_track.audio.sample_rate)
        return io.NodeOutput(out, audio, face_track.num_frames, float(face_track.fps))


NODES = [OmniSyncFaceCrop, OmniSyncPasteBack]
