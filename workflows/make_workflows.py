"""Writes the example workflows in both ComfyUI formats from one description:

    workflows/<name>.json       UI format: open it in ComfyUI (drag it onto the canvas)
    workflows/api/<name>.json   API format: the same graph for POST /prompt (the tests run these)

Run ``python workflows/make_workflows.py`` after changing a node's inputs; the tests check that every UI workflow's
widgets follow the server's /object_info input order. Inputs expected in ComfyUI's input folder: face.mp4 (the
video) and speech.wav (the new speech); the repository's examples/ folder has both.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIDEO, SPEECH, MODEL = "face.mp4", "speech.wav", "omnisync_demo (bundled)"

# Socket (non-widget) types; everything else is a widget.
SOCKETS = {"IMAGE", "AUDIO", "VIDEO", "OMNISYNC_MODEL", "OMNISYNC_AUDIO_EMBEDS", "OMNISYNC_FACE_TRACK",
           "OMNISYNC_LATENTS", "CONDITIONING"}
HUMO_MODEL = "humo_1.7B_fp16.safetensors"
LATENTSYNC_MODEL = "latentsync_unet.safetensors"                      # what omnisync download latentsync-1.6 writes
INFINITETALK_MODEL = "wan2.1_i2v_480p_14B_fp8_scaled.safetensors"
FACE = [("length_policy", "COMBO", "pingpong"), ("detector", "COMBO", "auto"), ("face_index", "INT", -1),
        ("box", "STRING", ""), ("crop_size", "INT", 0), ("crop_margin", "FLOAT", 0.3)]
WINDOW = [("window", "INT", 0), ("overlap", "INT", -1)]
SAMPLER = [("steps", "INT", 0), ("guidance", "COMBO", "auto")]
COMMON = [("seed", "INT", 0), *SAMPLER, ("tau", "FLOAT", 0.0), *FACE, *WINDOW, ("color_match", "BOOLEAN", False)]

# node type -> (inputs in schema order as (name, type, default), outputs as (name, type))
SPECS = {
    "LoadVideo": ([("file", "COMBO", VIDEO)], [("VIDEO", "VIDEO")]),
    "LoadAudio": ([("audio", "COMBO", SPEECH)], [("AUDIO", "AUDIO")]),
    "GetVideoComponents": ([("video", "VIDEO", None)], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": ([("images", "IMAGE", None), ("fps", "FLOAT", 30.0), ("audio", "AUDIO", None)],
                    [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO", None), ("filename_prefix", "STRING", "video/OmniSync"),
                   ("format", "COMBO", "auto"), ("codec", "COMBO", "auto")], []),
    "OmniSyncModelLoader": ([("model", "COMBO", MODEL), ("vae", "COMBO", "from bundle"),
                             ("audio_encoder", "COMBO", "from bundle"), ("precision", "COMBO", "auto"),
                             ("download", "STRING", ""), ("text_encoder", "COMBO", "auto"),
                             ("clip_vision", "COMBO", "auto"), ("patch", "COMBO", "auto"),
                             ("offload", "COMBO", "none"), ("fp8", "BOOLEAN", False), ("swap_blocks", "INT", 0),
                             ("prompt", "STRING", ""), ("negative_prompt", "STRING", ""),
                             ("positive", "CONDITIONING", None), ("negative", "CONDITIONING", None)],
                            [("model", "OMNISYNC_MODEL")]),
    "OmniSyncAudioEncode": ([("model", "OMNISYNC_MODEL", None), ("audio", "AUDIO", None), ("fps", "FLOAT", 25.0)],
                            [("audio_embeds", "OMNISYNC_AUDIO_EMBEDS"), ("frame_count", "INT")]),
    "OmniSyncFaceCrop": ([("model", "OMNISYNC_MODEL", None), ("images", "IMAGE", None),
                          ("audio_embeds", "OMNISYNC_AUDIO_EMBEDS", None), *FACE],
                         [("crops", "IMAGE"), ("face_track", "OMNISYNC_FACE_TRACK"), ("frame_count", "INT")]),
    "OmniSyncNoiseInit": ([("model", "OMNISYNC_MODEL", None), ("crops", "IMAGE", None),
                           ("face_track", "OMNISYNC_FACE_TRACK", None), ("tau", "FLOAT", 0.0), ("seed", "INT", 0),
                           *WINDOW], [("latents", "OMNISYNC_LATENTS")]),
    "OmniSyncSampler": ([("model", "OMNISYNC_MODEL", None), ("latents", "OMNISYNC_LATENTS", None),
                         ("audio_embeds", "OMNISYNC_AUDIO_EMBEDS", None), ("face_track", "OMNISYNC_FACE_TRACK", None),
                         *SAMPLER, ("omega_peak", "FLOAT", 4.5), ("omega_base", "FLOAT", 1.0), ("gamma", "FLOAT", 1.5),
                         ("s_ratio", "FLOAT", 0.15), ("floor", "FLOAT", 1.0), ("cfg_scale", "FLOAT", 4.5)],
                        [("latents", "OMNISYNC_LATENTS")]),
    "OmniSyncDecode": ([("model", "OMNISYNC_MODEL", None), ("latents", "OMNISYNC_LATENTS", None)],
                       [("crops", "IMAGE")]),
    "OmniSyncPasteBack": ([("images", "IMAGE", None), ("crops", "IMAGE", None),
                           ("face_track", "OMNISYNC_FACE_TRACK", None), ("feather", "FLOAT", 0.1),
                           ("color_match", "BOOLEAN", False)],
                          [("images", "IMAGE"), ("audio", "AUDIO"), ("frame_count", "INT"), ("fps", "FLOAT")]),
    "OmniSyncLipSync": ([("model", "OMNISYNC_MODEL", None), ("images", "IMAGE", None), ("audio", "AUDIO", None),
                         ("fps", "FLOAT", 25.0), *COMMON],
                        [("images", "IMAGE"), ("audio", "AUDIO"), ("frame_count", "INT"), ("fps", "FLOAT")]),
    "OmniSyncLipSyncVideo": ([("model", "OMNISYNC_MODEL", None), ("video", "VIDEO", None), ("audio", "AUDIO", None),
                              ("filename_prefix", "STRING", "video/OmniSync"), *COMMON],
                             [("video", "VIDEO"), ("audio", "AUDIO"), ("frame_count", "INT"), ("fps", "FLOAT")]),
}
OPTIONAL = {("CreateVideo", "audio"), ("OmniSyncModelLoader", "positive"), ("OmniSyncModelLoader", "negative")}
SEEDS = {"seed"}                       # widgets with a "control after generate" companion in the UI
UPLOAD_EXTRA = {"LoadVideo": ["image"], "LoadAudio": [None, None]}   # the upload widgets' placeholders


class Graph:
    def __init__(self, title: str):
        self.title, self.nodes, self.links = title, [], []

    def add(self, type_: str, pos, size=(320, 120), title=None, **values) -> dict:
        inputs, _ = SPECS[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "title": title,
                "values": {n: values.get(n, d) for n, t, d in inputs if t not in SOCKETS}, "links_in": {}}
        unknown = set(values) - {n for n, *_ in inputs}
        assert not unknown, (type_, unknown)
        self.nodes.append(node)
        return node

    def connect(self, src: dict, output: str, dst: dict, input_: str) -> None:
        outs = SPECS[src["type"]][1]
        slot = [n for n, _ in outs].index(output)
        self.links.append((len(self.links) + 1, src, slot, outs[slot][1], dst, input_))
        dst["links_in"][input_] = self.links[-1]

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            inputs = dict(node["values"])
            for name, (_, src, slot, *_rest) in node["links_in"].items():
                inputs[name] = [str(src["id"]), slot]
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                       "_meta": {"title": node["title"] or node["type"]}}
        return prompt

    def ui(self) -> dict:
        nodes = []
        for order, node in enumerate(self.nodes):
            spec_in, spec_out = SPECS[node["type"]]
            inputs = []
            for name, type_, _ in spec_in:
                link = node["links_in"].get(name)
                if type_ in SOCKETS:
                    item = {"name": name, "type": type_, "link": link[0] if link else None}
                    if (node["type"], name) in OPTIONAL:
                        item["shape"] = 7
                    inputs.append(item)
                elif link:
                    inputs.append({"name": name, "type": type_, "widget": {"name": name}, "link": link[0]})
            outputs = []
            for slot, (name, type_) in enumerate(spec_out):
                ids = [l[0] for l in self.links if l[1] is node and l[2] == slot]
                outputs.append({"name": name, "type": type_, "links": ids, "slot_index": slot})
            widgets = []
            for name, type_, _ in spec_in:
                if type_ in SOCKETS:
                    continue
                widgets.append(node["values"][name])
                if name in SEEDS:
                    widgets.append("fixed")
            widgets += UPLOAD_EXTRA.get(node["type"], [])
            item = {"id": node["id"], "type": node["type"], "pos": node["pos"], "size": node["size"], "flags": {},
                    "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                    "properties": {"Node name for S&R": node["type"]}, "widgets_values": widgets}
            if node["title"]:
                item["title"] = node["title"]
            nodes.append(item)
        links = [[i, src["id"], slot, dst["id"], _input_slot(dst, name), type_]
                 for i, src, slot, type_, dst, name in self.links]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 40]},
                                                       "info": {"title": self.title}}, "version": 0.4}


def _input_slot(node: dict, name: str) -> int:
    """Index of an input in the node's UI 'inputs' list (sockets, plus widgets that are linked)."""
    names = [n for n, t, _ in SPECS[node["type"]][0] if t in SOCKETS or n in node["links_in"]]
    return names.index(name)


