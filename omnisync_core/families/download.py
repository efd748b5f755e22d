"""Opt-in downloads of a family's files into a ComfyUI ``models/`` folder, through huggingface_hub. Nothing here runs
unless the user asks (``omnisync download NAME --models-dir DIR``); every file is printed with where it goes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError
from .base import Family, RemoteFile


def catalogue() -> dict[str, tuple[Family, tuple[RemoteFile, ...]]]:
    """Every download name the families offer, with its family and files."""
    from . import families

    return {name: (fam, files) for fam in families().values() for name, files in fam.downloads.items()}


def download_plan(name: str, models_dir) -> list[tuple[RemoteFile, Path]]:
    """Each file of ``name`` and where it goes under ``models_dir``."""
    known = catalogue()
    if name not in known:
        raise InputError(f"nothing to download under {name!r}; known: {', '.join(known)}")
    root = Path(models_dir).expanduser()
    return [(f, root / f.folder / f.name) for f in known[name][1]]


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
    return catalogue()[name][0].after_download(name, written, say)


__all__ = ["RemoteFile", "catalogue", "download", "download_plan"]
