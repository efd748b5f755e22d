"""``omnisync eval`` end to end on a tiny random model: the manifest (YAML and JSON, sweeps, existing outputs), the
grid, the caches (a re-run computes nothing; a changed setting recomputes only its run) and the files it writes;
and the report rendered in a real headless Chromium."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnisync_core.errors import InputError
from omnisync_core.eval.clips import write_video, write_wav
from omnisync_core.eval.manifest import load_manifest
from tiny_models import write_tiny_bundle

FRAMES, FPS = 12, 25


def speech_like(seconds: float, rate: int = 16000) -> torch.Tensor:
    """A 150 Hz buzz whose loudness rises and falls four times a second (syllables), with pauses."""
    t = torch.arange(int(seconds * rate)) / rate
    envelope = (torch.sin(2 * math.pi * 4 * t) * 0.5 + 0.5) * (torch.sin(2 * math.pi * 0.7 * t) > -0.3)
    return 0.5 * envelope * torch.sign(torch.sin(2 * math.pi * 150 * t)) * 0.6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny bundle, a synthetic face clip with a tone track (no espeak needed), and a manifest over them."""
    from omnisync_core.audio import Waveform
    from omnisync_core.train import synthetic

    root = tmp_path_factory.mktemp("eval")
    write_tiny_bundle(root / "tiny.safetensors", defaults={"crop_size": 32, "window": 9, "overlap": 2, "steps": 2,
                                                          "tau": 0.9, "shift": 3.0, "audio_before": 1,
                                                          "audio_after": 1})
    t = torch.arange(FRAMES) / FPS
    mouth = synthetic.MouthTrack((torch.sin(2 * math.pi * 4 * t) * 0.5 + 0.5) * 0.8, torch.full((FRAMES,), 0.5))
    clip = synthetic.render_clip(synthetic.style_of(5), mouth, size=96, motion_seed=6)
    frames = (clip.frames * 255).round().to(torch.uint8)
    speech = speech_like(FRAMES / FPS)
    write_video(root / "face.mp4", frames, FPS, Waveform(speech, 16000))
    write_wav(root / "speech.wav", speech, 16000)
    manifest = {
        "name": "tiny grid", "device": "cpu", "threads": 1, "model": "tiny.safetensors",
        "clips": [{"name": "face", "video": "face.mp4", "audio": "speech.wav"}],
        "runs": [{"name": "base"},
                 {"name": "tau", "sweep": {"tau": [0.5, 1.0]}},
                 {"name": "source as output", "outputs": "{clip}.mp4", "window": 9, "overlap": 2}]}
    (root / "grid.json").write_text(json.dumps(manifest))
    return root, manifest