def basic() -> Graph:
    g = Graph("OmniSync: lip sync in one node")
    video = g.add("LoadVideo", (0, 0), (300, 320), title="Video to lip-sync")
    speech = g.add("LoadAudio", (0, 360), (300, 140), title="New speech")
    parts = g.add("GetVideoComponents", (340, 0), (220, 80))
    model = g.add("OmniSyncModelLoader", (340, 180), (320, 180))
    sync = g.add("OmniSyncLipSync", (700, 0), (340, 560))
    create = g.add("CreateVideo", (1080, 0), (240, 100))
    save = g.add("SaveVideo", (1360, 0), (380, 420), filename_prefix="video/OmniSync")
    g.connect(video, "VIDEO", parts, "video")
    g.connect(model, "model", sync, "model")
    g.connect(parts, "images", sync, "images")
    g.connect(speech, "AUDIO", sync, "audio")
    g.connect(parts, "fps", sync, "fps")
    g.connect(sync, "images", create, "images")
    g.connect(sync, "fps", create, "fps")
    g.connect(sync, "audio", create, "audio")
    g.connect(create, "VIDEO", save, "video")
    return g


def granular() -> Graph:
    g = Graph("OmniSync: the pipeline node by node")
    video = g.add("LoadVideo", (0, 0), (300, 320), title="Video to lip-sync")
    speech = g.add("LoadAudio", (0, 360), (300, 140), title="New speech")
    parts = g.add("GetVideoComponents", (340, 0), (220, 80))
    model = g.add("OmniSyncModelLoader", (340, 180), (320, 180))
    embed = g.add("OmniSyncAudioEncode", (700, 360), (300, 100))
    crop = g.add("OmniSyncFaceCrop", (700, 0), (320, 300))
    init = g.add("OmniSyncNoiseInit", (1060, 0), (300, 220))
    sampler = g.add("OmniSyncSampler", (1400, 0), (320, 340))
    decode = g.add("OmniSyncDecode", (1760, 0), (240, 80))
    paste = g.add("OmniSyncPasteBack", (1760, 160), (280, 160))
    create = g.add("CreateVideo", (2080, 0), (240, 100))
    save = g.add("SaveVideo", (2360, 0), (380, 420), filename_prefix="video/OmniSync_granular")
    g.connect(video, "VIDEO", parts, "video")
    g.connect(model, "model", embed, "model")
    g.connect(speech, "AUDIO", embed, "audio")
    g.connect(parts, "fps", embed, "fps")
    g.connect(model, "model", crop, "model")
    g.connect(parts, "images", crop, "images")
    g.connect(embed, "audio_embeds", crop, "audio_embeds")
    g.connect(model, "model", init, "model")
    g.connect(crop, "crops", init, "crops")
    g.connect(crop, "face_track", init, "face_track")
    g.connect(model, "model", sampler, "model")
    g.connect(init, "latents", sampler, "latents")
    g.connect(embed, "audio_embeds", sampler, "audio_embeds")
    g.connect(crop, "face_track", sampler, "face_track")
    g.connect(model, "model", decode, "model")
    g.connect(sampler, "latents", decode, "latents")
    g.connect(parts, "images", paste, "images")
    g.connect(decode, "crops", paste, "crops")
    g.connect(crop, "face_track", paste, "face_track")
    g.connect(paste, "images", create, "images")
    g.connect(paste, "fps", create, "fps")
    g.connect(paste, "audio", create, "audio")
    g.connect(create, "VIDEO", save, "video")
    return g


