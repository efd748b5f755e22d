"""The pack in a real ComfyUI server ($COMFYUI_PATH, headless on the CPU; skipped without it): it starts with the
pack, /object_info lists every node with its tooltips, the UI workflows agree with the server's input order, and
every API workflow in workflows/api runs to success and writes an mp4 with audio whose frame count matches the
audio. Models come through extra_model_paths.yaml (a tiny random bundle) and, when it is installed, the bundled
demo model. On the same server, workflows that fail inside a node (a missing, pickled or truncated model, a corrupt
or frameless video, zero-length audio) report the node's one-line message and write nothing, and the good workflow
after each one runs and writes its mp4."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from comfy_helpers import REPO, ComfyServer, requires_comfyui, temp_root
from test_text_tokenizer import train_spiece
from tiny_models import (chirp, talking_pattern, write_tiny_bundle, write_tiny_humo, write_tiny_infinitetalk,
                         write_tiny_latentsync)

pytestmark = requires_comfyui

WORKFLOWS = REPO / "workflows"
# the OmniSync-family workflows (run with the tiny bundle and the demo); the HuMo one runs with tiny HuMo files
FAMILY_WORKFLOWS = {"omnisync_lipsync_humo", "omnisync_lipsync_latentsync", "omnisync_lipsync_infinitetalk"}
API = sorted(p for p in (WORKFLOWS / "api").glob("*.json") if p.stem not in FAMILY_WORKFLOWS)
NODE_IDS = ["OmniSyncModelLoader", "OmniSyncAudioEncode", "OmniSyncFaceCrop", "OmniSyncNoiseInit", "OmniSyncSampler",
            "OmniSyncDecode", "OmniSyncPasteBack", "OmniSyncLipSync", "OmniSyncLipSyncVideo"]
DEMO_ENTRY = "omnisync_demo (bundled)"
TINY = {"crop_size": 32, "window": 9, "overlap": 2, "steps": 4, "tau": 0.92, "audio_before": 1, "audio_after": 1}
SOCKETS = {"IMAGE", "AUDIO", "VIDEO", "OMNISYNC_MODEL", "OMNISYNC_AUDIO_EMBEDS", "OMNISYNC_FACE_TRACK",
           "OMNISYNC_LATENTS", "MASK", "LATENT", "MODEL", "CONDITIONING"}


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
    humo = root / "extra_models" / "humo"
    (root / "spiece").mkdir(parents=True)
    write_tiny_humo(humo, train_spiece(root / "spiece"))
    latentsync, infinitetalk = root / "extra_models" / "latentsync", root / "extra_models" / "infinitetalk"
    write_tiny_latentsync(latentsync)
    write_tiny_infinitetalk(infinitetalk)
    folders = {name: [r / name for r in (humo, latentsync, infinitetalk) if (r / name).is_dir()]
               for name in ("diffusion_models", "vae", "audio_encoders", "text_encoders", "clip_vision",
                            "model_patches")}
    server = ComfyServer(root, {"omnisync": models, **folders})
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
    assert {"humo_tiny.safetensors", "latentsync_tiny.safetensors", "wan_i2v_tiny_fp16.safetensors"} <= set(models)
    # family checkpoints, by their headers; the adapter patch is a companion, not a model
    assert "infinitetalk_tiny_fp16.safetensors" not in models
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


@pytest.mark.parametrize("name, shipped, tiny, loader, logged", [
    ("humo", "humo_1.7B_fp16.safetensors", "humo_tiny.safetensors", {}, "HuMo tiny"),
    ("latentsync", "latentsync_unet.safetensors", "latentsync_tiny.safetensors", {}, "LatentSync UNet"),
    ("infinitetalk", "wan2.1_i2v_480p_14B_fp8_scaled.safetensors", "wan_i2v_tiny_fp16.safetensors",
     {"swap_blocks": 1}, "Wan2.1 I2V")])
def test_family_workflow_runs_with_tiny_files(server, name, shipped, tiny, loader, logged):
    """workflows/api/omnisync_lipsync_<family>.json as shipped, with the family's tiny checkpoint in
    diffusion_models and its companions (VAE, audio encoder, umT5 with its sentencepiece embedded, CLIP vision,
    the InfiniteTalk patch) found by the loader in ComfyUI's folders by their contents; the prompt is encoded by
    the loader. Small crops keep it quick on the CPU; the windows are the family's own (0 / -1) but HuMo's."""
    prompt = json.loads((WORKFLOWS / "api" / f"omnisync_lipsync_{name}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "OmniSyncModelLoader":
            assert node["inputs"]["model"] == shipped
            node["inputs"].update(model=tiny, **loader)
        if node["class_type"] == "OmniSyncLipSyncVideo":
            node["inputs"].update(steps=2, crop_size=64, detector="none", box="40,24,88,72")
            if name == "humo":
                node["inputs"].update(window=9, overlap=2)
    entry = server.run_prompt(prompt)
    saved = _outputs(entry)
    assert len(saved) == 1, entry["outputs"]
    assert _check_video(server, saved[0], server.root / "input" / "speech.wav") == 23
    assert logged in server.tail(200000)


# ------------------------------------------------------------------------------------ a server that outlives errors

def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _workflow(name: str, seed: int, prefix: str, **changes) -> dict:
    """An API workflow with the tiny model, a seed and output prefix of its own (so ComfyUI's cache cannot answer
    it), and node inputs changed by class type: ``changes[class_type] = {input: value}``."""
    prompt = _prepare(json.loads((WORKFLOWS / "api" / f"omnisync_lipsync_{name}.json").read_text()),
                      "tiny.safetensors")
    for node in prompt.values():
        inputs = node["inputs"]
        if "seed" in inputs:
            inputs["seed"] = seed
        if "filename_prefix" in inputs:
            inputs["filename_prefix"] = prefix
        inputs.update(changes.get(node["class_type"], {}))
    return prompt


def _silence_instead_of_speech(prompt: dict) -> dict:
    """Load Audio replaced by ComfyUI's Empty Audio of duration 0: a zero-length AUDIO reaches the OmniSync node."""
    for node in prompt.values():
        if node["class_type"] == "LoadAudio":
            node["class_type"] = "EmptyAudio"
            node["inputs"] = {"duration": 0.0, "sample_rate": 22050, "channels": 1}
    return prompt