def run_eval(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "omnisync_core.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def evaluated(workspace):
    root, _ = workspace
    out = root / "out"
    result = run_eval(root / "grid.json", "--out", out)
    assert result.returncode == 0, result.stderr
    return root, out, result


def test_manifest_expands_sweeps_and_checks_its_input(workspace, tmp_path):
    root, manifest = workspace
    m = load_manifest(root / "grid.json")
    assert [r.name for r in m.runs] == ["base", "tau=0.5", "tau=1.0", "source as output"]
    assert m.runs[1].group == "tau" and m.runs[1].sweep_value == 0.5 and m.runs[3].scores_existing
    assert m.output_dir == Path("outputs/eval/grid") and m.clips[0].video == root / "face.mp4"
    yaml_text = ("name: y\nclips:\n  - {video: %s, audio: %s}\n  - held_out: 2\nruns:\n  - name: a\n"
                 "    settings: {tau: 1.0}\n" % (root / "face.mp4", root / "speech.wav"))
    (tmp_path / "m.yaml").write_text(yaml_text)
    y = load_manifest(tmp_path / "m.yaml")
    assert [c.name for c in y.clips] == ["face", "held-out-0", "held-out-1"]
    assert y.clips[1].synthetic["seed"] == 900_000 and y.runs[0].settings == {"tau": 1.0}
    for bad, message in (({"clips": [], "runs": [{}]}, "clips"),
                         ({"clips": [{"video": "nope.mp4", "audio": "speech.wav"}], "runs": [{}]}, "not found"),
                         ({**manifest, "colour": 1}, "unknown key"),
                         ({**manifest, "runs": [{"name": "a"}, {"name": "a"}]}, "unique")):
        (root / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message):
            load_manifest(root / "bad.json")


def test_eval_writes_the_report_and_every_number(evaluated):
    root, out, result = evaluated
    assert "3 outputs made (0 from the cache), 4 scored (0 from the cache)" in result.stdout
    assert (out / "report.html").is_file()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["clip"], r["run"]) for r in rows] == [("face", "base"), ("face", "tau=0.5"),
                                                     ("face", "tau=1.0"), ("face", "source as output")]
    assert rows[1]["sweep"] == "tau" and rows[1]["sweep_value"] == "0.5"
    data = json.loads((out / "results.json").read_text())
    cells = {c["run"]: c for c in data["cells"]}
    assert all(c["error"] is None for c in cells.values())
    base = cells["base"]["metrics"]
    assert base["seconds_per_output_second"] > 0 and base["peak_ram_mib"] > 50
    # a random model redraws the crop as noise, so the face may be lost: only the bounds are known
    assert 0 <= base["face_rate"] <= 1 and base["lse_c"] is None and base["success"] in (0.0, 1.0)
    # the source scored as its own output: nothing outside the mouth changed
    same = cells["source as output"]["metrics"]
    assert same["psnr_outside_mouth"] == 100.0 and same["jitter_ratio"] == pytest.approx(1.0)
    assert same["seconds_per_output_second"] is None
    assert data["aggregate"]["base"]["success"]["n"] == 1
    assert any("SyncNet" in n for n in data["notes"]) and any("CSIM" in n for n in data["notes"])
    assert len(cells["base"]["series"]["envelope"]) == FRAMES


def test_a_rerun_computes_only_what_changed(evaluated):
    from omnisync_core.eval.runner import evaluate_manifest

    torch.set_num_threads(1)
    root, out, _ = evaluated
    again = evaluate_manifest(load_manifest(root / "grid.json", output_dir=out))
    assert [(c.generated, c.scored) for c in again.cells] == [(False, False)] * 4
    manifest = json.loads((root / "grid.json").read_text())
    manifest["runs"][0]["settings"] = {"guidance": "none"}
    (root / "grid2.json").write_text(json.dumps(manifest))
    changed = evaluate_manifest(load_manifest(root / "grid2.json", output_dir=out))
    assert [(c.run, c.generated, c.scored) for c in changed.cells] == [
        ("base", True, True), ("tau=0.5", False, False), ("tau=1.0", False, False),
        ("source as output", False, False)]
    assert changed.cells[1].metrics == again.cells[1].metrics


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (scripts/setup.sh --test installs Debian's chromium "
                                                "as root where apt exists)")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    """The real browser, offline: the tables are there and every image (plots and strips, base64 PNG) decodes."""
    _, out, _ = evaluated
    page = tmp_path / "report.html"
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html              # self-contained: nothing to fetch
    probe = ("<script>window.addEventListener('load',()=>{for(const i of document.images){"
             "i.setAttribute('data-w',i.naturalWidth);i.setAttribute('data-h',i.naturalHeight)}"
             "document.body.setAttribute('data-ready','1')})</script></body>")
    page.write_text(html.replace("</body>", probe))
    result = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                             "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert 'data-ready="1"' in dom, result.stderr[-2000:]
    summary = re.search(r'<table id="summary-table">(.*?)</table>', dom, re.S).group(1)
    assert summary.count("<tr>") == 1 + 4                                # header + one row per run
    assert dom.count('class="run-table"') == 4
    images = re.findall(r'<img class="(plot|strip)"[^>]*data-w="(\d+)" data-h="(\d+)"', dom)
    kinds = [k for k, _, _ in images]
    assert kinds.count("strip") == 4 and kinds.count("plot") >= 3       # bars, the sweep, the clip's envelope
    assert all(int(w) > 50 and int(h) > 50 for _, w, h in images), images
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1200,900", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = torch.frombuffer(bytearray(Image.open(shot).convert("L").tobytes()), dtype=torch.uint8).float()
    assert pixels.numel() == 1200 * 900 and pixels.std() > 20              # a page was drawn, not a blank one
