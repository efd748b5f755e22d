"""Loading a real ComfyUI checkout (``$COMFYUI_PATH``) for the node tests: in-process, and as a headless server.

The tests that use these skip when COMFYUI_PATH is unset or when this interpreter cannot import ComfyUI (ComfyUI
needs torchvision, which the project's own venv does not have): run them with ``bash scripts/comfyui_test.sh``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-omnisync"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def comfyui_skip_reason() -> str | None:
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set (run bash scripts/comfyui_test.sh with a ComfyUI checkout)"
    if not (Path(COMFYUI_PATH) / "main.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no main.py)"
    for module in ("torchvision", "aiohttp", "yaml"):
        if importlib.util.find_spec(module) is None:
            return f"this interpreter lacks {module}, which ComfyUI needs (use scripts/comfyui_test.sh's venv)"
    return None


requires_comfyui = pytest.mark.skipif(comfyui_skip_reason() is not None, reason=comfyui_skip_reason() or "")


def pack_folder(root: Path) -> Path:
    """A custom_nodes folder holding this repository as the pack (a symlink), as a user would install it."""
    custom = root / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return custom


class InProcessComfy:
    """ComfyUI imported into this process on the CPU, with its folders in a temp dir and this pack loaded."""

    def __init__(self, root: Path):
        self.root = root
        sys.path.insert(0, COMFYUI_PATH)
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True                 # before comfy.model_management is imported
        import comfy.model_management  # noqa: F401
        import folder_paths

        self.folder_paths = folder_paths
        for name in ("output", "input", "temp", "models"):
            (root / name).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(root / "output"))
        folder_paths.set_input_directory(str(root / "input"))
        folder_paths.set_temp_directory(str(root / "temp"))
        # what extra_model_paths.yaml would do: an extra omnisync folder, added before the pack registers its own
        folder_paths.add_model_folder_path("omnisync", str(root / "models" / "omnisync"))
        import nodes

        custom = pack_folder(root)
        self.module_path = str(custom / PACK_NAME)
        ok = asyncio.run(nodes.load_custom_node(self.module_path))
        assert ok, "ComfyUI did not load the pack"
        self.nodes = nodes
        self.module_name = self.module_path.replace(".", "_x_")
        self.pack = sys.modules[self.module_name]

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def core(self, name: str):
        """A module of the pack's own copy of omnisync_core (the types the nodes pass around)."""
        return sys.modules[f"{self.module_name}.omnisync_core.{name}"]

    def run(self, node_id: str, **inputs):
        """Execute a node the way ComfyUI's executor does (the V3 class clone and its normalised execute)."""
        cls = self.node(node_id)
        clone = cls.PREPARE_CLASS_CLONE({})
        result = clone.EXECUTE_NORMALIZED(**inputs)
        return result


# ------------------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` headless on a free local port, with this pack and an extra_model_paths.yaml."""

    def __init__(self, root: Path, extra_models: dict[str, "Path | list[Path]"]):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        custom = pack_folder(root)
        yaml_path = root / "extra_model_paths.yaml"
        lines = ["omnisync_test:", f"    custom_nodes: {custom}"]
        for key, paths in extra_models.items():          # several folders for one key: a YAML block, one a line
            paths = paths if isinstance(paths, list) else [paths]
            lines += [f"    {key}: |"] + [f"        {path}" for path in paths]
        yaml_path.write_text("\n".join(lines) + "\n")
        for name in ("output", "input", "temp", "user"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.log_path = root / "server.log"
        self.log = open(self.log_path, "w")
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--extra-model-paths-config", str(yaml_path), "--output-directory", str(root / "output"),
                   "--input-directory", str(root / "input"), "--temp-directory", str(root / "temp"),
                   "--user-directory", str(root / "user"), "--database-url", "sqlite:///:memory:",
                   "--disable-auto-launch", "--dont-print-server"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
        self.process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=env)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        raise TimeoutError(f"ComfyUI did not answer in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        status, answer = self.submit(path, body)
        if status != 200:
            raise AssertionError(f"POST {path} -> {status}: {json.dumps(answer)[-4000:]}")
        return answer

    def submit(self, path: str, body: dict) -> tuple[int, dict]:
        """POST ``body``; (HTTP status, JSON answer), also for 4xx answers (a prompt that fails validation)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, {"text": text}

    def finished(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The history entry of a queued prompt once it has succeeded or failed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"workflow did not finish in {timeout:.0f} s:\n{self.tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format workflow and wait for its history entry; fails with the server's error if it fails."""
        queued = self.post("/prompt", {"prompt": prompt, "client_id": "omnisync-tests"})
        entry = self.finished(queued["prompt_id"], timeout)
        status = entry["status"]
        if status.get("status_str") != "success":
            raise AssertionError(f"workflow failed: {json.dumps(status, indent=1)[-4000:]}\n{self.tail()}")
        return entry

    def run_failing_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue a workflow that must fail while it runs; the ``execution_error`` message ComfyUI recorded (the
        same dict its websocket sends: node_id, node_type, exception_message, exception_type, traceback, ...)."""
        queued = self.post("/prompt", {"prompt": prompt, "client_id": "omnisync-tests"})
        return self.failed_entry_error(queued["prompt_id"], timeout)

    def failed_entry_error(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The ``execution_error`` message of a queued prompt, which must fail."""
        entry = self.finished(prompt_id, timeout)
        assert entry["status"].get("status_str") == "error", f"workflow did not fail: {entry['status']}"
        errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
        assert len(errors) == 1, entry["status"]["messages"]
        return errors[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def temp_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
