"""Packaging rules of the node pack, checked without ComfyUI: what the pack imports, what it ships, and that the
committed workflows are what workflows/make_workflows.py writes."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_comfyui():
    for path in (REPO / "omnisync_core").rglob("*.py"):
        assert not _imports(path) & {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes",
                                     "execution"}, path


def test_pack_entry_exports_comfy_entrypoint_only():
    tree = ast.parse((REPO / "__init__.py").read_text())
    exported = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__all__" for t in node.targets)]
    values = {tuple(ast.literal_eval(node.value)) for node in exported}
    assert values <= {(), ("comfy_entrypoint",)} and ("comfy_entrypoint",) in values
    source = "\n".join(p.read_text() for p in [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py"))])
    assert "NODE_CLASS_MAPPINGS" not in source
    # no runtime installs, no eval/exec, nothing downloaded at import
    assert not re.search(r"(?<![.\w])(eval|exec)\(", source)
    assert "pip" not in _imports_all(REPO / "nodes") and "subprocess" not in _imports_all(REPO / "nodes")
    loader = (REPO / "nodes" / "_comfy.py").read_text()
    assert loader.index("from huggingface_hub import") > loader.index("def download_model")


def _imports_all(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.py"):
        names |= _imports(path)
    return names


def test_requirements_and_registry_metadata():
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    names = {re.split(r"[<>=!~\[ ]", line.strip())[0].lower() for line in requirements
             if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "torchaudio", "torchvision"}
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    ignored = (REPO / ".comfyignore").read_text().split()
    assert {"tests/", "benchmarks/", "workflows/api/"} <= set(ignored)


def test_workflows_are_generated_and_consistent():
    spec = importlib.util.spec_from_file_location("make_workflows", REPO / "workflows" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.WORKFLOWS) == {p.stem for p in (REPO / "workflows" / "api").glob("*.json")}
    for name, build in module.WORKFLOWS.items():
        graph = build()
        ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
        assert ui == graph.ui() and api == graph.api(), f"re-run python workflows/make_workflows.py ({name})"
        ids = {n["id"] for n in ui["nodes"]}
        for link_id, src, slot, dst, dst_slot, type_ in ui["links"]:
            assert src in ids and dst in ids
            target = [n for n in ui["nodes"] if n["id"] == dst][0]
            assert target["inputs"][dst_slot]["link"] == link_id and target["inputs"][dst_slot]["type"] == type_
        types = {n["class_type"] for n in api.values()}
        assert "OmniSyncModelLoader" in types and types & {"SaveVideo", "OmniSyncLipSyncVideo"}
        # the demo's workflows run as shipped; a family's names the file its `omnisync download` writes
        shipped = {"humo": module.HUMO_MODEL, "latentsync": module.LATENTSYNC_MODEL,
                   "infinitetalk": module.INFINITETALK_MODEL}.get(name.rsplit("_", 1)[-1], "omnisync_demo (bundled)")
        assert [n["inputs"]["model"] for n in api.values() if n["class_type"] == "OmniSyncModelLoader"] == [shipped]
