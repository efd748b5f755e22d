"""Publishing finished files: a temp file beside the destination is renamed over it only when complete."""

from __future__ import annotations

import os


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(partial, path) -> None:
    """Rename the finished ``partial`` over ``path`` with the permissions a plainly created file would get
    (temp-file helpers create 0600 files, which would hide a user's output from their other tools)."""
    os.chmod(partial, _default_mode())
    os.replace(partial, path)
