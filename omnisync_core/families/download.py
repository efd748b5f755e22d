"""Opt-in downloads of a family's files into a ComfyUI ``models/`` folder, through huggingface_hub. Nothing here runs
unless the user asks (``omnisync download NAME --models-dir DIR``); every file is printed with where it goes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str            # inside the repo
    folder: str          # ComfyUI models/ subfolder it goes to
    size: str            # approximate, for the plan it prints

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    "humo-1.7b": (
        RemoteFile("Comfy-Org/HuMo_ComfyUI", "split_files/diffusion_models/humo_1.7B_fp16.safetensors",
                   "diffusion_models", "3.48 GB"),
        RemoteFile("Comfy-Org/HuMo_ComfyUI", "split_files/audio_encoders/whisper_large_v3_fp16.safetensors",
                   "audio_encoders", "3.09 GB"),
        RemoteFile("Comfy-Org/Wan_2.2_ComfyUI_Repackaged", "split_files/vae/wan_2.1_vae.safetensors", "vae",
                   "254 MB"),
        RemoteFile("Comfy-Org/Wan_2.1_ComfyUI_repackaged",
                   "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders", "6.74 GB"),
    ),
}


def download_plan(name: str, models_dir) -> list[tuple[RemoteFile, Path]]:
    """Each file of ``name`` and where it goes under ``models_dir``."""
    if name not in DOWNLOADS:
        raise InputError(f"nothing to download under {name!r}; known: {', '.join(DOWNLOADS)}")
    root = Path(models_dir).expanduser()
    return [(f, root / f.folder / f.name) for f in DOWNLOADS[name]]


def download(name: str, models_dir, say: Callable[[str], None] = print,
             fetch: Optional[Callable[[str, str, str], str]] = None) -> list[Path]:
    """Fetch the files of ``name`` that ``models_dir`` lacks (a file already there is kept). ``fetch(repo, path,
    cache_dir) -> local path`` defaults to huggingface_hub's ``hf_hub_download``. Each file arrives in a temporary
    folder beside its target and is renamed into place when complete."""
    if fetch is None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise InputError("downloading needs huggingface_hub: install the packages listed in requirements.txt") from None

        def fetch(repo, path, cache_dir):
            return hf_hub_download(repo_id=repo, filename=path, local_dir=cache_dir)
    written = []
    for remote, target in download_plan(name, models_dir):
        if target.is_file():
            say(f"have {target} ({remote.name})")
            written.append(target)
            continue
        say(f"downloading {remote.repo}/{remote.path} ({remote.size}) -> {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.download"
        try:
            local = Path(fetch(remote.repo, remote.path, str(staging)))
            local.replace(target)
        except InputError:
            raise
        except Exception as error:  # the hub client raises many types; the user needs one line
            raise InputError(f"could not download {remote.path} from {remote.repo}: {error}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written.append(target)
    return written


__all__ = ["DOWNLOADS", "RemoteFile", "download", "download_plan"]