def _zero_frame_video(path: Path) -> None:
    """A container whose header is written and that holds no frame (the encoder is opened, nothing is encoded)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        container.start_encoding()


def _failing_inputs(server: ComfyServer) -> None:
    """The broken files of the failure cases, next to the good ones (written once per server)."""
    from conftest import write_wav

    inputs, models = server.root / "input", server.root / "extra_models" / "omnisync"
    if (inputs / "empty.wav").exists():
        return
    torch.save({"x": torch.zeros(1)}, models / "pickled.safetensors")       # a pickle under a safetensors name
    torch.save({"x": torch.zeros(1)}, models / "pickled.pt")
    data = (models / "tiny.safetensors").read_bytes()
    (models / "cut.safetensors").write_bytes(data[: len(data) // 2])           # an interrupted download
    (models / "gone.safetensors").symlink_to(server.root / "moved-away.safetensors")  # listed, but no file
    (inputs / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16)
    _zero_frame_video(inputs / "zero_frames.mp4")
    _zero_frame_video(inputs / "zero_frames.mkv")
    write_wav(inputs / "empty.wav", torch.zeros(0).numpy(), 22050)


# (workflow, what to change, failing node, exception class, the message) -- the failure happens while the workflow
# runs, inside the node named; every OmniSync one is an omnisync_core error with a one-line message.
RUNTIME_FAILURES = {
    # not in the loader's list (it lists safetensors only): ComfyUI 0.3.64 does not check V3 combo values, so the
    # loader itself says so; a ComfyUI that checks them refuses the prompt before it runs (also accepted below)
    "model_not_in_folder": ("basic", {"OmniSyncModelLoader": {"model": "missing.safetensors"}},
                            "OmniSyncModelLoader", "InputError",
                            r"'missing\.safetensors' was not found in models/omnisync"),
    "pickle_named_pt": ("long_video", {"OmniSyncModelLoader": {"model": "pickled.pt"}}, "OmniSyncModelLoader",
                        "PickleCheckpointError", r"pickled\.pt is a pickle.*refuses it"),
    "model_file_gone": ("basic", {"OmniSyncModelLoader": {"model": "gone.safetensors"}}, "OmniSyncModelLoader",
                        "InputError", r"'gone\.safetensors' was not found in models/omnisync"),
    "pickle_named_safetensors": ("basic", {"OmniSyncModelLoader": {"model": "pickled.safetensors"}},
                                 "OmniSyncModelLoader", "PickleCheckpointError",
                                 r"pickled\.safetensors is a pickle.*refuses it"),
    "truncated_safetensors": ("long_video", {"OmniSyncModelLoader": {"model": "cut.safetensors"}},
                              "OmniSyncModelLoader", "CheckpointError", r"cut\.safetensors is truncated or corrupt"),
    "corrupt_video": ("long_video", {"LoadVideo": {"file": "corrupt.mp4"}}, "OmniSyncLipSyncVideo", "VideoError",
                      r"not a readable video .*corrupt\.mp4"),
    "zero_frame_mp4": ("long_video", {"LoadVideo": {"file": "zero_frames.mp4"}}, "OmniSyncLipSyncVideo",
                       "VideoError", r"no video stream: .*zero_frames\.mp4"),
    "zero_frame_mkv": ("long_video", {"LoadVideo": {"file": "zero_frames.mkv"}}, "OmniSyncLipSyncVideo",
                       "VideoError", r"ends right after its header \(zero frames.*zero_frames\.mkv"),
    "zero_length_audio_one_node": ("basic", "silence", "OmniSyncLipSync", "AudioError", r"zero length"),
    "zero_length_audio_video_node": ("long_video", "silence", "OmniSyncLipSyncVideo", "AudioError", r"zero length"),
    "zero_length_audio_granular": ("granular", "silence", "OmniSyncAudioEncode", "AudioError", r"zero length"),
    # ComfyUI's own Load Audio refuses a zero-length WAV before any OmniSync node runs
    "zero_length_wav": ("basic", {"LoadAudio": {"audio": "empty.wav"}}, "LoadAudio", "ValueError",
                        r"^No audio frames decoded\.$"),
}


UNLISTED = ("model_not_in_folder", "pickle_named_pt")


def _model_of(prompt: dict) -> str:
    return next(n["inputs"]["model"] for n in prompt.values() if n["class_type"] == "OmniSyncModelLoader")


def _good_run(server: ComfyServer, name: str, seed: int, prefix: str) -> Path:
    entry = server.run_prompt(_workflow(name, seed, prefix))
    saved = _outputs(entry)
    assert len(saved) == 1, entry["outputs"]
    assert _check_video(server, saved[0], server.root / "input" / "speech.wav") == 23
    return server.root / "output" / saved[0]["subfolder"] / saved[0]["filename"]


def _assert_one_line_message(error: dict, node_type: str, exception: str, pattern: str) -> None:
    import re

    message = error["exception_message"]
    assert error["node_type"] == node_type, error
    assert error["exception_type"].rsplit(".", 1)[-1] == exception, error["exception_type"]
    if node_type.startswith("OmniSync"):
        assert ".omnisync_core." in error["exception_type"], error["exception_type"]   # our error, not PyAV's
    text = message.rstrip("\n")                                 # ComfyUI appends "\n" and its (empty) tips
    assert "\n" not in text and "Traceback" not in text and 'File "' not in text, message
    assert 0 < len(text) < 600 and re.search(pattern, text), text


@pytest.mark.parametrize("case", sorted(RUNTIME_FAILURES), ids=str)
def test_a_failing_workflow_reports_the_nodes_message_and_the_next_one_runs(server, case):
    """Fails inside a node: the execution error carries the node's one-line message, the output and temp folders
    gain nothing (no partial file), and the next good workflow on the same server writes its mp4."""
    _failing_inputs(server)
    workflow, change, node_type, exception, pattern = RUNTIME_FAILURES[case]
    seed = 100 + sorted(RUNTIME_FAILURES).index(case)
    output, temp = server.root / "output", server.root / "temp"
    before, temp_before = _files(output), _files(temp)
    if change == "silence":
        prompt = _silence_instead_of_speech(_workflow(workflow, seed, f"video/failed_{case}"))
    else:
        prompt = _workflow(workflow, seed, f"video/failed_{case}", **change)
    listed = server.get("/object_info/OmniSyncModelLoader")["OmniSyncModelLoader"]["input"]["required"]["model"]
    model = _model_of(prompt)
    assert (model not in listed[1]["options"]) == (case in UNLISTED)
    status, answer = server.submit("/prompt", {"prompt": prompt, "client_id": "omnisync-tests"})
    if status == 400 and case in UNLISTED:                     # a ComfyUI that checks V3 combo values
        details = [e["details"] for node in answer["node_errors"].values() for e in node["errors"]]
        assert any(f"'{model}' not in" in d for d in details), answer
    else:
        assert status == 200, answer
        _assert_one_line_message(server.failed_entry_error(answer["prompt_id"]), node_type, exception, pattern)
    assert _files(output) == before and _files(temp) == temp_before
    written = _good_run(server, workflow, seed, f"video/after_{case}")
    assert _files(output) == before | {written} and _files(temp) == temp_before