def long_video() -> Graph:
    g = Graph("OmniSync: long videos, streamed file to file")
    video = g.add("LoadVideo", (0, 0), (300, 320), title="Video to lip-sync (any length)")
    speech = g.add("LoadAudio", (0, 360), (300, 140), title="New speech")
    model = g.add("OmniSyncModelLoader", (340, 180), (320, 180))
    sync = g.add("OmniSyncLipSyncVideo", (700, 0), (380, 640), filename_prefix="video/OmniSync_long")
    g.connect(model, "model", sync, "model")
    g.connect(video, "VIDEO", sync, "video")
    g.connect(speech, "AUDIO", sync, "audio")
    return g


def humo() -> Graph:
    g = Graph("OmniSync: real faces with HuMo 1.7B (omnisync download humo-1.7b)")
    video = g.add("LoadVideo", (0, 0), (300, 320), title="Video to lip-sync (any length, any fps)")
    speech = g.add("LoadAudio", (0, 360), (300, 140), title="New speech")
    model = g.add("OmniSyncModelLoader", (340, 0), (340, 520), title="HuMo 1.7B (+ Wan VAE, Whisper, umT5)",
                  model=HUMO_MODEL)
    sync = g.add("OmniSyncLipSyncVideo", (720, 0), (380, 640), filename_prefix="video/OmniSync_humo")
    g.connect(model, "model", sync, "model")
    g.connect(video, "VIDEO", sync, "video")
    g.connect(speech, "AUDIO", sync, "audio")
    return g


