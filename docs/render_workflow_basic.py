"""Draws docs/workflow_basic.png from workflows/omnisync_lipsync_basic.json (a diagram, not a screenshot):
    .venv/bin/python docs/render_workflow_basic.py
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch
from matplotlib.path import Path as MPath
from matplotlib.patches import PathPatch

ui = json.load(open(str(ROOT / "workflows" / "omnisync_lipsync_basic.json")))
TITLES = {"LoadVideo": "Load Video", "LoadAudio": "Load Audio", "GetVideoComponents": "Get Video Components",
          "OmniSyncModelLoader": "OmniSync Model Loader", "OmniSyncLipSync": "OmniSync Lip Sync",
          "CreateVideo": "Create Video", "SaveVideo": "Save Video"}
COLORS = {"IMAGE": "#64b5f6", "AUDIO": "#ffb74d", "VIDEO": "#81c784", "FLOAT": "#aed581", "OMNISYNC_MODEL": "#ba68c8",
          "INT": "#4db6ac"}
POS = {1: (0, 0), 2: (0, 200), 3: (330, 0), 4: (330, 300), 5: (680, 0), 6: (1060, 0), 7: (1340, 0)}
W = {1: 280, 2: 280, 3: 300, 4: 300, 5: 330, 6: 240, 7: 250}
ROW = 22
widgets_shown = {1: ["file: face.mp4"], 2: ["audio: speech.wav"], 4: ["model: omnisync_demo (bundled)", "vae: from bundle",
                 "audio_encoder: from bundle", "precision: auto"],
                 5: ["seed: 0", "steps: 0 (model default)", "guidance: ds-cfg", "tau: 0 (model default)",
                     "length_policy: pingpong", "detector: auto", "face_index: -1", "crop_size: 0", "window: 0",
                     "overlap: -1", "color_match: false"],
                 7: ["filename_prefix: video/OmniSync", "format: auto", "codec: auto"]}
fig, ax = plt.subplots(figsize=(16, 6.2), dpi=110)
fig.patch.set_facecolor("#202020"); ax.set_facecolor("#202020")
sock = {}
for node in ui["nodes"]:
    nid = node["id"]; x, y = POS[nid]; w = W[nid]
    ins = [i for i in node["inputs"]]
    outs = node["outputs"]
    rows = max(len(ins), len(outs))
    h = 30 + ROW * rows + ROW * len(widgets_shown.get(nid, [])) + 10
    accent = "#6a3d9a" if node["type"].startswith("OmniSync") else "#353535"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=8", fc="#353535", ec="#555", lw=1.2))
    ax.add_patch(FancyBboxPatch((x, y), w, 28, boxstyle="round,pad=0,rounding_size=8", fc=accent, ec="#555", lw=1.2))
    ax.text(x + 10, y + 14, node.get("title") or TITLES[node["type"]], color="white", va="center", fontsize=10.5,
            weight="bold")
    for k, item in enumerate(ins):
        yy = y + 30 + ROW * k + ROW / 2
        ax.plot([x], [yy], "o", color=COLORS.get(item["type"], "#ccc"), ms=7)
        ax.text(x + 10, yy, item["name"], color="#ddd", va="center", fontsize=9)
        sock[("in", nid, k)] = (x, yy)
    for k, item in enumerate(outs):
        yy = y + 30 + ROW * k + ROW / 2
        ax.plot([x + w], [yy], "o", color=COLORS.get(item["type"], "#ccc"), ms=7)
        ax.text(x + w - 10, yy, item["name"], color="#ddd", va="center", ha="right", fontsize=9)
        sock[("out", nid, k)] = (x + w, yy)
    for k, text in enumerate(widgets_shown.get(nid, [])):
        yy = y + 30 + ROW * rows + ROW * k + 4
        ax.add_patch(FancyBboxPatch((x + 10, yy), w - 20, ROW - 5, boxstyle="round,pad=0,rounding_size=6",
                                    fc="#222", ec="#444"))
        ax.text(x + 18, yy + (ROW - 5) / 2, text, color="#bbb", va="center", fontsize=8.5)
for link_id, src, slot, dst, dslot, type_ in ui["links"]:
    (x0, y0), (x1, y1) = sock[("out", src, slot)], sock[("in", dst, dslot)]
    d = max(60, (x1 - x0) / 2)
    path = MPath([(x0, y0), (x0 + d, y0), (x1 - d, y1), (x1, y1)], [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
    ax.add_patch(PathPatch(path, fc="none", ec=COLORS.get(type_, "#ccc"), lw=2.2, alpha=0.9))
ax.set_xlim(-20, 1610); ax.set_ylim(560, -60); ax.axis("off")
ax.text(-10, -35, "OmniSync for ComfyUI: workflows/omnisync_lipsync_basic.json", color="white", fontsize=13, weight="bold")
plt.tight_layout()
fig.savefig(str(ROOT / "docs" / "workflow_basic.png"), facecolor=fig.get_facecolor())
