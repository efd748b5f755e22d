"""Finding a job's files where artists keep them: a ComfyUI ``models/`` folder (``--models-dir``), each companion
in its standard subfolder (:data:`~.base.FOLDERS`), recognised by its header, not by its name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import InputError
from ..model.loading import CheckpointError, resolve_model_path
from . import UnknownModelError, family_of, recognise
from .base import FOLDERS, Companion, Family, ModelFiles, Recognition


_SEEN: dict[tuple, "Recognition | str"] = {}


def recognise_cached(path: Path) -> Recognition:
    """:func:`recognise`, remembered per (path, size, mtime): a folder is listed often (each time ComfyUI builds
    its node list), its files seldom change."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SEEN:
        try:
            _SEEN[key] = recognise(path)
        except CheckpointError as error:
            _SEEN[key] = str(error)
    found = _SEEN[key]
    if isinstance(found, str):
        raise UnknownModelError(found)
    return found


@dataclass
class ModelIndex:
    """Every safetensors file under the role subfolders of a models folder (or of ComfyUI's model folders) with
    what it is; unreadable or unknown files are listed in ``skipped`` with the reason. ``folder`` says which
    subfolder (``vae``, ``text_encoders`` ...) each file was found in; ``where`` names the place in messages."""

    where: str
    model_roots: list[Path] = field(default_factory=list)
    found: dict[Path, Recognition] = field(default_factory=dict)
    skipped: dict[Path, str] = field(default_factory=dict)
    folder: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, root) -> "ModelIndex":
        """The files under a ComfyUI ``models/`` folder ``root``, in the standard subfolders."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"--models-dir is not a folder: {root}")
        root = root.resolve()
        names = dict.fromkeys(f for names in FOLDERS.values() for f in names)
        index = cls.from_folders({name: [root / name] for name in names}, str(root))
        index.model_roots.append(root)
        return index

    @classmethod
    def from_folders(cls, folders: Mapping[str, Sequence[Path]], where: str) -> "ModelIndex":
        """The files under each subfolder name's paths (e.g. ComfyUI's ``folder_paths`` for ``vae``, several
        places each when extra_model_paths.yaml adds some)."""
        index = cls(where)
        index.model_roots = [Path(p) for name in FOLDERS["model"] for p in folders.get(name, ()) if Path(p).is_dir()]
        for name, paths in folders.items():
            for base in map(Path, paths):
                for path in sorted(base.rglob("*.safetensors")) if base.is_dir() else []:
                    if path in index.found or path in index.skipped:
                        continue
                    index.folder[path] = name
                    try:
                        index.found[path] = recognise_cached(path)
                    except CheckpointError as error:
                        index.skipped[path] = str(error)
        return index

    def candidates(self, companion: Companion) -> list[Path]:
        """Files that fill ``companion``, in its subfolders first, in the order of its accepted kinds."""
        ranked = []
        for path, found in self.found.items():
            if found.role == companion.role and found.kind in companion.kinds:
                in_usual = self.folder.get(path) in companion.folders
                ranked.append((companion.kinds.index(found.kind), not in_usual, path.name != companion.usual_file,
                               str(path), path))
        return [r[-1] for r in sorted(ranked)]

    def models(self) -> dict[Path, Recognition]:
        """The main checkpoints of every family found here."""
        return {p: r for p, r in self.found.items() if r.role == "model" and r.family is not None}

    def model(self, name: str) -> Path:
        """A main checkpoint named ``name`` (relative to a model subfolder) inside this folder."""
        return resolve_model_path(name, self.model_roots)


def _check_companion(path: Path, companion: Companion, model: Recognition) -> Path:
    found = recognise(path)
    if found.role != companion.role or found.kind not in companion.kinds:
        raise InputError(f"{path.name} is {found.label} ({found.role.replace('_', ' ')}); {model.label} needs "
                         f"for {companion.flag} a {companion.usual_file}-like file")
    return path


def resolve_files(model: Optional[str], models_dir: Optional[str] = None, given: Optional[Mapping[str, str]] = None,
                  default_model: Optional[Path] = None, notes: Optional[list] = None,
                  index: Optional[ModelIndex] = None) -> tuple[Family, ModelFiles]:
    """The family and files of a job. ``model``: a file path or, with ``models_dir``, a name inside it (default
    ``default_model``); ``given``: role -> path named on the command line (checked to be the right kind);
    companions not given are looked for under ``models_dir``. ``notes`` collects which file was picked where
    several fit; ``index`` replaces ``models_dir`` (e.g. ComfyUI's own model folders). Raises one clear error for a
    missing or wrong file."""
    given = {k: v for k, v in (given or {}).items() if v}
    if index is None and models_dir:
        index = ModelIndex.scan(models_dir)
    if model is None:
        if default_model is None:
            raise InputError("no --model given")
        path = Path(default_model)
    elif Path(model).expanduser().is_file():
        path = Path(model).expanduser()
    elif index is not None:
        path = index.model(model)
    else:
        raise InputError(f"model not found: {model}")
    recognition = recognise(path)
    if recognition.role != "model" and recognition.family is not None:
        raise InputError(f"{path.name} is {recognition.label}, a {recognition.role}: give it with its flag and the "
                         f"model with --model")
    family = family_of(recognition)
    files = ModelFiles(path, recognition)
    for companion in family.companion_roles(files):
        if companion.role in given:
            chosen = Path(given[companion.role]).expanduser()
            if not chosen.is_file():
                raise InputError(f"{companion.flag} file not found: {chosen}")
            files.companions[companion.role] = _check_companion(chosen, companion, recognition)
            continue
        options = index.candidates(companion) if index is not None else []
        if options:
            files.companions[companion.role] = options[0]
            if len(options) > 1 and notes is not None:
                notes.append(f"{companion.role.replace('_', ' ')}: using {options[0].name} "
                             f"(also found: {', '.join(p.name for p in options[1:])}; pick one with {companion.flag})")
        elif companion.required:
            where = f" nor under {index.where}/{companion.folders[0]}/" if index is not None else \
                " (or pass --models-dir, a ComfyUI models folder)"
            raise InputError(f"{recognition.label} needs {companion.usual_file} ({companion.role.replace('_', ' ')}):"
                             f" not given with {companion.flag}{where}")
    return family, files


__all__ = ["ModelIndex", "UnknownModelError", "recognise_cached", "resolve_files"]
