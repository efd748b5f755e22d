"""The pack in a real ComfyUI server ($COMFYUI_PATH, headless on the CPU; skipped without it): it starts with the
pack, /object_info lists every node with its tooltips, the UI workflows agree with the server's input order, and
every API workflow in workflows/api runs to success and writes an mp4 with audio whose frame count matches the
audio. Models come through extra_model_paths.yaml (a tiny random bundle) and, when it is installed, the bundled
demo model."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from comfy_helpers import REPO, ComfyServer, requires_comfyui, temp_root
from tiny_models import chirp, talking_pattern, write_tiny_bundle

pytestmark = requires_comfyui

WORKFLOWS = REPO / "workflows"
API = sorted((WORKFLOWS / "api").glob("*.json"))
NODE_IDS = ["OmniSyncModelLoader", "OmniSyncAudioEncode", "OmniSyncFaceCrop", "OmniSyncNoiseInit", "OmniSyncSampler",
            "OmniSyncDecode", "OmniSyncPasteBack", "OmniSyncLipSync", "OmniSyncLipSyncVideo"]
DEMO_ENTRY = "omnisync_demo (bundled)"
TINY = {"crop_size": 32, "window": 9, "overlap": 2, "steps": 4, "tau": 0.92, "audio_before": 1, "audio_after": 1}
SOCKETS = {"IMAGE", "AUDIO", "VIDEO", "OMNISYNC_MODEL", "OMNISYNC_AUDIO_EMBEDS", "OMNISYNC_FACE_TRACK",
           "OMNISYNC_LATENTS", "MASK", "LATENT", "MODEL"}


def _write_inputs(folder: Path) -> None:
    from conftest import write_wav
    from omnisync_core.io import VideoWriter

    frames = (talking_pattern(12) * 255).round().to(torch.uint8)
    with VideoWriter(folder / "face.mp4", 25) as writer:
        writer.write(frames)
    write_wav(folder / "speech.wav", chirp(0.9, channels=1)[0].numpy(), 22050)


@pytest.fixture(scope="module")
def server():
    root = temp_root("omnisync-server-")
    models = root / "extra_models" / "omnisync"
    write_tiny_bundle(models / "tiny.safetensors", defaults=TINY)
    server = ComfyServer(root, {"omnisync": models})
    try:
        server.wait_ready()
        _write_inputs(root / "input")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_server_starts_with_the_pack_and_lists_every_node_with_tooltips(server, object_info):
    log = server.tail(200000)
    assert "comfyui-omnisync" in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "omnisync" in line]
    for node_id in NODE_IDS:
        info = object_info[node_id]
        assert info["category"] == "OmniSync" and len(info["description"]) > 40
        assert "comfyui-omnisync" in info["python_module"]
        for section in ("required", "optional"):
            for name, (type_, options) in info["input"].get(section, {}).items():
                assert options.get("tooltip"), (node_id, name)
        assert all(info["output_tooltips"]), node_id
    models = object_info["OmniSyncModelLoader"]["input"]["required"]["model"][1]["options"]
    assert models[0] == DEMO_ENTRY and "tiny.safetensors" in models          # found through extra_model_paths.yaml
    assert object_info["OmniSyncLipSyncVideo"]["output_node"] is True


def _widget_names(info: dict) -> list[str]:
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            type_ = spec[0]
            if isinstance(type_, str) and type_ in SOCKETS or type_ == "AUDIO_UI":
                continue
            names.append(name)
            if isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                names.append(None)                                        # the control widget
            if isinstance(spec[1], dict) and (spec[1].get("video_upload") or spec[1].get("audio_upload")
                                              or spec[1].get("image_upload")):
                names.append(None)
    return names


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflows_follow_the_server_and_match_their_api_copies(object_info, path):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / path.name).read_text())
    links = {link[0]: link for link in ui["links"]}
    rebuilt = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        names = _widget_names(info)
        values = node["widgets_values"]
        upload_extra = len(values) - len(names)
        assert upload_extra >= 0, (node["type"], values, names)
        inputs = {n: v for n, v in zip(names, values) if n is not None}
        for item in node["inputs"]:
            if item.get("link") is not None:
                link = links[item["link"]]
                assert link[3] == node["id"]
                inputs[item["name"]] = [str(link[1]), link[2]]
                out = [n for n in ui["nodes"] if n["id"] == link[1]][0]["outputs"][link[2]]
                assert item["link"] in out["links"] and out["type"] == link[5]
        rebuilt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == rebuilt


def _outputs(entry: dict) -> list[dict]:
    saved = []
    for output in entry["outputs"].values():
        for item in output.get("images", []):
            if item.get("filename", "").endswith(".mp4"):
                saved.append(item)
    return saved


def _check_video(server: ComfyServer, saved: dict, speech: Path) -> int:
    import av

    from omnisync_core.audio import FrameAligner, SAMPLE_RATE, load_audio, to_whisper_rate
    from omnisync_core.io import probe_video

    path = server.root / "output" / saved["subfolder"] / saved["filename"]
    info = probe_video(path)
    wave = load_audio(speech)
    expected = FrameAligner(info.fps).num_frames(to_whisper_rate(wave.samples, wave.sample_rate).shape[0],
                                                 SAMPLE_RATE)
    assert info.has_audio and info.num_frames == expected, (info, expected)
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
    seconds = Fraction(info.num_frames) / info.fps
    assert abs(samples / stream.rate - float(seconds)) < 2048 / stream.rate + 0.03
    return info.num_frames


def _prepare(prompt: dict, model: str) -> dict:
    for node in prompt.values():
        if node["class_type"] == "OmniSyncModelLoader":
            node["inputs"]["model"] = model
    return prompt


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_workflow_runs_with_the_tiny_model(server, path):
    prompt = _prepare(json.loads(path.read_text()), "tiny.safetensors")
    entry = server.run_prompt(prompt)
    saved = _outputs(entry)
    assert len(saved) == 1, entry["outputs"]
    assert _check_video(server, saved[0], server.root / "input" / "speech.wav") == 23


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_workflow_runs_with_the_demo_model(server, path):
    from omnisync_core.model.bundle import DEMO_MODEL

    if not DEMO_MODEL.is_file():
        pytest.skip(f"the bundled demo model is not installed yet ({DEMO_MODEL} is missing)")
    examples = REPO / "examples"
    folder = server.root / "input"
    if (examples / "face.mp4").is_file() and (examples / "speech.wav").is_file():
        folder = server.root / "input" / "examples"
        folder.mkdir(exist_ok=True)
        for name in ("face.mp4", "speech.wav"):
            shutil.copyfile(examples / name, folder / name)
    prompt = json.loads(path.read_text())
    prefix = "examples/" if folder.name == "examples" else ""
    for node in prompt.values():
        if node["class_type"] == "LoadVideo":
            node["inputs"]["file"] = prefix + "face.mp4"
        if node["class_type"] == "LoadAudio":
            node["inputs"]["audio"] = prefix + "speech.wav"
    entry = server.run_prompt(prompt, timeout=1200)
    saved = _outputs(entry)
    assert len(saved) == 1, entry["outputs"]
    assert _check_video(server, saved[0], folder / "speech.wav") > 0