def latentsync() -> Graph:
    g = Graph("OmniSync: real faces with LatentSync 1.6 on an 8 GB card (omnisync download latentsync-1.6)")
    video = g.add("LoadVideo", (0, 0), (300, 320), title="Video to lip-sync (any length, any fps)")
    speech = g.add("LoadAudio", (0, 360), (300, 140), title="New speech")
    model = g.add("OmniSyncModelLoader", (340, 0), (340, 520), title="LatentSync 1.6 (+ SD VAE, Whisper tiny)",
                  model=LATENTSYNC_MODEL)
    sync = g.add("OmniSyncLipSyncVideo", (720, 0), (380, 640), filename_prefix="video/OmniSync_latentsync")
    g.connect(model, "model", sync, "model")
    g.connect(video, "VIDEO", sync, "video")
    g.connect(speech, "AUDIO", sync, "audio")
    return g


def infinitetalk() -> Graph:
    g = Graph("OmniSync: InfiniteTalk 14B on a 24 GB card: fp8 weights, 10 blocks swapped (omnisync download "
              "infinitetalk)")
    video = g.add("LoadVideo", (0, 0), (300, 320), title="Video to lip-sync (any length, any fps)")
    speech = g.add("LoadAudio", (0, 360), (300, 140), title="New speech")
    model = g.add("OmniSyncModelLoader", (340, 0), (340, 560),
                  title="Wan2.1 I2V 14B + InfiniteTalk patch (+ CLIP-H, wav2vec2, Wan VAE, umT5)",
                  model=INFINITETALK_MODEL, offload="model", swap_blocks=10, prompt="a person talking")
    sync = g.add("OmniSyncLipSyncVideo", (720, 0), (380, 640), filename_prefix="video/OmniSync_infinitetalk")
    g.connect(model, "model", sync, "model")
    g.connect(video, "VIDEO", sync, "video")
    g.connect(speech, "AUDIO", sync, "audio")
    return g


WORKFLOWS = {"omnisync_lipsync_basic": basic, "omnisync_lipsync_granular": granular,
             "omnisync_lipsync_long_video": long_video, "omnisync_lipsync_humo": humo,
             "omnisync_lipsync_latentsync": latentsync, "omnisync_lipsync_infinitetalk": infinitetalk}


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        graph = build()
        for path, data in ((HERE / f"{name}.json", graph.ui()), (HERE / "api" / f"{name}.json", graph.api())):
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(path)
            print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
